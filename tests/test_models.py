"""Loading: the weight probes that identify an artifact's base model, and VAE slicing."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from cli_run import one_line_error, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peftedit import PeftEditError, RuntimeConfig, hub, load_model
from peftedit.demo import DEMO_MODEL_DIR
from peftedit.diffusion import decode_latents
from peftedit.models import PROBE_PER_TENSOR, probe_indices
from peftedit.tiny import build_pipeline

SD_TOKEN_EMBEDDING = 49408 * 768  # over 2**24 values: float32 cannot hold its last index


def test_probe_stays_inside_large_tensors():
    index = probe_indices(SD_TOKEN_EMBEDDING)
    assert index.dtype == torch.int64 and len(index) == PROBE_PER_TENSOR
    assert index[0] == 0 and index[-1] == SD_TOKEN_EMBEDDING - 1
    assert bool((index[1:] > index[:-1]).all())
    assert probe_indices(1).tolist() == [0] * PROBE_PER_TENSOR


def test_probe_positions_unchanged_for_the_demo_model():
    """Artifacts written before the integer positions used float32 linspace; on the demo model both agree."""
    sizes = set()
    for path in DEMO_MODEL_DIR.glob("*/*.safetensors"):
        with safe_open(str(path), "pt") as weights:
            sizes |= {weights.get_tensor(key).numel() for key in weights.keys()}
    assert len(sizes) > 10
    for numel in sizes:
        old = torch.linspace(0, numel - 1, PROBE_PER_TENSOR).long()
        assert torch.equal(probe_indices(numel), old), numel


def test_vae_slicing_is_on_by_default_and_decodes_the_same():
    sliced = load_model(None, RuntimeConfig(device="cpu"), announce_demo=False)
    batched = load_model(None, RuntimeConfig(device="cpu", vae_slicing=False), announce_demo=False)
    assert sliced.pipe.vae.use_slicing and not batched.pipe.vae.use_slicing
    side = sliced.pipe.unet.config.sample_size
    latents = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one_by_one, together = decode_latents(sliced.pipe, latents), decode_latents(batched.pipe, latents)
    for a, b in zip(one_by_one, together, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_a_broken_xformers_falls_back_to_sdpa_unless_asked_for(eps_model, monkeypatch, caplog):
    """An xformers that is installed but fails its first call (built for another torch or CUDA): ``auto`` warns and
    uses SDPA, ``xformers`` is a one-line error."""
    import importlib.util

    from diffusers.models.attention_processor import AttnProcessor2_0

    from peftedit.errors import PeftEditError
    from peftedit.models import set_attention

    unet = eps_model.pipe.unet
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "xformers" else real_find_spec(name, *a)
    )

    def broken():
        raise RuntimeError("No such operator xformers::efficient_attention_forward_cutlass\nmore detail")

    monkeypatch.setattr(unet, "enable_xformers_memory_efficient_attention", broken)
    assert set_attention(unet, "auto", torch.device("cuda")) == "sdpa"
    assert "xformers is installed but does not work here (No such operator" in caplog.text
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    with pytest.raises(PeftEditError, match=r"xformers does not work here \(No such operator [^\n]*\)$"):
        set_attention(unet, "xformers", torch.device("cuda"))


def test_an_inpainting_unet_is_refused_in_one_line(tokenizer_dir, tmp_path):
    """A UNet that takes more than the image latent (SD inpainting: 9 channels) cannot run either method."""
    from diffusers import UNet2DConditionModel

    pipe = build_pipeline(tokenizer_dir)
    pipe.register_modules(unet=UNet2DConditionModel(**{**pipe.unet.config, "in_channels": 9}))
    pipe.save_pretrained(tmp_path / "inpaint")
    with pytest.raises(PeftEditError, match="takes 9 input channels, not the 4 of an image latent"):
        load_model(str(tmp_path / "inpaint"), RuntimeConfig(device="cpu"))


def test_a_runtime_of_the_wrong_type_is_named_before_loading(eps_dir):
    with pytest.raises(TypeError, match="^runtime must be a RuntimeConfig \\(or None for the defaults\\), not dict$"):
        load_model(str(eps_dir), {"device": "cpu"})  # it was an AttributeError on .device


def test_single_file_configs_for_a_folder_are_said_to_be_ignored(eps_dir, caplog):
    load_model(str(eps_dir), RuntimeConfig(device="cpu"), single_file_config="somewhere")
    assert "--single-file-config (single_file_config) is only for a single .safetensors checkpoint" in caplog.text


def test_a_missing_checkpoint_with_its_configs_is_only_not_found(eps_dir, tmp_path, capsys):
    """A mistyped .safetensors path with --single-file-config warned that the configs were ignored because the file
    "is not" a single checkpoint, before the real error: not found."""
    missing = tmp_path / "v1-5-pruned-emaonly.safetensors"
    code, _, err = run_cli(capsys, "generate", "a", "--model", missing, "--single-file-config", eps_dir)
    one_line_error(code, err, f"model {str(missing)!r} not found")


def test_a_folder_with_pickled_weights_is_refused(eps_dir, tmp_path, capsys):
    """diffusers' from_pretrained falls back to a folder's .bin weights (torch.load) unless told safetensors only."""
    from peftedit.errors import PeftEditError

    pipe = load_model(str(eps_dir), RuntimeConfig(device="cpu")).pipe
    folder = tmp_path / "pickled"
    pipe.save_pretrained(folder, safe_serialization=False)
    assert list(folder.glob("unet/*.bin")) and not list(folder.glob("unet/*.safetensors"))
    with pytest.raises(PeftEditError, match=r"only pickled weights \(diffusion_pytorch_model.bin\), which are not"):
        load_model(str(folder), RuntimeConfig(device="cpu"))
    mixed = tmp_path / "mixed"  # one part pickled, the others safetensors
    pipe.save_pretrained(mixed, safe_serialization=True)
    for weights in (mixed / "vae").glob("*.safetensors"):
        weights.unlink()
    pipe.vae.save_pretrained(mixed / "vae", safe_serialization=False)
    with pytest.raises(PeftEditError, match="vae: only pickled weights"):
        load_model(str(mixed), RuntimeConfig(device="cpu"))
    # pickled beside a variant's safetensors: diffusers took the .bin unless told to load safetensors only
    variant = next((mixed / "vae").glob("*.bin")).with_name("diffusion_pytorch_model.fp16.safetensors")
    save_file({"x": torch.zeros(1)}, str(variant))
    with pytest.raises(PeftEditError, match="could not load model"):
        load_model(str(mixed), RuntimeConfig(device="cpu"))


def test_pickles_in_folders_peftedit_does_not_load_are_left_alone(eps_dir, tmp_path):
    """A training run's checkpoint-N/ (optimizer.bin, random_states_0.pkl) or an old safety_checker/ is not loaded."""
    folder = tmp_path / "trained"
    shutil.copytree(eps_dir, folder)
    for junk in ("checkpoint-500/optimizer.bin", "checkpoint-500/random_states_0.pkl", "safety_checker/model.bin"):
        (folder / junk).parent.mkdir(exist_ok=True)
        (folder / junk).write_bytes(b"not for us")
    pipe = load_model(str(folder), RuntimeConfig(device="cpu")).pipe
    for part in ("unet", "vae", "text_encoder"):  # the folder's own weights, all of them ("is not None" always held)
        saved = load_file(str(next((eps_dir / part).glob("*.safetensors"))))
        loaded = getattr(pipe, part).state_dict()
        assert saved.keys() <= loaded.keys() and all(torch.equal(loaded[k], v) for k, v in saved.items()), part


