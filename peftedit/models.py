"""Loading a Stable Diffusion pipeline (hub id, local diffusers folder, single checkpoint file),
choosing device, precision and attention backend, and fingerprinting the base weights."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from . import hub
from .config import RuntimeConfig
from .diffusion import SIZE_CONDITIONS
from .errors import ArtifactError, PeftEditError, first_line

log = logging.getLogger("peftedit")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SINGLE_FILE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# How messages name the model and a single checkpoint's configs: the CLI flag, then the argument of load_model and
# load_base (both call them so), as every library message names an option.
MODEL_OPTION = "--model (model)"
CONFIGS_OPTION = "--single-file-config (single_file_config)"
# Where a single checkpoint in the original (CompVis/LDM) layout keeps its UNet: the part every such file has.
LDM_UNET_PREFIX = "model.diffusion_model."
# The files of a hub id a single checkpoint's configs take (those diffusers' single-file loader fetches).
CONFIG_PATTERNS = ["*.json", "**/*.json", "*.txt", "**/*.txt", "**/*.model"]
# Values sampled from each weight tensor for the fingerprint's probe.
PROBE_PER_TENSOR = 8
# Relative tolerance when comparing probes: loose enough for fp16/bf16 loads of the same weights.
PROBE_RTOL = 2e-2


def dtype_name(dtype: torch.dtype) -> str:
    """``DTYPES``' name for a torch dtype (``fp16`` for ``torch.float16``)."""
    return next(name for name, value in DTYPES.items() if value == dtype)


@dataclasses.dataclass
class Model:
    """A loaded pipeline with what peftedit needs to know about it."""

    pipe: object
    name: str
    device: torch.device
    dtype: torch.dtype
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)  # what it was loaded with
    single_file_config: str | None = None  # the configs a single-file checkpoint was loaded with (folder or hub id)
    on_device: tuple[str, ...] = ()  # with runtime.offload_idle: the parts ``place`` last put on ``device``

    @property
    def resolution(self) -> int:
        """Image side in pixels the UNet was built for."""
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    def place(self, *needed: str) -> None:
        """Before a part runs. With ``runtime.offload_idle``: the ``needed`` parts on ``device`` and every other part
        on the CPU, each staying where it is until a later call needs it, so only the part at work holds GPU memory
        (the model is loaded onto the CPU). Without it every part stays on ``device`` and nothing moves.
        """
        if not self.runtime.offload_idle:
            return
        parts = pipe_parts(self.pipe, PARTS)
        where = {name: next(part.parameters()).device for name, part in parts.items()}
        leaving = [name for name in parts if name not in needed and where[name].type != "cpu"]
        for name in leaving:  # first, so the parts coming in can reuse their memory
            parts[name].to("cpu")
        if leaving and self.device.type == "cuda":
            torch.cuda.empty_cache()
        for name in needed:
            if name in parts:
                parts[name].to(self.device)  # no copy for a part already there
        self.on_device = tuple(name for name in needed if name in parts)


DEMO_NAME = "peftedit-demo"


def _no_pickled_weights(folder: Path) -> None:
    """Raise for a diffusers folder one of whose parts peftedit loads has pickled weights only (``.bin``, ``.pt``…:
    unpickling runs code), rather than let diffusers' error about missing safetensors files stand for it. Other
    subfolders (a training run's ``checkpoint-N/``, a safety checker peftedit does not load) are not its business."""
    for name in PARTS:
        part = folder / name
        try:
            files = [f for f in part.iterdir() if f.is_file()] if part.is_dir() else []
        except OSError:
            continue  # unreadable: diffusers' own error says so
        pickled = [f for f in files if f.suffix.lower() in PICKLE_SUFFIXES]
        if pickled and not any(f.suffix == ".safetensors" for f in files):
            raise PeftEditError(
                f"{part}: only pickled weights ({pickled[0].name}), which are not loaded (unsafe); save the model "
                "with safetensors (diffusers: pipe.save_pretrained(folder, safe_serialization=True))"
            )


