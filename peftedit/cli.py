"""The ``peftedit`` command: parse arguments, run the command (``commands``), turn user errors into one line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import traceback

from . import __version__
from .artifact_checks import INVERSIONS as NULLTEXT_METHODS
from .commands import cmd_batch, cmd_edit, cmd_generate, cmd_imagic, cmd_inspect, cmd_invert, recipe_sections
from .config import shipped_recipes
from .errors import one_line, out_of_memory

DEBUG_HELP = "show tracebacks and details (every bad entry of a batch list)"
MODEL_HELP = "SD 1.x/2.x or SDXL: hub id, diffusers folder or .safetensors file (default: the demo model)"
SINGLE_FILE_CONFIG_HELP = (
    "diffusers config folder or hub id for a single .safetensors file (default: diffusers' guess from its tensors)"
)
EXAMPLES = {
    "imagic": """\
  peftedit imagic photo.png "a photo of a sitting dog" -o adapters/dog-sitting
  peftedit imagic photo.png "a photo of a sitting dog" --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --recipe sd15-8gb
  peftedit imagic photo.png "a photo of a sitting dog" --set imagic.lora_rank=16 --finetune-steps 400
  peftedit imagic photo.png "a photo of a sitting dog" --model stabilityai/stable-diffusion-xl-base-1.0 \\
      --recipe sdxl""",
    "invert": """\
  peftedit invert cat.png "a photo of a cat" -o adapters/cat              # null-text inversion
  peftedit invert cat.png "a photo of a cat" --method negative-prompt    # no optimisation: seconds, not minutes
  peftedit invert cat.png "a photo of a cat" --model model.safetensors   # one checkpoint file (configs guessed)
  peftedit invert cat.png "a photo of a cat" --model model.safetensors --single-file-config ./sd15-config""",
    "edit": """\
  peftedit edit adapters/dog-sitting --eta 0.7 --seed 3 -o sitting.png   # Imagic: vary eta and seed
  peftedit edit adapters/dog-sitting --eta 0.6,0.7,0.8 --seed 0,1,2      # a grid: a row per seed, a column per eta
  peftedit edit adapters/cat                                             # inversion: input | reconstruction
  peftedit edit adapters/cat "a photo of a tiger" --blend cat tiger -o tiger.png
  peftedit edit adapters/cat "a photo of a cat" --p2p reweight --reweight cat=2.0 -o more-cat.png
  peftedit edit adapters/circle "a large red circle on the right" --cross-replace 0 --self-replace 0  # move
  peftedit edit adapters/dog-sitting --set runtime.offload_idle=true     # only the part at work on the GPU""",
    "batch": """\
  peftedit batch tedbench/input_list.json --images tedbench/originals --recipe sd15-8gb --model <SD 1.5>
  peftedit batch pairs.json --method null-text -o adapters/pairs   # entries with "source" (and "target")
  peftedit batch pairs.json --limit 3                                # try the first three""",
    "inspect": """\
  peftedit inspect adapters/dog-sitting
  peftedit inspect adapters/dog-sitting --json""",
    "generate": """\
  peftedit generate "a large red circle on the left" --seed 1 -o circle.png
  peftedit generate "a photo of a dog" --model stable-diffusion-v1-5/stable-diffusion-v1-5 --steps 30
  peftedit generate "a photo of a dog" --model <SDXL> --set runtime.offload_idle=true   # SDXL in 8 GB""",
}
FOOTER = "With no --model, commands use the built-in demo model (coloured shapes). --debug shows tracebacks."
EPILOG = "examples:\n{}\n\n{}".format("\n".join(EXAMPLES[n] for n in ("imagic", "invert", "edit", "batch")), FOOTER)


def _listed(kind: type):
    """An option type for one value or several separated by commas ("0.6,0.7"); always a list. Commas, not spaces:
    an option taking several words would swallow the positional arguments after it."""

    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give {kind.__name__} values separated by commas") from None

    parse.__name__ = f"{kind.__name__} list"  # argparse names the type in its errors
    return parse


def _default(config: type, name: str):
    """The default of field ``name`` of the config dataclass ``config``: what the help shows, read from the code so
    that it cannot drift from it."""
    (default,) = [f.default for f in dataclasses.fields(config) if f.name == name]
    return default


def _set(text: str, key: str) -> str:
    """The help of a flag that sets the recipe key ``key``: ``text``, the key and its default."""
    section, _, name = key.partition(".")
    return f"{text} ({key}; default {_default(recipe_sections()[section], name)} unless the recipe sets it)"


def _control(text: str, name: str) -> str:
    """The help of an edit flag that sets ``p2p.Control.<name>``, with its default."""
    from .methods.p2p import Control

    return f"{text} (default {_default(Control, name)})"


