"""Imagic (Kawar et al., CVPR 2023) with the model fine-tune done as a peft LoRA adapter.

Stage 1 optimizes the target text's embedding e_tgt into e_opt so the frozen model reconstructs the photo;
stage 2 fine-tunes a LoRA on the UNet with e_opt fixed; rendering interpolates eta*e_tgt + (1-eta)*e_opt and
samples through the adapted UNet with classifier-free guidance against the empty prompt.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..artifacts import Artifact
from ..config import RuntimeConfig, check_fields, check_sampling, check_seed, option, positive, to_dict
from ..diffusion import (
    check_finite,
    check_prompt,
    denoising_loss,
    fresh_scheduler,
    initial_noise,
    sample,
)
from ..errors import ArtifactError, NumericalError, PeftEditError, RenderDiverged, first_line
from ..images import eta_seed_grid, grid, load_image
from ..models import Model
from ..optim import descend, loss_scaler, make_optimizer, numeric_advice
from .common import (
    base_meta,
    call_runtime,
    check_base,
    check_steps,
    checkpointing,
    decode_pictures,
    encode_photo,
    encoders_offloaded,
    progress,
    sampling_bar,
    text_embedding,
    unet_placed,
)

log = logging.getLogger("peftedit")

METHOD = "imagic"
ADAPTER = "peftedit"
# LoRA target groups: module-name suffixes inside the UNet (peft matches suffixes).
LORA_TARGETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "feedforward": ["ff.net.0.proj", "ff.net.2"],
    "projections": ["proj_in", "proj_out"],
    "conv": ["conv1", "conv2", "conv_shortcut"],
}


@dataclass
class ImagicConfig:
    """Imagic hyperparameters; each help names where its default comes from."""

    embedding_steps: int = option(500, "Stage 1 steps. Community pipeline: 500; paper (SD): 1000.")
    embedding_lr: float = option(1e-3, "Stage 1 learning rate. Community pipeline: 1e-3; paper (SD): 2e-3.")
    finetune_steps: int = option(
        200,
        "Stage 2 steps. Measured on the demo model (benchmarks/edit_quality.py): 1000 steps overfit (the input is "
        "drawn at every eta, 0/4 edits); 200 steps edit 9/10 (with the lr and targets below). Community pipeline: "
        "1000 (full fine-tune); recipes/sd15-*.toml pin their own.",
    )
    lora_lr: float = option(
        3e-4,
        "Stage 2 LoRA learning rate. Measured on the demo model (benchmarks/edit_quality.py, 200 feed-forward + conv "
        "steps): 3e-4 edits 9/10, 1e-3 5/10, 3e-3 4/10.",
    )
    lora_rank: int = option(8, "LoRA rank: at most the narrowest adapted layer's width (SD 1.5 attention: 320).")
    lora_alpha: float = option(8.0, "LoRA alpha; the update is scaled by alpha/rank (stored for diffusers).")
    lora_targets: list[str] = option(
        ["feedforward", "conv"],
        f"UNet layers to adapt, any of: {', '.join(LORA_TARGETS)}. Off the attention layers, the text keeps steering "
        "the picture (demo model, 200 steps at lr 1e-3: 5/10 edits, vs 2/10 on attention). The SD recipes adapt "
        "attention.",
    )
    eta: float = option(0.7, "Interpolation eta*e_tgt + (1-eta)*e_opt. Paper: 0.6-0.8 works best.")
    guidance: float = option(7.5, "Classifier-free guidance at render. SD / community pipeline default: 7.5.")
    render_steps: int = option(50, "DDIM steps at render. Community pipeline default: 50.")
    preview_etas: list[float] = option([0.5, 0.6, 0.7, 0.8, 0.9], "Etas rendered into the preview grid.")
    preview_seed: int = option(0, "Seed of the preview renders.")

    def __post_init__(self) -> None:
        check_fields(self, "imagic.{}".format)
        check_seed("imagic.preview_seed", self.preview_seed)
        for name in ("embedding_steps", "finetune_steps"):
            positive(f"imagic.{name}", getattr(self, name), zero_ok=True)
        for name in (
            "embedding_lr",
            "lora_lr",
            "lora_rank",
            "lora_alpha",
            "render_steps",
        ):
            positive(f"imagic.{name}", getattr(self, name))
        positive("imagic.guidance", self.guidance, zero_ok=True)
        if not self.preview_etas:
            raise PeftEditError("imagic.preview_etas = []: the preview needs at least one eta, e.g. [0.7]")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown or not self.lora_targets:
            raise PeftEditError(f"imagic.lora_targets = {self.lora_targets!r}: choose from {', '.join(LORA_TARGETS)}")

    def sampling_steps(self) -> tuple[int, str]:
        """The sampling step count this config asks of the model (the preview's), and its name, for ``check_steps``."""
        return self.render_steps, "imagic.render_steps"

    def lora_config(self) -> dict:
        """LoraConfig keyword arguments (also stored for diffusers' ``load_lora_weights``)."""
        modules = [m for group in self.lora_targets for m in LORA_TARGETS[group]]
        return {
            "r": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "target_modules": modules,
            "init_lora_weights": True,
            "lora_dropout": 0.0,
            "bias": "none",
        }


def _train(
    unet, scheduler, latent, cond, params, lr, steps, runtime, generator, stage, advice, show, first_advice=None
) -> float | None:
    """Minimise the denoising loss over ``params`` for ``steps`` steps; returns the last loss (None for 0 steps: the
    stage was skipped).

    ``advice`` ends the error raised when the loss, the optimizer step or the trained values stop being finite;
    ``first_advice``, where given, replaces it for a loss that is not finite before any update."""
    optimizer = make_optimizer(params, lr, runtime.optimizer)
    scaler = loss_scaler(unet.dtype, latent.device)
    loss_value = None
    bar = progress(steps, f"imagic {stage}", show)
    for step in bar:
        loss = denoising_loss(unet, scheduler, latent, cond, generator)
        loss_value = check_finite(loss, stage, step, advice if step or first_advice is None else first_advice)
        descend(optimizer, scaler, loss, stage, advice)
        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
    # The last step's update is never seen by a loss: check what it left before anything is saved or rendered.
    if steps and not all(bool(torch.isfinite(p).all()) for p in params):
        raise NumericalError(f"{stage}: the trained values are not finite after step {steps - 1}; {advice}")
    return loss_value


def optimize_embedding(
    unet, scheduler, latent, e_tgt, config, runtime, generator, show
) -> tuple[torch.Tensor, float | None]:
    """Stage 1: optimize a copy of e_tgt (fp32) so the frozen UNet denoises the photo; returns it and the last loss."""
    embedding = e_tgt.detach().clone().float().requires_grad_(True)
    loss = _train(
        unet,
        scheduler,
        latent,
        embedding,
        [embedding],
        config.embedding_lr,
        config.embedding_steps,
        runtime,
        generator,
        "stage 1/2 (embedding)",
        numeric_advice("imagic.embedding_lr", unet.dtype),
        show,
    )
    return embedding.detach(), loss


def remove_adapter(unet) -> None:
    """Take our adapter off ``unet``; with no other adapter left, peft's emptied LoRA wrappers go too, so the UNet
    runs through its own layers again (deleting an adapter alone keeps a wrapper around each targeted layer)."""
    unet.delete_adapters(ADAPTER)
    if not getattr(unet, "peft_config", None):
        unet.unload_lora()


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    """The adapter's parameters, made fp32 and trainable (the frozen base may be half precision)."""
    params = []
    for name, param in unet.named_parameters():
        if f".{ADAPTER}." in name or name.endswith(f".{ADAPTER}"):
            param.data = param.data.float()
            param.requires_grad_(True)
            params.append(param)
    return params


def check_lora_rank(unet, config: ImagicConfig) -> None:
    """Refuse a LoRA rank above the narrowest adapted layer's width (its in or out features, or conv channels): past
    it the adapter grows but can express nothing more, and a huge rank (a typo) exhausted memory without a word."""
    targets = config.lora_config()["target_modules"]
    suffixes = tuple(f".{target}" for target in targets)  # peft's matching: the whole name, or its last parts
    widths = [
        min(getattr(m, "in_features", 0) or m.in_channels, getattr(m, "out_features", 0) or m.out_channels)
        for name, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and (name.endswith(suffixes) or name in targets)
    ]
    narrowest = min(widths, default=None)
    if narrowest is not None and config.lora_rank > narrowest:
        raise PeftEditError(
            f"imagic.lora_rank = {config.lora_rank} is above the narrowest adapted layer's width, {narrowest}; "
            "give at most that"
        )


def finetune_lora(unet, scheduler, latent, e_opt, config, runtime, generator, show) -> tuple[dict, float | None]:
    """Stage 2: train a LoRA on the UNet with e_opt fixed; returns its state dict (peft keys, fp32) and last loss."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(runtime.seed)  # LoRA A's random init: part of the run's seed, not global state
        unet.add_adapter(LoraConfig(**config.lora_config()), adapter_name=ADAPTER)
    try:
        loss = _train(
            unet,
            scheduler,
            latent,
            e_opt,
            lora_parameters(unet),
            config.lora_lr,
            config.finetune_steps,
            runtime,
            generator,
            "stage 2/2 (LoRA fine-tune)",
            numeric_advice("imagic.lora_lr", unet.dtype),
            show,
            # At step 0 the adapter is a no-op (LoRA B starts at zero): a loss that is not finite comes from stage 1.
            first_advice="the adapter does nothing yet, so the stage 1 embedding is to blame; "
            + numeric_advice("imagic.embedding_lr", unet.dtype),
        )
        state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
        return {k: v.detach().float().cpu().clone() for k, v in state.items()}, loss
    finally:
        remove_adapter(unet)


def fit(
    model: Model,
    image: str | Path | Image.Image,
    target_text: str,
    config: ImagicConfig | None = None,
    runtime: RuntimeConfig | None = None,
    show_progress: bool = True,
) -> Artifact:
    """Run Imagic's two training stages on one photo; returns the edit artifact (with its preview grid).

    The model is left as it was: the LoRA lives in the artifact, not in ``model``.
    """
    config = config or ImagicConfig()
    if not isinstance(config, ImagicConfig):
        raise TypeError(f"config must be an ImagicConfig, not {type(config).__name__}")
    runtime = call_runtime(model, runtime)
    pipe, unet = model.pipe, model.pipe.unet
    target_text = check_prompt(pipe.tokenizer, target_text)
    check_steps(model, *config.sampling_steps())  # the preview renders after both stages
    check_lora_rank(unet, config)  # before stage 1's minutes
    picture, image_info = load_image(image, model.resolution)
    latent = encode_photo(model, picture)
    e_tgt = text_embedding(model, target_text)
    e_uncond = text_embedding(model, "")
    meta, probe = base_meta(model, {"runtime": to_dict(runtime), "imagic": to_dict(config)}, image_info)
    generator = torch.Generator("cpu").manual_seed(runtime.seed)
    scheduler = fresh_scheduler(pipe)
    unet_placed(model)
    with (
        encoders_offloaded(model, runtime.offload_encoders),
        checkpointing(unet, runtime.gradient_checkpointing),
    ):
        e_opt, embedding_loss = optimize_embedding(
            unet, scheduler, latent, e_tgt, config, runtime, generator, show_progress
        )
        lora, finetune_loss = finetune_lora(unet, scheduler, latent, e_opt, config, runtime, generator, show_progress)
    meta.update(
        prompts={"target": target_text},
        losses={"embedding": embedding_loss, "finetune": finetune_loss},
    )
    tensors = {
        "e_tgt": e_tgt.cpu(),
        "e_opt": e_opt.cpu(),
        "e_uncond": e_uncond.cpu(),
        "base_probe": probe,
    }
    artifact = Artifact(METHOD, tensors, meta, lora=lora, lora_config=config.lora_config())
    etas = config.preview_etas
    try:
        renders = render(
            model, artifact, etas, config.preview_seed, check=False, show_progress=show_progress, skip_diverged=True
        )
    except RenderDiverged as err:  # the training is sound (its values were checked); keep it, without a preview
        log.warning("no preview: %s (imagic.preview_etas = %s)", err, etas)
        renders = [None] * len(etas)
    kept = [(e, image) for e, image in zip(etas, renders, strict=True) if image is not None]
    artifact.preview = grid([picture] + [image for _, image in kept], ["input"] + [f"eta {e:g}" for e, _ in kept])
    artifact.card = model_card(artifact)
    return artifact


@contextlib.contextmanager
def lora_applied(unet, artifact: Artifact):
    """The artifact's LoRA on ``unet`` inside the block (fp32 adapter weights), removed afterwards."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    try:
        with torch.random.fork_rng(devices=[]):  # peft's random init, overwritten below: no trace in global state
            unet.add_adapter(LoraConfig(**artifact.lora_config), adapter_name=ADAPTER)
        lora_parameters(unet)
        try:
            result = set_peft_model_state_dict(unet, artifact.lora, adapter_name=ADAPTER)
        except RuntimeError as err:  # torch's "size mismatch for ...": a LoRA made for other layer sizes
            said = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), first_line(err))
            raise ArtifactError(f"LoRA weights do not fit this UNet ({said[:200]})") from None
        missing = [k for k in result.missing_keys if f".{ADAPTER}" in k]
        if missing or result.unexpected_keys:
            raise ArtifactError(
                f"LoRA weights do not fit this UNet ({len(missing)} missing, "
                f"{len(result.unexpected_keys)} unexpected keys)"
            )
        for param in unet.parameters():
            param.requires_grad_(False)
        yield unet
    finally:
        if ADAPTER in (getattr(unet, "peft_config", None) or {}):
            remove_adapter(unet)
        elif not getattr(unet, "peft_config", None):
            # add_adapter failed: diffusers marks a model as holding adapters before injecting one, and a model so
            # marked without any fails every later add_adapter
            unet._hf_peft_config_loaded = False