def demo_model_dir() -> Path:
    """Folder of the built-in demo model (diffusers layout)."""
    from .demo import DEMO_MODEL_DIR

    return Path(DEMO_MODEL_DIR)


def resolve_device(runtime: RuntimeConfig) -> torch.device:
    """The torch device for a runtime config (``auto`` picks CUDA when available)."""
    if runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if runtime.device.startswith("cuda") and not torch.cuda.is_available():
        raise PeftEditError(f"runtime.device = {runtime.device!r} but CUDA is not available here; use cpu")
    index = runtime.device.removeprefix("cuda:")
    if index != runtime.device and int(index) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise PeftEditError(f"runtime.device = {runtime.device!r} but this machine has {count} CUDA device(s)")
    if runtime.device == "mps" and not torch.backends.mps.is_available():
        raise PeftEditError("runtime.device = 'mps' but Apple's MPS is not available here; use cpu")
    return torch.device(runtime.device)


def resolve_dtype(runtime: RuntimeConfig, device: torch.device) -> torch.dtype:
    """Half precision on CUDA, fp32 elsewhere, unless the runtime config names one."""
    if runtime.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[runtime.dtype]


def load_model(
    model: str | Path | None,
    runtime: RuntimeConfig | None = None,
    single_file_config: str | None = None,
    announce_demo: bool = True,
):
    """Load a Stable Diffusion pipeline (SD 1.x/2.x or SDXL) from a hub id, a diffusers folder or one
    ``.safetensors`` checkpoint.

    Returns a :class:`Model` on the runtime's device and dtype with the attention backend, VAE slicing, the UNet's
    memory format and its compilation set; with ``runtime.offload_idle`` its parts are on the CPU, in that dtype,
    until the library places each one on the device as it runs (:meth:`Model.place`).
    ``announce_demo``: say in one line that the demo model is used (off when the demo was recorded as an edit's base
    model).
    """
    from diffusers import DDIMScheduler
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    if runtime is not None and not isinstance(runtime, RuntimeConfig):
        raise TypeError(f"runtime must be a RuntimeConfig (or None for the defaults), not {type(runtime).__name__}")
    runtime = runtime or RuntimeConfig()
    device = resolve_device(runtime)
    dtype = resolve_dtype(runtime, device)
    name = DEMO_NAME if model is None else str(model)
    path = Path(name).expanduser()
    if name == DEMO_NAME:
        if announce_demo:
            log.warning(
                "using the built-in demo model (a tiny world of coloured shapes); for Stable Diffusion give a hub id, "
                f"folder or .safetensors file as {MODEL_OPTION}, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5"
            )
        path = demo_model_dir()
        if not (path / "model_index.json").is_file():
            raise PeftEditError(f"the demo model is not installed at {path}; pass {MODEL_OPTION}")
    elif path.exists():
        name = str(path.resolve())  # recorded in edits as their base: found again from any working folder
    kwargs: dict = {"dtype": dtype}
    configs = None  # a single checkpoint file's
    is_single_file = path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES
    # not for a model that is not there: its own "not found" is the one thing to say ("not one" misled for a typo)
    if single_file_config and not is_single_file and (path.exists() or hub.is_hub_id(name) or name == DEMO_NAME):
        log.warning("%s is only for a single .safetensors checkpoint; %s is not one: ignored", CONFIGS_OPTION, name)
    try:
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise PeftEditError(f"{path}: pickle checkpoints are not loaded (unsafe); convert it to .safetensors")
        if is_single_file:
            if path.suffix not in SINGLE_FILE_SUFFIXES:  # diffusers would unpickle it (refused: a long traceback)
                raise PeftEditError(
                    f"{path}: diffusers reads a file as safetensors by its lower-case suffix alone; "
                    f"rename it to {path.stem}.safetensors"
                )
            names = _check_whole_checkpoint(path)
            configs = _checkpoint_configs(path, single_file_config)
            pipeline = pipeline_class(_single_file_kind(path, names, configs.folder, configs.source))
            pipe = pipeline.from_single_file(
                str(path), config=configs.folder, local_files_only=True, **kwargs, **_extra_kwargs(pipeline)
            )
        elif path.is_dir():
            if (path / "edit.safetensors").is_file():
                raise PeftEditError(f"{path} is a peftedit edit, not a model: render it with peftedit edit {path}")
            if not (path / "model_index.json").is_file():
                raise PeftEditError(f"{path} is not a diffusers model folder (no model_index.json)")
            pipeline = pipeline_class(_folder_kind(str(path)))
            _no_pickled_weights(path)
            # use_safetensors: without it diffusers falls back to a folder's pickled .bin weights
            pipe = pipeline.from_pretrained(str(path), use_safetensors=True, **kwargs, **_extra_kwargs(pipeline))
        elif path.exists():
            raise PeftEditError(f"model {name!r}: not a diffusers folder, a .safetensors file or a hub id")
        elif not hub.is_hub_id(name):
            raise PeftEditError(f"model {name!r} not found: no such folder or file (nor a hub id, owner/name)")
        else:
            pipe = hub.load(name, functools.partial(_from_hub, name, kwargs))
    except PeftEditError:
        raise
    # A broken folder fails in many ways; a file without a part's weights (a VAE or LoRA file) in diffusers' own.
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SingleFileComponentError) as err:
        said = f"could not load model {name!r}: {type(err).__name__}: {first_line(err)}"
        if path.is_file() and not single_file_config:
            said += f"; a single checkpoint file's configs come from {CONFIGS_OPTION}, a diffusers folder or hub id"
        raise PeftEditError(said) from err
    if is_xl(pipe):
        _check_xl_parts(pipe, name)
    channels, latent = pipe.unet.config.in_channels, pipe.vae.config.latent_channels
    if channels != latent:
        raise PeftEditError(
            f"model {name!r}: its UNet takes {channels} input channels, not the {latent} of an image latent "
            "(an inpainting or image-conditioned model?); use a text-to-image model"
        )
    # DDIM is what both methods are defined with; keep the model's own betas and prediction_type.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if not runtime.offload_idle:  # with it the parts stay on the CPU they load onto, each placed when it runs
        pipe.to(device)
    if is_xl(pipe) and dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's own VAE overflows float16 (its config says so): diffusers upcasts it too
    pipe.set_progress_bar_config(disable=True)
    set_attention(pipe.unet, runtime.attention, device)
    if runtime.vae_slicing:
        pipe.vae.enable_slicing()
    if runtime.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if runtime.compile:
        pipe.unet.compile()
    for part in text_parts(pipe) + [pipe.unet, pipe.vae]:
        part.requires_grad_(False)
        part.eval()
    recorded = configs.recorded if configs else None
    return Model(pipe=pipe, name=name, device=device, dtype=dtype, runtime=runtime, single_file_config=recorded)