def _add_model_args(p: argparse.ArgumentParser, tables: tuple[str, ...]) -> None:
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--single-file-config", help=SINGLE_FILE_CONFIG_HELP)
    names = ", ".join(shipped_recipes(tables))
    p.add_argument("--recipe", help=f"a shipped recipe ({names}) or a .toml path (default: none: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")


def _command(sub, name: str, help: str) -> argparse.ArgumentParser:
    epilog = f"examples:\n{EXAMPLES[name]}" + (f"\n\n{FOOTER}" if name != "inspect" else "")  # inspect loads no model
    p = sub.add_parser(name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    # also after the command (peftedit edit F --quiet); SUPPRESS keeps a value given before it
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return p


class _Parser(argparse.ArgumentParser):
    """argparse with peftedit's one-line errors (argparse prints its usage block, then "peftedit edit: error: ...");
    its subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"peftedit: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = _Parser(
        prog="peftedit",
        description="Edit real photos with a sentence; keep each edit as a small safetensors folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"peftedit {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices  # each command's parser, for errors found after parsing (see main)

    p = _command(sub, "imagic", "fit an Imagic edit (embedding + LoRA) to a photo")
    p.add_argument("image", help="input photo")
    p.add_argument("text", help="target text: the photo as it should become")
    _add_model_args(p, ("runtime", "imagic"))
    p.add_argument("-o", "--output", help="edit folder to write (default: adapters/<image>-<text>)")
    p.add_argument("--embedding-steps", type=int, help=_set("stage 1 steps", "imagic.embedding_steps"))
    p.add_argument("--finetune-steps", type=int, help=_set("stage 2 steps", "imagic.finetune_steps"))
    p.add_argument("--seed", type=int, help=_set("training seed", "runtime.seed"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    p = _command(sub, "invert", "invert a photo for Prompt-to-Prompt editing (null-text and others)")
    p.add_argument("image", help="input photo")
    p.add_argument("source", help="source prompt: what the photo shows")
    _add_model_args(p, ("runtime", "nulltext"))
    p.add_argument("-o", "--output", help="edit folder to write (default: adapters/<image>-<prompt>)")
    p.add_argument("--method", choices=NULLTEXT_METHODS, help=_set("inversion method", "nulltext.method"))
    p.add_argument("--steps", type=int, help=_set("DDIM steps, also of every edit", "nulltext.steps"))
    p.add_argument("--inner-steps", type=int, help=_set("most optimizer steps per timestep", "nulltext.inner_steps"))
    p.add_argument("--guidance", type=float, help=_set("guidance the inversion is made for", "nulltext.guidance"))
    p.add_argument(
        "--pivot-noise", type=float, help=_set("share of steps with a forward-noised pivot", "nulltext.pivot_noise")
    )
    p.add_argument("--seed", type=int, help=_set("seed of the pivot's noise", "nulltext.seed"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    p = _command(sub, "edit", "render a saved edit (no re-training)")
    p.add_argument("folder", help="edit folder written by 'imagic' or 'invert'")
    p.add_argument("target", nargs="?", help="target prompt (inversions only; none = reconstruction)")
    p.add_argument("--model", help="base model (default: the one recorded in the edit)")
    p.add_argument(
        "--single-file-config",
        help="configs for a single .safetensors base model (default: the ones recorded in the edit)",
    )
    p.add_argument(
        "--eta",
        type=_listed(float),
        help="Imagic interpolation (default: the edit's recipe); several, as 0.6,0.7,0.8: a grid (a negative first "
        "value takes '=': --eta=-0.2,0.5)",
    )
    p.add_argument(
        "--seed",
        type=_listed(int),
        help="sampling seed of an Imagic edit (default 0; inversions have none); several, as 0,1,2: a grid",
    )
    p.add_argument("--guidance", type=float, help="classifier-free guidance (default: the edit's recipe)")
    p.add_argument(
        "--steps", type=int, help="sampling steps of an Imagic edit (default: its recipe); an inversion's are fixed"
    )
    p.add_argument(
        "-o",
        "--output",
        help="picture to write, .png/.jpg/.webp… (default <folder name>-<settings>.png here, or beside the edit "
        "folder when run inside it; -2, -3… when taken)",
    )
    p.add_argument(
        "--p2p",
        choices=("replace", "refine", "reweight"),
        help="Prompt-to-Prompt edit of an inversion (default: replace when both prompts have as many tokens, else "
        "refine)",
    )
    p.add_argument("--blend", nargs="+", metavar="WORD", help="local blend: only where these words attend may change")
    p.add_argument(
        "--blend-mask",
        choices=("attention", "difference"),
        help="local blend by the --blend words' attention (default) or, with no words, where the edit moved the "
        "latents (for models whose attention maps are not localised, e.g. the demo)",
    )
    p.add_argument("--reweight", action="append", metavar="WORD=F", help="scale a target word's attention, e.g. cat=2")
    p.add_argument(
        "--cross-replace",
        type=float,
        help=_control("share of steps with the source's cross-attention", "cross_replace"),
    )
    p.add_argument(
        "--self-replace", type=float, help=_control("share of steps with the source's self-attention", "self_replace")
    )
    p.add_argument("--save-attention", metavar="PNG", help="write the per-word cross-attention maps as a grid")
    p.add_argument("--overwrite", action="store_true", help="replace existing output pictures")
    _add_runtime_set(p, "over the edit's recorded ones; runtime.offload_idle=true: only the part at work on the GPU")

    p = _command(sub, "batch", "make the edits of a JSON list (TEdBench's input_list.json reads as it is)")
    p.add_argument("list", help='JSON array of {"image", "target", "source"} (or img_name, target_text, source_text)')
    p.add_argument("--images", help="folder the image names are relative to (default: the list's folder)")
    p.add_argument("--method", choices=("imagic", *NULLTEXT_METHODS), default="imagic", help="default imagic")
    _add_model_args(p, ("runtime", "imagic", "nulltext"))
    p.add_argument("-o", "--output", help="folder of the edits and batch.json (default: adapters/<list>-<method>)")
    p.add_argument("--limit", type=int, help="only the first N entries (the others are not checked)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo entries whose edits exist (kept by default, even when made with other settings)",
    )
    p.epilog += "\nExit status 1 when any entry failed (batch.json says why); the others are kept."

    p = _command(sub, "inspect", "show what an edit folder holds")
    p.add_argument("folder", help="edit folder written by 'imagic' or 'invert'")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "generate", "plain text-to-image with any model")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--single-file-config", help=SINGLE_FILE_CONFIG_HELP)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's recommendation)")
    p.add_argument("--guidance", type=float, default=None, help="guidance (default: the model's recommendation)")
    p.add_argument("-o", "--output", help="picture to write (default generated.png, or -2, -3… when taken)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output picture")
    _add_runtime_set(p, "runtime.offload_idle=true: only the part at work on the GPU")
    return parser


def _add_runtime_set(p: argparse.ArgumentParser, note: str) -> None:
    """--set for the commands that train nothing (edit, generate): load-time runtime settings only."""
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="runtime.KEY=VALUE",
        help=f"a runtime setting to load the model with ({note})",
    )


# What a command stopped part way (interrupted, out of memory) leaves, where it is more than nothing.
LEFT_BEHIND = {"batch": "finished entries are kept (see batch.json)"}
# What lowers the peak, by command: training takes recipes and --set, edit and generate --set runtime.KEY=VALUE.
_LOWER_PEAK = "--set runtime.offload_idle=true, fewer other programs using the device's memory"
OUT_OF_MEMORY = {
    "imagic": f"to lower the peak: --recipe sd15-8gb, {_LOWER_PEAK}",
    "invert": f"to lower the peak: --recipe nulltext-sd15-8gb, {_LOWER_PEAK}",
    "batch": f"to lower the peak: the 8 GB recipes, {_LOWER_PEAK}",
    "generate": f"to lower the peak: {_LOWER_PEAK}",
    "edit": f"to lower the peak: {_LOWER_PEAK}",
}
OUT_OF_MEMORY_OTHERWISE = "free memory on the device (other programs hold some) and run it again"
COMMANDS = {
    "imagic": cmd_imagic,
    "invert": cmd_invert,
    "edit": cmd_edit,
    "batch": cmd_batch,
    "inspect": cmd_inspect,
    "generate": cmd_generate,
}


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"peftedit: {record.levelname.lower()}: {record.getMessage()}"


def _setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    log = logging.getLogger("peftedit")
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
        for name in ("diffusers", "transformers", "bitsandbytes", "peft"):
            logging.getLogger(name).setLevel(logging.ERROR)
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars: noise on every command
        transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``peftedit`` command; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    own = parser.commands.get(args.command, parser)  # so the error points at "peftedit edit --help"
    if extra:
        own.error(f"unrecognized arguments: {' '.join(extra)}")
    for option, name in (("-o/--output", "output"), ("--save-attention", "save_attention")):
        if getattr(args, name, None) == "":  # it fell back to the default silently
            own.error(f"{option} is empty; give a path or leave the option out")
    left = LEFT_BEHIND.get(args.command, "nothing was saved")
    try:
        _setup_logging(args.debug)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"peftedit: interrupted; {left}", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, MemoryError) as err:
        if isinstance(err, ValueError | OSError):
            message = one_line(err)
        else:
            message = out_of_memory(err, f"{left}; {OUT_OF_MEMORY.get(args.command, OUT_OF_MEMORY_OTHERWISE)}")
        if message is None:
            raise  # anything else is a bug: its traceback is what a report needs
        if args.debug:
            traceback.print_exc()
            return 2
        print(f"peftedit: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