def test_hub_ids_load_safetensors_only(eps_dir, monkeypatch):
    """Without use_safetensors=True diffusers falls back to a repository's pickled .bin weights (unsafe to load),
    from the cache and from the hub alike."""
    from diffusers import StableDiffusionPipeline

    from peftedit import hub, models

    real, calls = StableDiffusionPipeline.from_pretrained, []

    def from_pretrained(cls, name, **kwargs):
        calls.append((name, kwargs))
        if kwargs.get("local_files_only") and len(calls) > 1:
            raise OSError("not in the cache")
        return real(str(eps_dir), **kwargs)

    monkeypatch.setattr(models, "_folder_kind", lambda name, local_files_only=False: models.SD)
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(hub, "reachable", lambda: True)
    load_model("someone/tiny-sd", RuntimeConfig(device="cpu"))  # in the cache
    load_model("someone/tiny-sd", RuntimeConfig(device="cpu"))  # not in the cache: downloaded
    assert [(name, kwargs["local_files_only"]) for name, kwargs in calls] == [
        ("someone/tiny-sd", True),
        ("someone/tiny-sd", True),
        ("someone/tiny-sd", False),
    ]
    assert all(kwargs["use_safetensors"] is True for _, kwargs in calls), calls


def test_a_name_that_is_neither_a_path_nor_a_hub_id_never_asks_the_hub(monkeypatch, tmp_path):
    """A mistyped folder ("sd15") or a deeper path that does not exist is no owner/name hub id: one line at once."""
    from peftedit import hub

    monkeypatch.setattr(hub, "load", lambda *args: pytest.fail(f"asked the hub for {args[0]!r}"))
    monkeypatch.chdir(tmp_path)
    for name in ("sd15", "models/sd/v1"):
        with pytest.raises(PeftEditError, match=f"^model '{name}' not found: no such folder or file"):
            load_model(name, RuntimeConfig(device="cpu"))
    (tmp_path / "notes.txt").write_text("not a model")  # there, but not a model: said so
    with pytest.raises(PeftEditError, match="^model '.*notes.txt': not a diffusers folder, a .safetensors file or a"):
        load_model("notes.txt", RuntimeConfig(device="cpu"))


def test_a_model_shipped_with_another_scheduler_samples_with_ddim_on_its_noise_schedule(eps_dir, tmp_path):
    """SD 1.5 ships PNDM: the pipe a user gets back (and its recorded scheduler) is DDIM with the model's betas."""
    import json

    from diffusers import DDIMScheduler

    folder = shutil.copytree(eps_dir, tmp_path / "pndm")
    for path, change in (
        (folder / "model_index.json", lambda d: d.update(scheduler=["diffusers", "PNDMScheduler"])),
        (folder / "scheduler" / "scheduler_config.json", lambda d: d.update(_class_name="PNDMScheduler")),
    ):
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    model = load_model(str(folder), RuntimeConfig(device="cpu"))
    scheduler, shipped = model.pipe.scheduler, json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert type(scheduler) is DDIMScheduler
    for key in ("beta_start", "beta_end", "beta_schedule", "prediction_type", "num_train_timesteps"):
        assert scheduler.config[key] == shipped[key], key


def test_single_file_configs_for_a_hub_id_are_said_to_be_ignored(monkeypatch, caplog):
    """A hub id is no path that exists here, yet it is a model: configs given with it are ignored, and said so."""

    def load(name, *args, **kwargs):
        raise PeftEditError(f"stopped before fetching {name}")

    monkeypatch.setattr(hub, "load", load)
    with pytest.raises(PeftEditError, match="stopped before fetching someone/model"):
        load_model("someone/model", RuntimeConfig(device="cpu"), single_file_config="somewhere")
    assert "is only for a single .safetensors checkpoint; someone/model is not one: ignored" in caplog.text