# Architectures peftedit runs: a pipeline class name containing "XL" loads as SDXL, any other as SD 1.x/2.x.
SD, SDXL = "sd", "sdxl"


def pipeline_class(kind: str):
    """The diffusers pipeline class for ``kind`` (``SD`` or ``SDXL``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if kind == SDXL else StableDiffusionPipeline


def _extra_kwargs(pipeline) -> dict:
    """Loading keywords only one of the pipeline classes takes (no safety checker, no watermark)."""
    if pipeline.__name__ == "StableDiffusionXLPipeline":
        return {"add_watermarker": False}
    return {"safety_checker": None, "requires_safety_checker": False}


def _kind_of(class_name: str) -> str:
    return SDXL if "XL" in class_name else SD


def _folder_kind(folder: str, local_files_only: bool = False) -> str:
    """The architecture of a diffusers folder or hub id, from its ``model_index.json``."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(folder, local_files_only=local_files_only)
    return _kind_of(config.get("_class_name", ""))


def _from_hub(name: str, kwargs: dict, local_files_only: bool):
    """A hub id's pipeline, from the local cache only or from the hub (safetensors weights either way)."""
    pipeline = pipeline_class(_folder_kind(name, local_files_only))
    return pipeline.from_pretrained(
        name, use_safetensors=True, local_files_only=local_files_only, **kwargs, **_extra_kwargs(pipeline)
    )


class CheckpointConfigs(NamedTuple):
    """The diffusers configs a single checkpoint file loads with."""

    folder: str  # local
    recorded: str | None  # in edits: the folder or hub id given (a folder absolute, like a model's); None: guessed
    source: str  # where they came from, for errors


def _checkpoint_configs(path: Path, given: str | None) -> CheckpointConfigs:
    """The diffusers configs for the single checkpoint ``path``, in a local folder.

    ``given`` (``--single-file-config``) is a folder, used as it is, or a hub id; without it the hub id is
    diffusers' guess from the file's tensors (SD 1.5, SD 2.x, SDXL base, ...). A hub id's configs (no weights) come
    from the local Hugging Face cache when it holds them, with no request (diffusers' own loader asks the hub first,
    and offline retries for most of a minute); else they are downloaded, after a one-line error when the hub
    cannot be reached.
    """
    if given:
        folder = Path(given).expanduser()
        if folder.is_dir():
            folder = str(folder.resolve())
            return CheckpointConfigs(folder, folder, f"{CONFIGS_OPTION} {folder}")
        if folder.exists() or not hub.is_hub_id(given):
            raise PeftEditError(f"{CONFIGS_OPTION} {given!r}: no such folder (nor a hub id, owner/name)")
    repo = given or _guessed_configs(path)
    snapshot = hub.load(
        repo,
        functools.partial(_config_snapshot, repo),
        what=f"{repo!r} (the configs of {path.name}{'' if given else ', guessed from its tensors'})",
        instead=f"pass {CONFIGS_OPTION} with a local diffusers folder of the file's architecture",
    )
    source = f"{CONFIGS_OPTION} {given}" if given else f"diffusers' guess of its configs, {repo},"
    return CheckpointConfigs(snapshot, given, source)


def _config_snapshot(repo: str, local_files_only: bool) -> str:
    """The local folder of hub id ``repo``'s configs (JSON and tokenizer files), from the cache only with
    ``local_files_only``."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo, allow_patterns=CONFIG_PATTERNS, local_files_only=local_files_only))
    index = folder / "model_index.json"
    parts = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}
    missing = [name for name, entry in parts.items() if isinstance(entry, list) and None not in entry]
    missing = [name for name in missing if not any((folder / name).glob("*.json"))]
    if not index.is_file() or missing:  # a partial snapshot (another download stopped early): fetch the rest
        raise FileNotFoundError(f"{folder}: configs missing for {missing or ['model_index.json']}")
    return str(folder)


def _guessed_configs(path: Path) -> str:
    """The hub id whose configs diffusers' single-file loader takes for ``path`` when given none."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    with _open_checkpoint(path) as checkpoint:
        return fetch_diffusers_config(_Tensors(checkpoint))["pretrained_model_name_or_path"]


