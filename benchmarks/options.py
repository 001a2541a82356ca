"""What the memory, savers and checkpointing benchmarks share on the command line and in where they write."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from datetime import date
from pathlib import Path

import torch

from .build_model import model_names

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parser(doc: str, steps: int, warmup: int, out: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes: ``--model --device --steps --warmup --set --out``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=model_names(), default="sd15")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=steps, help="steps per stage (DDIM steps for sampling stages)")
    parser.add_argument("--warmup", type=int, default=warmup, help="steps per stage not timed")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="override a recipe value, e.g. runtime.dtype=fp32 (repeatable)",
    )
    parser.add_argument("--out", type=Path, help=f"results file (default benchmarks/results/{out})")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, module: str) -> argparse.Namespace:
    """Parse and check the shared options; ``args.command`` is the command line to record with the results."""
    args = parser.parse_args(argv)
    args.command = f"python -m benchmarks.{module} " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must be more than --warmup {args.warmup}")
    for item in args.set:
        if "." not in item.split("=", 1)[0]:
            parser.error(f"--set {item!r}: write it as table.key=value (runtime, imagic or nulltext)")
    return args


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_slug(device: torch.device) -> str:
    """The device's name made file-safe (``nvidia-h100-80gb-hbm3``, ``cpu``)."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def results_path(prefix: str, device: str | torch.device) -> Path:
    """``benchmarks/results/<prefix><device>-<date>.json``."""
    return RESULTS_DIR / f"{prefix}{device_slug(torch.device(device))}-{date.today().isoformat()}.json"
