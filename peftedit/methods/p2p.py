"""Prompt-to-Prompt (Hertz et al., ICLR 2023) as diffusers attention processors.

An edit runs the batch [source, target]: the source branch reproduces the inversion, the target branch borrows the
source's attention maps. ``replace`` (word swap) gives the target the source's cross-attention maps token by token;
``refine`` (words added) aligns the two token lists and borrows the maps of the tokens they share; ``reweight``
scales the maps of chosen words. The target's self-attention maps come from the source early on (layout), and a local
blend keeps the latents outside a mask equal to the source's: the blend words' attention (the reference), or where
the two branches' latents differ (for models whose attention maps are not localised).

Only the layers whose maps are used get the map-materialising processor below; every other layer keeps the processor
it had (SDPA or xformers). Processors are installed for one edit and removed afterwards.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import numbers
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import check_fields, count, option
from ..errors import PeftEditError
from ..images import grid

MODES = ("replace", "refine", "reweight")
BLEND_MASKS = ("attention", "difference")
# The ``peftedit edit`` flag of each Control field that has one: errors name both, "--p2p (mode)", so that a message
# speaks to a CLI user and to one who built the Control in Python alike.
FLAGS = {
    "mode": "--p2p",
    "reweight": "--reweight",
    "blend": "--blend",
    "blend_mask": "--blend-mask",
    "cross_replace": "--cross-replace",
    "self_replace": "--self-replace",
}


def named(field: str) -> str:
    """How errors name a Control field: its flag and, in parentheses, its Python name ("--p2p (mode)"); the Python
    name alone for a field no flag sets."""
    return f"{FLAGS[field]} ({field})" if field in FLAGS else field


@dataclass
class Control:
    """How the target prompt takes over the source's attention; each help names where its default comes from."""

    mode: str | None = option(
        None,
        "replace (word swap, same token count), refine (words added) or reweight (emphasis); "
        "None = replace when the token counts match, else refine.",
    )
    cross_replace: float = option(
        0.8, "Share of steps (from the first) whose target cross-attention comes from the source. P2P reference: 0.8."
    )
    self_replace: float = option(
        0.4, "Share of steps whose target self-attention comes from the source. P2P reference: 0.4."
    )
    reweight: dict[str, float] = option(
        {},
        "Word -> factor on its cross-attention in the target, e.g. {'cat': 2.0}; any finite number: the P2P paper "
        "scales by c in [-2, 2] (below 0 weakens the word past its absence). P2P reference: equalizer.",
    )
    blend: list[str] = option(
        [],
        "Words whose attention marks where the picture may change (local blend); elsewhere the "
        "target keeps the source's latents. P2P reference: LocalBlend.",
    )
    blend_mask: str = option(
        "attention",
        "What marks the region that may change: 'attention' (the blend words' cross-attention; P2P reference "
        "LocalBlend) or 'difference' (where the target's latents moved away from the source's, summed from "
        "blend_start on; takes no words). 'difference' is for models whose attention maps are not localised, "
        "such as the demo model.",
    )
    blend_threshold: float = option(0.3, "Mask threshold on the normalised blend map. P2P reference: 0.3.")
    blend_start: float = option(0.2, "Share of steps before blending starts. Null-text reference: start_blend = 0.2.")
    self_replace_max_side: int = option(
        32, "Self-attention is replaced only at layers at most this many latents a side. P2P reference: 32**2 tokens."
    )
    map_divisor: int = option(
        4,
        "Maps for blending and --save-attention come from layers at latent side / this (SD 512 px: 16x16, as the "
        "P2P reference), or the nearest larger side the UNet has.",
    )

    def __post_init__(self) -> None:
        if not isinstance(self.reweight, dict):
            raise PeftEditError(f"{named('reweight')} = {self.reweight!r} must be a table of WORD: FACTOR")
        for word, factor in self.reweight.items():
            if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor):
                raise PeftEditError(f"{named('reweight')} {word}={factor!r}: the factor must be a finite number")
        check_fields(self, named)
        self.blend = [word for words in self.blend for word in words.split()]  # --blend "red square": both words
        if self.mode is not None and self.mode not in MODES:
            raise PeftEditError(f"{named('mode')} {self.mode!r}: choose one of {', '.join(MODES)}")
        for name in ("cross_replace", "self_replace", "blend_threshold", "blend_start"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise PeftEditError(f"{named(name)} = {value!r} must be between 0 and 1")
        count(named("self_replace_max_side"), self.self_replace_max_side, zero_ok=True)
        count(named("map_divisor"), self.map_divisor)
        if self.blend_mask not in BLEND_MASKS:
            raise PeftEditError(f"{named('blend_mask')} {self.blend_mask!r}: choose one of {', '.join(BLEND_MASKS)}")
        if self.blend_mask == "difference" and self.blend:
            raise PeftEditError(
                f"{named('blend_mask')} difference finds the region itself; drop the {named('blend')} words"
            )
        if self.mode == "reweight" and not self.reweight:
            raise PeftEditError(
                f"{named('mode')} reweight needs {named('reweight')} words and factors, e.g. cat=2.0 ({{'cat': 2.0}})"
            )

    @property
    def blends(self) -> bool:
        """Whether a local blend is asked for (blend words, or the difference mask, which takes none)."""
        return bool(self.blend) or self.blend_mask == "difference"


def parse_reweight(items: list[str] | str | None) -> dict[str, float]:
    """``["cat=2.0", "red=0.5"]`` (or one comma-separated string) as a word -> factor dict."""
    if not items:
        return {}
    items = items.split(",") if isinstance(items, str) else [p for item in items for p in item.split(",")]
    out = {}
    for item in (i.strip() for i in items if i.strip()):
        word, sep, value = item.partition("=")
        try:
            out[word.strip().lower()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not word.strip():
            raise PeftEditError(f"--reweight {item!r}: expected WORD=FACTOR, e.g. cat=2.0")
    return out


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Token positions (start token = 0) of every occurrence of ``word`` in ``prompt``; empty when absent. ``word``
    may be several words ("red square": their tokens in a row), found across the prompt's words."""
    positions = []
    wanted = tokenizer(word, add_special_tokens=False).input_ids
    ids = [i for piece in prompt.split() for i in tokenizer(piece, add_special_tokens=False).input_ids]
    for k in range(len(ids) - len(wanted) + 1):
        if wanted and ids[k : k + len(wanted)] == wanted:
            positions.extend(range(1 + k, 1 + k + len(wanted)))
    return [p for p in positions if p < tokenizer.model_max_length - 1]


def _ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=False).input_ids[: tokenizer.model_max_length - 2]


def token_mapping(tokenizer, source: str, target: str, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, aligned): target position p borrows source map ``index[p]`` with weight ``aligned[p]`` (0 or 1)."""
    length = tokenizer.model_max_length
    src, tgt = _ids(tokenizer, source), _ids(tokenizer, target)
    index, aligned = torch.arange(length), torch.ones(length)
    if mode == "replace":
        if len(src) != len(tgt):
            flag = named("mode")
            raise PeftEditError(
                f"{flag} replace needs prompts of the same token count (source {len(src)}, target {len(tgt)}); "
                f"use {flag} refine when words are added or removed"
            )
        return index, aligned
    aligned[1 : len(tgt) + 1] = 0.0
    matcher = difflib.SequenceMatcher(None, src, tgt, autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            index[1 + block.b + k] = 1 + block.a + k
            aligned[1 + block.b + k] = 1.0
    for p in range(len(tgt) + 1, length):  # end and padding tokens follow the source's
        index[p] = min(p - len(tgt) + len(src), length - 1)
    return index, aligned


class Controller:
    """The state of one edit: the step counter, the token mapping, and the accumulated cross-attention maps."""

    def __init__(self, unet, tokenizer, prompts: list[str], control: Control | None, steps: int) -> None:
        self.control = control or Control()
        self.prompts, self.steps, self.step = prompts, steps, 0
        # The first steps in which the target borrows the source's cross- and self-attention (see attend).
        self.cross_steps = int(steps * self.control.cross_replace)
        self.self_steps = int(steps * self.control.self_replace)
        self.branches = len(prompts)
        self.editing = self.branches == 2
        length = tokenizer.model_max_length
        self.index, self.aligned, self.equalizer = torch.arange(length), torch.ones(length), torch.ones(length)
        if self.editing:
            mode = self.control.mode or self.default_mode(tokenizer, *prompts)
            self.index, self.aligned = token_mapping(tokenizer, prompts[0], prompts[1], mode)
            if self.control.reweight and self.cross_steps == 0:  # the factors act only in those steps (see attend)
                raise PeftEditError(
                    f"{named('reweight')} scales the target's attention only in the steps that take the source's "
                    f"(as P2P's reference does), and {named('cross_replace')} = {self.control.cross_replace} gives "
                    f"none of the {steps}; raise it"
                )
            for word, factor in self.control.reweight.items():
                where = word_positions(tokenizer, prompts[1], word)
                if not where:
                    raise PeftEditError(
                        f"{named('reweight')} {word!r}: the word is not in the target prompt {prompts[1]!r}"
                    )
                self.equalizer[where] = factor
        self.blend_alpha = torch.zeros(self.branches, length)
        for word in self.control.blend:
            found = [word_positions(tokenizer, p, word) for p in prompts]
            if not any(found):
                raise PeftEditError(
                    f"{named('blend')} {word!r}: the word is in neither prompt ({' / '.join(prompts)})"
                )
            for b, where in enumerate(found):
                self.blend_alpha[b, where] = 1.0
        self.latent_side = int(unet.config.sample_size)
        self.levels = len(unet.config.block_out_channels)
        sides = {self.layer_side(n) for n in unet.attn_processors if n.endswith("attn2.processor")}
        wanted = self.latent_side // self.control.map_divisor
        self.map_side = min((s for s in sides if s >= wanted), default=max(sides, default=0))
        # On the UNet's device from the start: a copy from the host inside every edited layer would sync the GPU.
        device = unet.device
        self.index, self.aligned = self.index.to(device), self.aligned.to(device)
        self.equalizer, self.blend_alpha = self.equalizer.to(device), self.blend_alpha.to(device)
        self.maps: torch.Tensor | None = None  # summed on the device; mean_maps() hands them to the CPU
        self.map_count = 0
        self.moved: torch.Tensor | None = None

    @staticmethod
    def default_mode(tokenizer, source: str, target: str) -> str:
        """``replace`` when the prompts have the same token count, else ``refine``."""
        return "replace" if len(_ids(tokenizer, source)) == len(_ids(tokenizer, target)) else "refine"

    def layer_side(self, name: str) -> int:
        """Latent side of the attention layer ``name`` (from its block's depth in the UNet)."""
        parts = name.split(".")
        level = {"down_blocks": lambda: int(parts[1]), "up_blocks": lambda: self.levels - 1 - int(parts[1])}.get(
            parts[0], lambda: self.levels - 1
        )()
        return max(self.latent_side // 2**level, 1)

    def role(self, name: str) -> tuple[bool, bool] | None:
        """(edit, store) for the layer ``name``, or None when it keeps its memory-efficient processor."""
        side, cross = self.layer_side(name), name.endswith("attn2.processor")
        store = cross and side == self.map_side
        if cross:
            edit = self.editing
        else:
            edit = self.editing and self.control.self_replace > 0 and side <= self.control.self_replace_max_side
        return (edit, store) if edit or store else None

    def attend(self, probs: torch.Tensor, cross: bool, edit: bool, store: bool) -> torch.Tensor:
        """Edit a layer's attention probabilities [batch, heads, queries, keys]; the conditional half is last."""
        if edit:
            source, target = probs[-2], probs[-1]
            if cross and self.step < self.cross_steps:
                borrowed, aligned = source[..., self.index], self.aligned.to(probs.dtype)
                probs[-1] = (borrowed * aligned + target * (1 - aligned)) * self.equalizer.to(probs.dtype)
            elif not cross and self.step < self.self_steps:
                probs[-1] = source
        if store:
            side = math.isqrt(probs.shape[2])
            maps = probs[-self.branches :].float().mean(1).reshape(self.branches, side, side, -1)
            self.maps = maps if self.maps is None else self.maps + maps
            self.map_count += 1
        return probs

    def after_step(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        """Advance the step counter; from ``blend_start`` on, keep the target equal to the source outside the mask."""
        self.step = i + 1
        if not (self.editing and self.control.blends and i >= int(self.steps * self.control.blend_start)):
            return latents
        if self.control.blend_mask == "difference":
            moved = (latents[1:] - latents[:1]).abs().mean(1, keepdim=True).float()
            self.moved = moved if self.moved is None else self.moved + moved
            mask = self.threshold(F.max_pool2d(self.moved, 3, stride=1, padding=1))
        else:
            mask = self.blend_mask(latents.shape[-2:])
        mask = mask.to(latents.device, latents.dtype)
        return torch.cat([latents[:1], latents[:1] + mask * (latents[1:] - latents[:1])])

    def threshold(self, plane: torch.Tensor) -> torch.Tensor:
        """Normalise each of [n, 1, h, w] by its max; the union of what passes ``blend_threshold``, [1, 1, h, w]."""
        plane = plane / plane.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]
        return (plane > self.control.blend_threshold).any(0, keepdim=True).float()

    def blend_mask(self, size) -> torch.Tensor:
        """Union over both branches of the thresholded attention of the blend words, at latent size [1, 1, h, w]."""
        words = (self.maps * self.blend_alpha[:, None, None, :]).sum(-1).unsqueeze(1)
        words = F.max_pool2d(words, 3, stride=1, padding=1)
        return self.threshold(F.interpolate(words, size=tuple(size)))

    def mean_maps(self) -> torch.Tensor | None:
        """The cross-attention maps averaged over steps and map layers, [branches, side, side, tokens]."""
        return None if self.maps is None else (self.maps / self.map_count).cpu()


class ControlledAttention:
    """An attention processor that materialises the probabilities so the controller can read and edit them."""

    def __init__(self, controller: Controller, edit: bool, store: bool) -> None:
        self.controller, self.edit, self.store = controller, edit, store

    # Under runtime.compile the controller's Python state (step counter, stored maps) stays out of the graph: traced,
    # every step's new counter would recompile the UNet until torch gave up and ran it eagerly.
    @torch.compiler.disable
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        cross = encoder_hidden_states is not None
        context = hidden_states if not cross else encoder_hidden_states
        batch, length = hidden_states.shape[0], context.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        probs = probs.view(batch, attn.heads, *probs.shape[1:])
        probs = self.controller.attend(probs, cross, self.edit, self.store).reshape(-1, *probs.shape[2:])
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def installed(unet, controller: Controller):
    """The controller's processors on the layers that need them inside the block; the previous ones restored after."""
    saved = unet.attn_processors
    processors = dict(saved)
    for name in saved:
        role = controller.role(name)
        if role is not None:
            processors[name] = ControlledAttention(controller, *role)
    unet.set_attn_processor(processors)
    try:
        yield controller
    finally:
        unet.set_attn_processor(dict(saved))


def attention_grid(tokenizer, prompt: str, maps: torch.Tensor, image: Image.Image) -> Image.Image:
    """A grid: the image, then the averaged cross-attention map [side, side, tokens] of each token of ``prompt``."""
    ids = _ids(tokenizer, prompt)
    cells, labels = [image], ["image"]
    for position, token in enumerate(ids, start=1):
        plane = maps[..., position]
        plane = (plane - plane.min()) / (plane.max() - plane.min()).clamp_min(1e-12)
        gray = Image.fromarray((plane.numpy() * 255).round().astype(np.uint8), "L").convert("RGB")
        cells.append(gray.resize(image.size, Image.NEAREST))
        labels.append(re.sub(r"</w>$", "", tokenizer.convert_ids_to_tokens(token)))
    return grid(cells, labels)
