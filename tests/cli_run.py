"""Running the ``peftedit`` command in-process, and what its one-line errors must look like, for the CLI tests."""

from __future__ import annotations

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
