"""Running the ``peftedit`` command in-process, and what its one-line errors must look like, for the CLI tests."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from peftedit import hub
from peftedit.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``peftedit --quiet ARGV...``: its exit code, stdout and stderr (only the command's own output: not what the
    test printed before, like a first import's notes)."""
    capsys.readouterr()
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *fragments: str, warned=()) -> None:
    """Exit 2 and all of stderr one "peftedit: error:" line holding each fragment, after one warning line for each of
    ``warned`` (counting only the error lines let any other output through)."""
    lines = err.splitlines(keepends=True)
    assert code == 2 and err.endswith("\n") and len(lines) == len(warned) + 1, err
    for line, said in zip(lines[:-1], warned, strict=True):
        assert line.startswith("peftedit: warning: ") and said in line, err
    assert lines[-1].startswith("peftedit: error: "), err
    for fragment in fragments:
        assert fragment in lines[-1], err


def network_refused(monkeypatch) -> list:
    """Every connection refused (no proxy set); returns the list of the addresses tried."""
    tries = []

    def refuse(address, *args, **kwargs):
        tries.append(address)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return tries


def cache_snapshot(cache: Path, repo: str, source: Path, weights: bool = True) -> Path:
    """``source``'s files as hub id ``repo``'s snapshot in the Hugging Face cache folder ``cache`` (its layout:
    ``models--OWNER--NAME/snapshots/COMMIT`` and ``refs/main`` naming the commit); without ``weights``, no
    ``.safetensors`` file."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    ignored = None if weights else shutil.ignore_patterns("*.safetensors")
    shutil.copytree(source, root / "snapshots" / commit, ignore=ignored)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit
