"""Batch runs: a JSON list (TEdBench's format or ours) checked before the model loads, one edit folder per entry,
resumed runs that keep finished edits, and a failed entry that does not stop the others."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from peftedit import Artifact, batch
from peftedit.cli import main
from peftedit.errors import PeftEditError

DATA = Path(__file__).parent / "data"
IMAGIC_FAST = ["--set", "embedding_steps=2", "--set", "finetune_steps=2", "--set", "render_steps=3"]
IMAGIC_FAST += ["--set", "preview_etas=[0.7]", "--set", "runtime.device=cpu"]
INVERSION_FAST = ["--set", "steps=4", "--set", "inner_steps=1", "--set", "runtime.device=cpu"]


def _list(folder: Path, entries, name: str = "list.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(entries))
    return path


def _run(capsys, *argv):
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def photos(tmp_path, photo):
    """Two photos in a folder of their own: the demo-like disc picture and a TEdBench photo (RGBA, EXIF)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photo, folder / "shapes.png")
    shutil.copy(DATA / "dog2_standing.png", folder / "dog.png")
    return folder


def test_tedbench_lists_read_as_they_are(photos):
    entries = [
        {"img_name": "dog.png", "target_text": "A photo of a sitting dog."},
        {"image": "shapes.png", "target": "  a red   circle ", "source": "a red disc"},
    ]
    items = batch.read_list(_list(photos, entries))  # images are relative to the list's folder by default
    assert [i.image for i in items] == [photos / "dog.png", photos / "shapes.png"]
    assert [i.target for i in items] == ["A photo of a sitting dog.", "a red circle"]
    assert [i.source for i in items] == [None, None]  # Imagic leaves the sources out
    assert [i.name for i in items] == ["001-dog-a-photo-of-a-sitting-dog", "002-shapes-a-red-circle"]
    inversions = batch.items_from(entries[1:], photos, "null-text")
    assert (inversions[0].source, inversions[0].target) == ("a red disc", "a red circle")


@pytest.mark.parametrize(
    "entries, method, fragment",
    [
        ({"image": "dog.png"}, "imagic", "non-empty JSON array"),
        ([], "imagic", "non-empty JSON array"),
        (["dog.png"], "imagic", "entry 1: expected an object"),
        ([{"image": "dog.png", "target": "a dog", "prompt": "x"}], "imagic", "entry 1: unknown key 'prompt'"),
        ([{"image": "dog.png", "img_name": "dog.png", "target": "a"}], "imagic", "entry 1: image is given twice"),
        ([{"image": "dog.png", "target": 3}], "imagic", "entry 1: target must be a string"),
        ([{"target": "a dog"}], "imagic", "entry 1: no image"),
        ([{"image": "dog.png", "source": "a dog"}], "imagic", "entry 1: no target prompt"),
        ([{"image": "dog.png", "target": "a cat"}], "null-text", "entry 1: no source prompt"),
        ([{"image": "dog.png", "target": "a"}, {"image": "dog.png", "target": " "}], "imagic", "entry 2: the target"),
        ([{"image": "dog.png", "target": "a"}, {"image": "gone.png", "target": "b"}], "imagic", "image not found"),
        ([{"image": "dog.png", "target": "a"}], "sdedit", "unknown method 'sdedit'"),
    ],
)
def test_bad_lists_name_the_entry(photos, entries, method, fragment):
    with pytest.raises(PeftEditError, match=fragment):
        batch.items_from(entries, photos, method)


def test_cli_errors_come_before_the_model_loads(photos, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    for argv, fragment in (
        ([bad], "is not a JSON list of edits"),
        ([tmp_path / "none.json"], "list not found"),
        ([_list(photos, [{"image": "x.png", "target": "a"}], "missing.json")], "entry 1: image not found"),
        ([_list(photos, [{"image": "dog.png", "target": "a"}]), "--limit", 0], "--limit = 0 must be > 0"),
    ):
        code, _, err = _run(capsys, "batch", *argv, "--model", tmp_path / "no-model", "-o", tmp_path / "out")
        assert code == 2 and fragment in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_imagic_batch_resumes_and_goes_on_past_a_failed_entry(eps_dir, photos, tmp_path, capsys):
    entries = [{"image": "shapes.png", "target": "a red circle"}, {"img_name": "dog.png", "target_text": "a dog"}]
    listed, out = _list(photos, entries), tmp_path / "out"
    argv = ["batch", listed, "--model", eps_dir, "-o", out, *IMAGIC_FAST]
    code, stdout, err = _run(capsys, *argv, "--limit", 1)
    assert code == 0, err
    assert "1 done, 0 done earlier, 0 failed of 1" in stdout
    first = out / "001-shapes-a-red-circle"
    assert Artifact.load(first).meta["prompts"]["target"] == "a red circle"
    made = (first / "edit.safetensors").stat().st_mtime_ns

    code, stdout, err = _run(capsys, *argv)  # resumed: the first is kept, the second made
    assert code == 0, err
    summary = json.loads((out / "batch.json").read_text())
    assert [i["status"] for i in summary["items"]] == ["done earlier", "done"]
    assert summary["counts"] == {"done": 1, "done earlier": 1, "failed": 0}
    assert (first / "edit.safetensors").stat().st_mtime_ns == made
    assert summary["items"][1]["losses"]["finetune"] > 0

    # A folder holding another entry's edit is not taken for this one: that entry fails, the other is kept.
    shutil.rmtree(out / "002-dog-a-dog")
    shutil.copytree(first, out / "002-dog-a-dog")
    code, stdout, err = _run(capsys, *argv)
    assert code == 1 and "1 failed of 2" in stdout
    statuses = [i["status"] for i in json.loads((out / "batch.json").read_text())["items"]]
    assert statuses[0] == "done earlier" and statuses[1].startswith("failed: ") and "another edit" in statuses[1]

    code, _, err = _run(capsys, *argv, "--overwrite")  # redone, the copied folder replaced
    assert code == 0, err
    assert Artifact.load(out / "002-dog-a-dog").meta["prompts"]["target"] == "a dog"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # nothing half-written


def test_inversion_batch_renders_each_edit_and_a_missing_picture_again(eps_dir, other_dir, photos, tmp_path, capsys):
    entries = [
        {"image": "shapes.png", "source": "a red circle", "target": "a blue circle"},
        {"image": "dog.png", "source": "a dog"},  # no target: the inversion only
    ]
    listed, out = _list(photos, entries), tmp_path / "out"
    argv = ["batch", listed, "--method", "negative-prompt", "--model", eps_dir, "-o", out, *INVERSION_FAST]
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    picture = out / "001-shapes-a-blue-circle.png"
    inversion = Artifact.load(out / "001-shapes-a-blue-circle")
    assert inversion.method == "negative-prompt" and inversion.meta["prompts"]["source"] == "a red circle"
    assert Image.open(picture).size == (inversion.meta["resolution"],) * 2
    assert sorted(p.name for p in out.glob("*.png")) == [picture.name]
    picture.unlink()  # e.g. a run stopped between saving the inversion and rendering its edit
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    assert picture.is_file()
    assert json.loads((out / "batch.json").read_text())["counts"]["done earlier"] == 2
    # resumed on another base model: the earlier edits are not this run's
    code, stdout, _ = _run(capsys, *[other_dir if a == eps_dir else a for a in argv])
    assert code == 1 and "2 failed of 2" in stdout
    statuses = [i["status"] for i in json.loads((out / "batch.json").read_text())["items"]]
    assert all("base model mismatch" in s for s in statuses), statuses