class _Tensors(Mapping):
    """A checkpoint file's tensors by name, each read only when asked for (a guess reads a few)."""

    def __init__(self, checkpoint):
        self._checkpoint, self._names = checkpoint, set(checkpoint.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._checkpoint.get_tensor(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@contextlib.contextmanager
def _open_checkpoint(path: Path):
    """``path`` opened with safetensors (only its header read), or a one-line error."""
    from safetensors import SafetensorError, safe_open

    try:
        checkpoint = safe_open(str(path), framework="pt")
    except SafetensorError as err:
        raise PeftEditError(f"{path}: not a readable .safetensors checkpoint ({first_line(err)})") from err
    with checkpoint:
        yield checkpoint


def _check_whole_checkpoint(path: Path) -> list[str]:
    """The tensor names of ``path``; raises for a .safetensors file that is not a whole checkpoint in the original
    layout (an edit's file, a LoRA, a VAE or a diffusers part's weights) before its configs are looked for:
    diffusers' guess for such a file is SD 1.5, so the error was about fetching SD 1.5's configs, which would not
    have helped."""
    with _open_checkpoint(path) as checkpoint:
        names, header = list(checkpoint.keys()), checkpoint.metadata() or {}
    whole = any(name.startswith(LDM_UNET_PREFIX) for name in names)
    in_edit = (path.parent / "edit.safetensors").is_file()
    # The folder tells only for a file that is no checkpoint: a whole one beside an edit's file is still a model.
    if not whole and in_edit:
        raise PeftEditError(
            f"{path} is part of a peftedit edit, not a model: render the edit with peftedit edit {path.parent}"
        )
    if "peftedit.format_version" in header:  # an edit's file moved out of its folder: the one it is in is no edit
        raise PeftEditError(
            f"{path} is a peftedit edit's file, not a model: render the edit folder it came from with peftedit edit"
        )
    if not whole:
        raise PeftEditError(
            f"{path} is not a whole Stable Diffusion checkpoint in the original layout (no {LDM_UNET_PREFIX}* "
            "tensors: a LoRA, a VAE, or one part of a diffusers folder?); give a full checkpoint, a diffusers folder "
            "or a hub id"
        )
    return names


def _single_file_kind(path: Path, names: list[str], configs: str, source: str) -> str:
    """The architecture of the single checkpoint ``path``: its configs' (a local folder, named ``source`` in errors),
    when the file's tensor ``names`` do not say otherwise (the original layouts' text-encoder prefixes tell SDXL from
    SD)."""
    said = {SDXL: "conditioner.embedders.", SD: "cond_stage_model."}
    found = next((kind for kind, prefix in said.items() if any(n.startswith(prefix) for n in names)), None)
    kind = _folder_kind(configs)
    if found is not None and found != kind:
        raise PeftEditError(
            f"{path} is an {found.upper()} checkpoint but {source} is an {kind.upper()} pipeline; "
            f"give the configs of the file's architecture with {CONFIGS_OPTION}"
        )
    return kind


def _check_xl_parts(pipe, name: str) -> None:
    """Refuse SDXL pipelines whose UNet wants other added conditions than SDXL base's (pooled text + 6 sizes)."""
    unet = pipe.unet.config
    if pipe.text_encoder is None or pipe.config.get("requires_aesthetics_score", False):
        raise PeftEditError(f"model {name!r} is an SDXL refiner (no first text encoder): use an SDXL base model")
    wanted = unet.projection_class_embeddings_input_dim
    given = pipe.text_encoder_2.config.projection_dim + SIZE_CONDITIONS * unet.addition_time_embed_dim
    if unet.addition_embed_type != "text_time" or wanted != given:
        raise PeftEditError(
            f"model {name!r}: its UNet's added conditions ({unet.addition_embed_type}, {wanted} values) are not "
            f"SDXL base's (text_time: pooled text and {SIZE_CONDITIONS} sizes, {given} values)"
        )


def is_xl(pipe) -> bool:
    """Whether ``pipe`` is an SDXL pipeline (two text encoders; pooled text and size conditioning)."""
    return hasattr(pipe, "text_encoder_2")


# A pipeline's text encoders by attribute name: SD has the first, SDXL both.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# The parts that hold weights and run on the device (``Model.place`` moves them).
PARTS = ("unet", "vae", *TEXT_ENCODERS)


def pipe_parts(pipe, names) -> dict:
    """The parts of ``pipe`` named in ``names`` that it has, by name, in that order (SD has no ``text_encoder_2``, an
    SDXL refiner no ``text_encoder``)."""
    found = {name: getattr(pipe, name, None) for name in names}
    return {name: part for name, part in found.items() if part is not None}


def text_parts(pipe) -> list:
    """The pipeline's text encoders that are present (one for SD, two for SDXL)."""
    return list(pipe_parts(pipe, TEXT_ENCODERS).values())


def set_attention(unet, backend: str, device: torch.device) -> str:
    """Install a memory-efficient attention processor on every UNet layer; returns the backend used."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    has_xformers = importlib.util.find_spec("xformers") is not None
    if backend == "xformers" and not (has_xformers and device.type == "cuda"):
        raise PeftEditError("runtime.attention = 'xformers' needs the xformers package and a CUDA device")
    if backend == "xformers" or (backend == "auto" and has_xformers and device.type == "cuda"):
        try:
            unet.enable_xformers_memory_efficient_attention()  # diffusers tries one xformers call first
            return "xformers"
        except Exception as err:  # an xformers built for another torch or CUDA fails in many ways
            reason = first_line(err)
            if backend == "xformers":
                raise PeftEditError(f"runtime.attention = 'xformers': xformers does not work here ({reason})") from err
            log.warning("xformers is installed but does not work here (%s); using PyTorch SDPA", reason)
    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def _base_weights(pipe) -> list[tuple[str, torch.Tensor]]:
    """The UNet and text encoders' own weights by name, in a fixed order, ignoring any LoRA wrapping."""
    out = []
    for prefix, module in pipe_parts(pipe, ("unet", *TEXT_ENCODERS)).items():
        for name, tensor in module.state_dict().items():
            if "lora_" not in name:
                out.append((f"{prefix}.{name.replace('.base_layer', '')}", tensor))
    return sorted(out, key=lambda item: item[0])


def probe_indices(numel: int) -> torch.Tensor:
    """``PROBE_PER_TENSOR`` evenly spaced positions in a tensor of ``numel`` values, first and last included.

    Integer arithmetic: a float32 ``linspace`` rounds ``numel - 1`` up past the end for tensors over 2**24 values (SD's
    49408 x 768 token embedding), and rounds some inner positions differently for large tensors. For the demo model's
    tensors both give the same positions (tested), so edits made on it before still match.
    """
    return torch.arange(PROBE_PER_TENSOR) * (numel - 1) // (PROBE_PER_TENSOR - 1)


def weight_probe(pipe) -> torch.Tensor:
    """A few values from every UNet and text-encoder weight, in a fixed order, as fp32 on CPU."""
    values = []
    for _, tensor in _base_weights(pipe):
        flat = tensor.detach().reshape(-1)
        values.append(flat[probe_indices(flat.numel()).to(flat.device)].float().cpu())
    return torch.cat(values)


def architecture_hash(pipe) -> str:
    """sha256 of the UNet and text encoder's parameter names and shapes."""
    digest = hashlib.sha256()
    for name, tensor in _base_weights(pipe):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
    return digest.hexdigest()


def fingerprint(pipe) -> tuple[str, torch.Tensor]:
    """(id, probe): a short id of the base weights for display, and the probe to compare loads with tolerance."""
    probe = weight_probe(pipe)
    digest = hashlib.sha256(architecture_hash(pipe).encode())
    digest.update(probe.to(torch.bfloat16).float().numpy().round(2).tobytes())
    return digest.hexdigest()[:16], probe


def check_same_base(pipe, model_name: str, saved_name: str, saved_arch: str, saved_probe: torch.Tensor) -> None:
    """Raise :class:`ArtifactError` naming both models when ``pipe`` is not the base an artifact was made on."""
    same = built_alike = architecture_hash(pipe) == saved_arch
    if built_alike:
        probe = weight_probe(pipe)
        same = probe.shape == saved_probe.shape and torch.allclose(probe, saved_probe, rtol=PROBE_RTOL, atol=1e-3)
    if not same:
        what = "different weights" if built_alike else "a different architecture"
        raise ArtifactError(
            f"base model mismatch: the edit was made on {saved_name!r} but the loaded model is {model_name!r} "
            f"({what}); pass {MODEL_OPTION} with the original base model"
        )
