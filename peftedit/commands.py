"""What each ``peftedit`` command does, from its parsed arguments to the files it writes: checks before any work
(paths, numbers, prompts; before the model loads), then the Python API. ``cli`` parses and reports errors."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from .artifact_checks import INVERSIONS as NULLTEXT_METHODS
from .files import NAME_MAX, cut_to_bytes, finite_json, save_image_atomic, slug

# Picture formats -o may name (Pillow writes each from the RGB pictures peftedit makes).
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def check_creatable(path: Path) -> None:
    """Raise unless ``path`` can be made: no name in it is longer than a file name may be, and the nearest existing
    folder above it is a folder we may write in."""
    from .errors import PeftEditError

    longest = _name_max(path)
    for name in path.parts:
        size = len(os.fsencode(name))
        if size > longest:
            raise PeftEditError(
                f"cannot write {path}: a name in it is {size} bytes, longer than a file name may be here ({longest})"
            )
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise PeftEditError(f"cannot write {path}: {parent} is a file, not a folder")
            try:  # a real file, not os.access: root passes that for /proc and for folders it cannot write in
                with tempfile.TemporaryFile(dir=parent, prefix=".peftedit-probe-"):
                    pass
            except OSError as err:
                raise PeftEditError(f"cannot write {path}: {parent} is not writable ({err.strerror})") from None
            return


def _name_max(path: Path) -> int:
    """The most bytes a file name may take where ``path`` would be made (its file system's, else ``NAME_MAX``)."""
    existing = next((p for p in path.absolute().parents if os.path.exists(p)), Path("/"))  # os.path: no raising
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or no answer
        return NAME_MAX


def check_picture_output(path: str | Path, overwrite: bool) -> Path:
    """``path`` as a picture to write, checked before any work: a known format, not a folder, not an existing file
    unless ``overwrite``, and creatable."""
    from .errors import PeftEditError

    path = Path(path)
    check_creatable(path)  # first: a name too long for a file makes is_dir and exists raise
    if path.is_dir():
        raise PeftEditError(f"{path} is a folder; give a file name such as {path / 'edit.png'}")
    if path.suffix.lower() not in PICTURE_SUFFIXES:
        raise PeftEditError(f"{path}: name a picture file ({', '.join(PICTURE_SUFFIXES)})")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass --overwrite")
    return path


def free_name(path: Path) -> Path:
    """``path``, or the first of ``<stem>-2<suffix>``, ``-3``… that does not exist (for default picture names, so
    rendering an edit again with other settings does not stop at the first picture)."""
    number = 1
    candidate = path
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


# The most bytes of a default picture name: a file name takes 255, and free_name's "-2", "-3"… and write_atomic's
# hidden temporary name (".<name>.partial-xxxxxxxx.png") add to it.
DEFAULT_NAME_BYTES = 200


def _fitted(stem: str, suffix: str = ".png") -> str:
    """``stem + suffix``, the stem cut so the name takes at most ``DEFAULT_NAME_BYTES`` bytes (UTF-8): an edit
    folder's name and a prompt's, each 60 characters of a non-Latin script (3 bytes each), made a name over 255."""
    stem = cut_to_bytes(stem, DEFAULT_NAME_BYTES - len(suffix.encode()))
    return f"{stem.rstrip('-_')}{suffix}"


def check_sampling_args(args) -> None:
    """The numbers a render takes (--eta, --seed, --guidance, --steps; eta and seed may be lists), checked before
    the model loads."""
    from .config import check_sampling

    listed = lambda value: value if isinstance(value, list) else [value]  # noqa: E731
    for eta in listed(getattr(args, "eta", None)):
        check_sampling("--", eta=eta)
    for seed in listed(args.seed):
        check_sampling("--", seed=seed)
    check_sampling("--", guidance=args.guidance, steps=args.steps)


def runtime_sets(items: list[str], command: str) -> dict:
    """The runtime settings ``--set`` gives a command that trains nothing, parsed and checked as a recipe's; a
    training setting (seed, optimizer…) is refused rather than ignored."""
    from .config import LOAD_TIME_SETTINGS, RuntimeConfig, build

    parsed = build({"runtime": RuntimeConfig}, None, items)["runtime"]
    keys = [item.partition("=")[0].strip().removeprefix("runtime.") for item in items]
    for key in keys:
        if key not in LOAD_TIME_SETTINGS:
            raise ValueError(
                f"--set runtime.{key}: {command} trains nothing, so only these runtime settings apply: "
                f"{', '.join(LOAD_TIME_SETTINGS)}"
            )
    return {key: getattr(parsed, key) for key in keys}


def recipe_sections() -> dict[str, type]:
    """Every table a recipe file may hold, by name."""
    from .config import RuntimeConfig
    from .methods.imagic import ImagicConfig
    from .methods.nulltext import NullTextConfig

    return {"runtime": RuntimeConfig, "imagic": ImagicConfig, "nulltext": NullTextConfig}


def _sections(*names: str) -> dict[str, type]:
    known = recipe_sections()
    return {name: known[name] for name in names}


def _prepare(args, table: str, flags: dict[str, str], prompt: str):
    """Configs from recipe, --set and the command's own flags; the output folder (checked: see check_replaceable); the
    model. The photo, the prompt and the output are checked before the model loads."""
    from .artifacts import check_replaceable, edit_path
    from .config import build
    from .diffusion import require_text
    from .images import open_image
    from .methods.common import check_steps
    from .models import load_model

    overrides = list(args.set)
    overrides += [f"{key}={getattr(args, flag)}" for flag, key in flags.items() if getattr(args, flag) is not None]
    configs = build(_sections("runtime", table), args.recipe, overrides)
    require_text(prompt)  # first: an empty prompt's default folder is the photo's name, maybe taken already
    output = edit_path(args.output or Path("adapters") / slug(Path(args.image).stem, prompt))
    check_replaceable(output, args.overwrite)
    check_creatable(output)
    # The photo and the prompt are checked before the model loads (minutes for Stable Diffusion).
    open_image(args.image)
    model = load_model(args.model, configs["runtime"], args.single_file_config)
    check_steps(model, *configs[table].sampling_steps())  # fit checks it too; here before the photo is encoded
    return configs, output, model


def cmd_imagic(args) -> int:
    from .methods import imagic

    flags = {
        "embedding_steps": "imagic.embedding_steps",
        "finetune_steps": "imagic.finetune_steps",
        "seed": "runtime.seed",
    }
    configs, output, model = _prepare(args, "imagic", flags, args.text)
    artifact = imagic.fit(
        model, args.image, args.text, configs["imagic"], configs["runtime"], show_progress=not args.quiet
    )
    artifact.save(output, overwrite=args.overwrite)
    # None: a stage of 0 steps
    losses = {key: "skipped" if v is None else f"{v:.4f}" for key, v in artifact.meta["losses"].items()}
    print(
        f"saved {output} (final losses: embedding {losses['embedding']}, LoRA {losses['finetune']}); "
        f"preview: {output / 'preview.png'}"
    )
    return 0


# Edit flags that only an inversion (Prompt-to-Prompt) uses.
P2P_FLAGS = ("p2p", "blend", "blend_mask", "reweight", "cross_replace", "self_replace", "save_attention")


def cmd_edit(args) -> int:
    from .artifacts import Artifact
    from .base import load_base
    from .diffusion import require_text

    artifact = Artifact.load(args.folder)
    name = Path(args.folder).resolve().name  # "." names the folder it is
    if artifact.method == "imagic":
        if args.target:
            raise ValueError("an Imagic edit renders its own target text; drop the prompt (use --eta to vary it)")
        given = [f"--{flag.replace('_', '-')}" for flag in P2P_FLAGS if getattr(args, flag) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: Prompt-to-Prompt options are for inversions, not Imagic edits")
        seeds = args.seed or [0]
        etas = args.eta or [artifact.meta["recipe"]["imagic"]["eta"]]
        default = _fitted(f"{name}-eta{'_'.join(f'{e:g}' for e in etas)}-seed{'_'.join(map(str, seeds))}")
    elif artifact.method in NULLTEXT_METHODS:
        if args.eta is not None:
            raise ValueError("--eta is for Imagic edits; edit an inversion with a target prompt")
        if args.seed is not None:
            logging.getLogger("peftedit").warning(
                "--seed has no effect on an inversion's edit (DDIM here is deterministic)"
            )
        default = _fitted(f"{name}-{slug(args.target)}" if args.target else f"{name}-reconstruction")
    else:
        raise ValueError(f"{args.folder}: unknown method {artifact.method!r}")
    check_sampling_args(args)
    if args.target is not None:
        require_text(args.target, "the target prompt", " (or leave it out)")
    control = _control(args) if artifact.method != "imagic" else None
    output = check_picture_output(args.output or free_name(_outside(args.folder) / default), args.overwrite)
    if args.save_attention:
        maps_to = check_picture_output(args.save_attention, args.overwrite)
        if maps_to.resolve() == output.resolve():
            raise ValueError(f"--save-attention and -o both name {output}; give the attention maps their own file")
    pictures = [output, maps_to] if args.save_attention else [output]
    for path in (picture for picture in pictures if _within(picture, args.folder)):
        logging.getLogger("peftedit").warning(
            "%s is inside the edit folder: --overwrite will no longer replace the folder while it holds other files",
            path,
        )
    given = runtime_sets(args.set, "edit")
    model = load_base(artifact, args.model, args.single_file_config, given, args.folder)
    show = not args.quiet
    if artifact.method == "imagic":
        image = _imagic_pictures(model, artifact, etas, seeds, args.guidance, args.steps, show)
    else:
        image = _edit_inversion(args, model, artifact, control)
    print(f"wrote {save_image_atomic(image, output)}")
    return 0


def _within(path: Path, folder: str | Path) -> bool:
    """Whether ``path`` lies inside ``folder`` (their real paths)."""
    return Path(folder).resolve() in Path(path).resolve().parents


def _imagic_pictures(model, artifact, etas: list[float], seeds: list[int], guidance, steps, show: bool):
    """One render, or for several etas or seeds a grid: a row per seed, a column per eta, each labelled."""
    from .methods import imagic

    if len(etas) == len(seeds) == 1:
        return imagic.render(model, artifact, etas[0], seeds[0], guidance=guidance, steps=steps, show_progress=show)
    return imagic.render_grid(model, artifact, etas, seeds, guidance=guidance, steps=steps, show_progress=show)


def cmd_batch(args) -> int:
    from . import batch
    from .config import build, count
    from .models import load_model

    if args.limit is not None:
        count("--limit", args.limit)
    table = batch.recipe_table(args.method)
    overrides = [*args.set] + ([f"nulltext.method={args.method}"] if table == "nulltext" else [])
    configs = build(_sections("runtime", table), args.recipe, overrides)
    items = batch.read_list(args.list, args.images, args.method, args.limit)
    output = Path(args.output or Path("adapters") / slug(Path(args.list).stem, args.method))
    batch.check_batch_folder(output)
    check_creatable(output / batch.SUMMARY_FILE)
    model = load_model(args.model, configs["runtime"], args.single_file_config)
    records = batch.run(model, items, configs[table], configs["runtime"], output, args.overwrite, not args.quiet)
    counts = batch.tally(records)
    print(
        f"{output}: {counts[batch.DONE]} done, {counts[batch.EARLIER]} done earlier, {counts[batch.FAILED]} failed "
        f"of {len(records)}; summary: {output / batch.SUMMARY_FILE}"
    )
    return 1 if counts[batch.FAILED] else 0


def cmd_invert(args) -> int:
    from .methods import nulltext

    flags = {
        "method": "nulltext.method",
        "steps": "nulltext.steps",
        "inner_steps": "nulltext.inner_steps",
        "guidance": "nulltext.guidance",
        "pivot_noise": "nulltext.pivot_noise",
        "seed": "nulltext.seed",
    }
    configs, output, model = _prepare(args, "nulltext", flags, args.source)
    if args.seed is not None and configs["nulltext"].pivot_noise == 0:
        logging.getLogger("peftedit").warning("--seed has no effect with pivot_noise 0 (DDIM inversion is exact)")
    artifact = nulltext.invert(
        model, args.image, args.source, configs["nulltext"], configs["runtime"], show_progress=not args.quiet
    )
    artifact.save(output, overwrite=args.overwrite)
    losses = artifact.meta["losses"]
    print(
        f"saved {output} ({artifact.method}, {artifact.meta['steps']} steps; reconstruction PSNR "
        f"{losses['psnr']:.2f} dB, latent MSE {losses['latent_error']:.3g}); preview: {output / 'preview.png'}"
    )
    return 0


def _control(args):
    """The Prompt-to-Prompt control the edit flags ask for (checked), or None for the defaults."""
    from .methods import p2p

    if args.blend_mask == "attention" and not args.blend:  # as Control's default it asks for nothing: no blend
        raise ValueError("--blend-mask attention keeps what lies outside the --blend words' attention: give the words")
    chosen = {
        "mode": args.p2p,
        "blend": args.blend,
        "blend_mask": args.blend_mask,
        "reweight": p2p.parse_reweight(args.reweight) or None,
        "cross_replace": args.cross_replace,
        "self_replace": args.self_replace,
    }
    chosen = {k: v for k, v in chosen.items() if v is not None}
    return p2p.Control(**chosen) if chosen else None


def _edit_inversion(args, model, artifact, control):
    """A Prompt-to-Prompt edit (or, with no target, input | reconstruction)."""
    from .images import grid
    from .methods import nulltext, p2p
    from .methods.common import decode_pictures

    result = nulltext.run_edit(
        model,
        artifact,
        args.target,
        control,
        steps=args.steps,
        guidance=args.guidance,
        maps=bool(args.save_attention),
        show_progress=not args.quiet,
    )
    image = result.image
    if len(result.images) == 1:
        source = decode_pictures(model, artifact.tensors["z_0"])[0]
        image = grid([source, result.image], ["input (VAE)", "reconstruction"])
    if args.save_attention:
        maps = p2p.attention_grid(model.pipe.tokenizer, result.prompts[-1], result.maps[-1], result.image)
        print(f"wrote {save_image_atomic(maps, args.save_attention)}")
    return image


def _outside(folder: str | Path) -> Path:
    """Where ``edit`` writes its default picture: the current folder, or beside the edit folder when run inside it (a
    picture in an edit folder would stop ``--overwrite`` from replacing the edit)."""
    here, edit = Path.cwd().resolve(), Path(folder).resolve()
    return edit.parent if here == edit or edit in here.parents else Path()


def describe(artifact, folder: str | Path) -> dict:
    """What ``inspect`` shows: method, prompts, base model, recipe, tensor shapes, files."""
    meta = artifact.meta
    return {
        "folder": str(folder),
        "method": artifact.method,
        "prompts": meta.get("prompts"),
        "base_model": meta.get("base_model"),
        "base_model_config": meta.get("base_model_config"),
        "base_pipeline": meta.get("base_pipeline"),
        "base_fingerprint": meta.get("base_fingerprint"),
        "resolution": meta.get("resolution"),
        "image": meta.get("image"),
        "created": meta.get("created"),
        "versions": meta.get("versions"),
        "losses": meta.get("losses"),
        "recipe": meta.get("recipe"),
        "tensors": {k: list(v.shape) for k, v in artifact.tensors.items()},
        "lora": artifact.lora_config,
        "files": sorted(p.name for p in Path(folder).iterdir()),
    }


def cmd_inspect(args) -> int:
    from .artifacts import Artifact

    info = describe(Artifact.load(args.folder), args.folder)
    if args.json:
        print(json.dumps(finite_json(info), indent=2, sort_keys=True, allow_nan=False))
        return 0
    shown = ("folder", "method", "prompts", "base_model", "base_model_config", "base_pipeline", "base_fingerprint")
    for key in (*shown, "resolution"):
        if key not in ("base_model_config", "base_pipeline") or info[key]:  # single files' edits; newer edits
            print(f"{key:17} {_pairs(info[key]) if isinstance(info[key], dict) else info[key]}")
    print(f"{'created':17} {info['created']}")
    print(f"{'losses':17} {_pairs(info['losses'], measured=True)}")
    image = info["image"] or {}
    print(f"{'image':17} {image.get('name')} {image.get('size')} {image.get('mode')} sha256 {image.get('sha256')}")
    for name, shape in info["tensors"].items():
        print(f"{'tensor':17} {name} {shape}")
    if info["lora"]:
        lora = info["lora"]
        print(f"{'lora':17} rank {lora['r']}, alpha {lora['lora_alpha']}, {len(lora['target_modules'])} target names")
    for section, values in (info["recipe"] or {}).items():
        print(f"{'recipe.' + section:17} " + ", ".join(f"{k}={v}" for k, v in values.items()))
    print(f"{'files':17} {', '.join(info['files'])}")
    return 0


def _pairs(values: dict | None, measured: bool = False) -> str:
    """``key=value, ...`` for ``inspect``'s prompts (quoted: they hold spaces) and ``measured`` numbers (losses, to 4
    significant digits; ``--json`` keeps every digit)."""

    def shown(value):
        if measured and isinstance(value, float):
            return f"{value:.4g}"
        return repr(value) if isinstance(value, str) else value

    return ", ".join(f"{k}={shown(v)}" for k, v in (values or {}).items())


def cmd_generate(args) -> int:
    from .config import RuntimeConfig
    from .diffusion import require_text
    from .generate import generate
    from .models import load_model

    runtime = RuntimeConfig(**runtime_sets(args.set, "generate"))
    output = check_picture_output(args.output or free_name(Path("generated.png")), args.overwrite)
    check_sampling_args(args)
    require_text(args.prompt)
    model = load_model(args.model, runtime, single_file_config=args.single_file_config)
    show = not args.quiet
    image = generate(model, args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance, show_progress=show)
    print(f"wrote {save_image_atomic(image, output)}")
    return 0