def render(
    model: Model,
    artifact: Artifact,
    eta: float | list[float] | tuple[float, ...] | None = None,
    seed: int | list[int] | tuple[int, ...] = 0,
    *,
    guidance: float | None = None,
    steps: int | None = None,
    check: bool = True,
    show_progress: bool = False,
    skip_diverged: bool = False,
) -> Image.Image | list[Image.Image | None]:
    """Render an Imagic edit at ``eta`` with ``seed``; returns a PIL image, or for a list (or tuple) of etas or seeds
    a list: every eta for the first seed, then every eta for the next (the LoRA goes on, and with
    ``runtime.offload_idle`` the UNet and then the VAE onto the GPU, once for them all).

    Guidance and steps default to the artifact's recipe. Raises :class:`ArtifactError` for another base model, and
    :class:`RenderDiverged` for a render that diverged (NaN or infinite values); with ``skip_diverged`` such a render
    is ``None`` in the list instead, with a warning, unless every render diverged.
    """
    if artifact.method != METHOD or artifact.lora is None:
        raise ArtifactError(f"this edit's method is {artifact.method!r}, not Imagic")
    artifact.require("e_tgt", "e_opt", "e_uncond", "base_probe")
    if check:
        check_base(model, artifact)
    recipe = artifact.meta["recipe"][METHOD]
    etas = [recipe["eta"] if e is None else e for e in _several("eta", eta)]
    guidance = recipe["guidance"] if guidance is None else guidance
    steps = recipe["render_steps"] if steps is None else steps
    for value in etas:
        check_sampling(eta=value)
    seeds = [check_seed("seed", value) for value in _several("seed", seed)]  # always: None is not "the default"
    check_sampling(guidance=guidance, steps=steps)
    etas, steps = [float(e) for e in etas], int(steps)
    check_steps(model, steps)
    pipe = model.pipe
    device = model.device
    e_tgt, e_opt = (
        artifact.tensors["e_tgt"].to(device),
        artifact.tensors["e_opt"].to(device),
    )
    uncond = artifact.tensors["e_uncond"].to(device)
    side = pipe.unet.config.sample_size
    shape = (1, pipe.unet.config.in_channels, side, side)
    results = []
    with lora_applied(unet_placed(model), artifact):
        for number in seeds:
            for value in etas:
                scheduler = fresh_scheduler(pipe, steps)
                noise = initial_noise(shape, number) * scheduler.init_noise_sigma
                cond = value * e_tgt + (1 - value) * e_opt
                said = f"render eta {value:g}" + (f", seed {number}" if len(seeds) > 1 else "")
                bar = sampling_bar(said, show_progress)
                results.append((said, sample(pipe.unet, scheduler, noise, cond, uncond, guidance, progress=bar)))
    images, diverged = [], []
    for said, latents in results:
        try:
            images.extend(decode_pictures(model, latents, "eta or guidance"))
        except RenderDiverged as err:
            if not skip_diverged:
                raise
            diverged.append((said, err))
            images.append(None)
    if len(diverged) == len(images):
        raise diverged[0][1]
    for said, err in diverged:
        log.warning("%s: %s", said, err)
    return images if isinstance(eta, list | tuple) or isinstance(seed, list | tuple) else images[0]


def _several(name: str, value) -> list:
    """A render argument as a list: a list or tuple as it is (raising when it is empty), one value as a list of one."""
    if not isinstance(value, list | tuple):
        return [value]
    if not value:
        raise PeftEditError(f"{name} = {value!r}: give at least one value")
    return list(value)


def render_grid(
    model: Model,
    artifact: Artifact,
    etas: float | list[float],
    seeds: int | list[int],
    *,
    guidance: float | None = None,
    steps: int | None = None,
    show_progress: bool = False,
) -> Image.Image:
    """Every eta with every seed, as one labelled picture: a row per seed, a column per eta (``render`` with
    ``skip_diverged``: a render that diverged is a grey cell; an error only when every one did). One eta or seed
    may be given as a number."""
    etas, seeds = _several("eta", etas), _several("seed", seeds)
    pictures = render(
        model, artifact, etas, seeds, guidance=guidance, steps=steps, show_progress=show_progress, skip_diverged=True
    )
    return eta_seed_grid(pictures, etas, seeds)


def model_card(artifact: Artifact) -> str:
    """A short README for the edit folder."""
    meta = artifact.meta
    recipe = meta["recipe"][METHOD]
    return f"""# peftedit Imagic edit

- target text: "{meta["prompts"]["target"]}"
- base model: `{meta["base_model"]}` (fingerprint {meta["base_fingerprint"]})
- input image: {meta["image"].get("name")} (sha256 {meta["image"].get("sha256")})
- LoRA: rank {recipe["lora_rank"]}, alpha {recipe["lora_alpha"]}, targets {", ".join(recipe["lora_targets"])}
- created {meta["created"]} with peftedit {meta["versions"].get("peftedit")}

![preview](preview.png)

Render again (no re-training):

    peftedit edit . --eta {recipe["eta"]} --seed 0 -o ../edit.png

(pictures go outside the folder: `--overwrite` replaces an edit folder only while it holds nothing else)

The LoRA alone loads in vanilla diffusers with `pipe.load_lora_weights(folder)`; Imagic also needs the optimized
embedding: `e = eta * e_tgt + (1 - eta) * e_opt` from `edit.safetensors`, passed as `prompt_embeds` with
`negative_prompt_embeds=e_uncond`.{XL_NOTE if "XL" in meta.get("base_pipeline", "") else ""}
"""


XL_NOTE = """ On SDXL the embeddings' last row holds the added conditions: pass `e[:, :-1]` as
`prompt_embeds` and `e[:, -1, :p]` as `pooled_prompt_embeds` (p = `text_encoder_2.config.projection_dim`), the
same for `e_uncond`, and pass `guidance_scale` (SDXL's pipeline defaults to 5; see peftedit's adapters/README.md,
"SDXL embeddings")."""
