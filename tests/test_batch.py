"""Batch runs: a JSON list (TEdBench's format or ours) checked before the model loads, one edit folder per entry,
resumed runs that keep finished edits, and a failed entry that does not stop the others."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_cli
from PIL import Image

from peftedit import Artifact, batch
from peftedit import images as images_mod
from peftedit.errors import PeftEditError

DATA = Path(__file__).parent / "data"
IMAGIC_FAST = ["--set", "embedding_steps=2", "--set", "finetune_steps=2", "--set", "render_steps=3"]
IMAGIC_FAST += ["--set", "preview_etas=[0.7]", "--set", "runtime.device=cpu"]
CAPTION, ROW = 16, 16 + 160  # batch.png: a caption line, then the pictures 160 px high
INVERSION_FAST = ["--set", "steps=4", "--set", "inner_steps=1", "--set", "runtime.device=cpu"]


def _list(folder: Path, entries, name: str = "list.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(entries))
    return path


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


def test_entry_names_keep_accented_and_non_latin_prompts_readable(photos):
    """Names kept only a-z and 0-9: "crème brûlée" became "cr-me-br-l-e" and a Chinese prompt vanished."""
    entries = [
        {"img_name": "dog.png", "target_text": "A Café crème brûlée"},
        {"img_name": "dog.png", "target_text": "一只坐着的狗"},
        {"img_name": "dog.png", "target_text": "***"},
        {"img_name": "dog.png", "target_text": "ギター, йод, कुत्ता"},  # marks that are part of a letter stay
    ]
    names = [i.name for i in batch.items_from(entries, photos, "imagic")]
    assert names == ["001-dog-a-cafe-creme-brulee", "002-dog-一只坐着的狗", "003-dog", "004-dog-ギター-йод-कुत्ता"]


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


def test_list_files_read_with_a_bom_and_refuse_repeated_keys(photos):
    path = photos / "bom.json"
    path.write_text(json.dumps([{"image": "dog.png", "target": "a dog"}]), encoding="utf-8-sig")
    assert batch.read_list(path)[0].target == "a dog"
    path.write_text('[{"image": "dog.png", "target": "a dog", "target": "a cat"}]')
    with pytest.raises(PeftEditError, match="gives 'target' twice"):
        batch.read_list(path)


def test_every_bad_entry_is_counted_and_limit_reads_only_its_entries(photos, caplog):
    entries = [{"image": "dog.png", "target": "a"}, {"image": "x.png", "target": "b"}, {"image": "dog.png"}]
    entries += [{"image": "dog.png", "target": ""}, {"image": "dog.png", "target": "c", "mask": "m"}]
    with caplog.at_level(logging.DEBUG, logger="peftedit"), pytest.raises(PeftEditError) as caught:
        batch.items_from(entries, photos)
    message = str(caught.value)
    assert message.startswith("list: 4 bad entries: entry 2: image not found")
    assert "; entry 3: no target prompt (an Imagic edit needs one); entry 4: the target prompt is empty" in message
    assert message.endswith("(and 1 more; --debug lists them all)")
    listed = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert [line.split(": ")[1] for line in listed] == ["entry 2", "entry 3", "entry 4", "entry 5"]
    assert listed[-1].startswith("list: entry 5: unknown key 'mask'"), listed[-1]  # the one the line left out
    assert [i.index for i in batch.items_from(entries, photos, limit=1)] == [1]


def test_a_list_none_of_whose_photos_is_found_points_at_images(photos, tmp_path):
    """TEdBench's list sits beside originals/: without --images all 100 entries said "image not found", and nothing
    said that the folder they were looked for in was the thing to change."""
    entries = [{"image": "dog.png", "target": "a"}, {"image": "dog.png", "target": "b"}]
    with pytest.raises(PeftEditError) as caught:
        batch.items_from(entries, tmp_path)
    assert str(caught.value).endswith(
        f"; none of the photos is in {tmp_path}: give their folder with --images (images=)"
    )
    entries.append({"image": "gone.png", "target": "c"})  # one missing photo among found ones: no such hint
    with pytest.raises(PeftEditError) as caught:
        batch.items_from(entries, photos)
    assert "none of the photos" not in str(caught.value)
    entries.append({"image": "lost.png", "target": "d"})  # every bad entry a missing photo, but some found: no hint
    with pytest.raises(PeftEditError) as caught:
        batch.items_from(entries, photos)
    assert "2 bad entries" in str(caught.value) and "none of the photos" not in str(caught.value)


def test_the_overview_is_as_wide_as_its_pictures_or_its_longest_caption():
    """It was at least 640 px wide: an eta x seed grid of two 128 px cells sat beside 384 px of white."""
    short = images_mod.sheet([("seed 0", [Image.new("RGB", (256, 160), "blue")], "black")])
    assert short.width == 256
    caption = "001  dog.png: " + " ".join(["a photo of a dog sitting on the grass"] * 4)
    long = np.asarray(images_mod.sheet([(caption, [Image.new("RGB", (64, 160), "blue")], "black")]).convert("L"))
    ink = np.flatnonzero((long[:CAPTION] < 128).any(0))
    assert long.shape[1] > 64 and long.shape[1] - 6 <= ink[-1] < long.shape[1]  # the caption's end is on the page


def test_the_images_hint_is_for_missing_photos_only_and_counts_the_limited_entries(photos, tmp_path):
    """The hint is for a list whose photos are all missing from the folder: not for entries wrong in other ways, nor
    for a one-entry list (its one name may be the typo), and with a limit it counts only the entries taken."""
    no_targets = [{"image": "dog.png"}, {"image": "shapes.png"}]  # photos found, prompts missing
    with pytest.raises(PeftEditError) as caught:
        batch.items_from(no_targets, photos)
    assert "2 bad entries" in str(caught.value) and "none of the photos" not in str(caught.value)
    with pytest.raises(PeftEditError) as caught:
        batch.items_from([{"image": "dog.png", "target": "a"}], tmp_path)
    assert str(caught.value).endswith("image not found: " + str(tmp_path / "dog.png")), caught.value
    missing = [{"image": f"gone{i}.png", "target": "a"} for i in range(3)] + [{"image": "dog.png", "target": "a"}]
    with pytest.raises(PeftEditError) as caught:
        batch.items_from(missing, tmp_path, limit=2)
    assert str(caught.value).endswith(
        f"none of the photos is in {tmp_path}: give their folder with --images (images=)"
    )


@pytest.mark.parametrize("freetype", [True, False])
def test_the_overview_takes_any_caption(freetype, monkeypatch):
    """Pillow draws with FreeType's font where it has FreeType, else with its bitmap font, which takes Latin-1 only
    and raises for other characters (they become '?')."""
    from PIL import ImageFont

    from peftedit.images import sheet

    if not freetype:
        monkeypatch.setattr(ImageFont, "load_default", lambda size=None: ImageFont.load_default_imagefont())
    rows = [("001 猫.png: 日本語 🐱 café", [Image.new("RGB", (32, 16))], "black"), ("002 failed: no", [], "red")]
    page = sheet(rows)
    assert page.size == (max(320, images_mod._text_width(rows[0][0]) + 6), ROW + CAPTION)  # the picture: 320 wide
    assert page.getpixel((0, CAPTION + 1)) == (0, 0, 0)  # the picture, scaled to the row's height
    assert any(page.getpixel((x, ROW + 8)) != (255, 255, 255) for x in range(3, 200))  # the second caption


def test_items_read_for_one_method_are_refused_by_another(photos):
    from peftedit import ImagicConfig, NullTextConfig

    items = batch.items_from([{"image": "dog.png", "target": "a dog"}], photos)
    with pytest.raises(PeftEditError, match="entry 1: no source prompt .*read the list with method='null-text'"):
        batch.run(None, items, NullTextConfig(), out=photos / "out")
    inversions = batch.items_from([{"image": "dog.png", "source": "a dog"}], photos, "direct")
    with pytest.raises(PeftEditError, match="entry 1: no target prompt"):
        batch.run(None, inversions, ImagicConfig(), out=photos / "out")
    assert not (photos / "out").exists()


def test_cli_errors_come_before_the_model_loads(photos, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    edit_folder = tmp_path / "an-edit"
    edit_folder.mkdir()
    (edit_folder / "edit.safetensors").touch()
    good = _list(photos, [{"image": "dog.png", "target": "a"}], "good.json")
    for argv, fragment in (
        ([good, "-o", edit_folder], "is an edit folder; give the batch a folder of its own"),
        ([photos], "is a folder; give the JSON list file"),
        ([good, "--images", tmp_path / "nowhere"], "images folder not found"),
        ([good, "--images", photos / "dog.png"], "is a file, not a folder"),
        ([bad], "is not a JSON list of edits"),
        ([tmp_path / "none.json"], "list not found"),
        ([_list(photos, [{"image": "x.png", "target": "a"}], "missing.json")], "entry 1: image not found"),
        ([_list(photos, [{"image": "dog.png", "target": "a"}]), "--limit", 0], "--limit = 0 must be > 0"),
    ):
        output = [] if "-o" in argv else ["-o", tmp_path / "out"]
        code, _, err = run_cli(capsys, "batch", *argv, "--model", tmp_path / "no-model", *output)
        assert code == 2 and fragment in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _summary(out: Path) -> dict:
    return json.loads((out / "batch.json").read_text())


def test_imagic_batch_resumes_and_goes_on_past_a_failed_entry(eps_dir, photos, tmp_path, capsys):
    entries = [{"image": "shapes.png", "target": "a red circle"}, {"img_name": "dog.png", "target_text": "a dog"}]
    listed, out = _list(photos, entries), tmp_path / "out"
    argv = ["batch", listed, "--model", eps_dir, "-o", out, *IMAGIC_FAST]
    code, stdout, err = run_cli(capsys, *argv, "--limit", 1)
    assert code == 0, err
    assert "1 done, 0 done earlier, 0 failed of 1" in stdout
    first = out / "001-shapes-a-red-circle"
    assert Artifact.load(first).meta["prompts"]["target"] == "a red circle"
    made = (first / "edit.safetensors").stat().st_mtime_ns

    # resumed with changed settings: the first is kept (with a warning naming them, the training seed too), the
    # second made
    code, stdout, err = run_cli(capsys, *argv, "--set", "finetune_steps=3", "--set", "runtime.seed=5")
    assert code == 0, err
    assert (
        "001-shapes-a-red-circle was made with other settings (finetune_steps, runtime.seed); kept; --overwrite ("
        in err
    )
    summary = _summary(out)
    assert [i["status"] for i in summary["items"]] == ["done earlier", "done"]
    assert summary["counts"] == {"done": 1, "done earlier": 1, "failed": 0, "pending": 0, "interrupted": 0}
    assert (first / "edit.safetensors").stat().st_mtime_ns == made
    assert summary["items"][1]["losses"]["finetune"] > 0
    assert Image.open(out / "batch.png").height == 2 * ROW  # the overview: each entry's preview under a caption

    # a shorter run keeps the other entries' records
    code, _, err = run_cli(capsys, *argv, "--limit", 1)
    assert code == 0, err
    summary = _summary(out)
    assert [i["folder"] for i in summary["items"]] == [first.name]
    assert [(i["folder"], i["status"]) for i in summary["earlier_items"]] == [("002-dog-a-dog", "done")]

    # A folder holding another entry's edit, or an edit of another photo, is not taken for the entry's own: those
    # entries fail, and the run goes on.
    shutil.rmtree(out / "002-dog-a-dog")
    shutil.copytree(first, out / "002-dog-a-dog")
    Image.open(photos / "shapes.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "shapes.png")
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 1 and "2 failed of 2" in stdout
    statuses = [i["status"] for i in _summary(out)["items"]]
    assert statuses[0].startswith("failed: ") and "made from another photo (shapes.png)" in statuses[0]
    assert "its target prompt is 'a red circle'" in statuses[1] and "made from another photo" in statuses[1]
    assert Image.open(out / "batch.png").height == 2 * CAPTION  # failed entries: their captions alone

    code, _, err = run_cli(capsys, *argv, "--overwrite")  # redone, the copied folder replaced
    assert code == 0, err
    assert Artifact.load(out / "002-dog-a-dog").meta["prompts"]["target"] == "a dog"
    assert _summary(out)["earlier_items"] == []
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # nothing half-written

    # An inversion entry whose folder holds this Imagic edit: its kind is named, not "its source prompt is 'None'".
    inversions = tmp_path / "inversions"
    shutil.copytree(first, inversions / first.name)
    listed = _list(photos, [{"image": "shapes.png", "source": "a red circle"}], "sources.json")
    argv = ["batch", listed, "--method", "negative-prompt", "--model", eps_dir, "-o", inversions, *INVERSION_FAST]
    code, stdout, _ = run_cli(capsys, *argv)
    status = _summary(inversions)["items"][0]["status"]
    assert code == 1 and "it is imagic, this entry negative-prompt;" in status and "prompt is" not in status


def test_inversion_batch_renders_each_edit_and_a_missing_picture_again(
    eps_dir, other_dir, photos, tmp_path, capsys, monkeypatch
):
    entries = [
        {"image": "shapes.png", "source": "a red circle", "target": "a blue circle"},
        {"image": "dog.png", "source": "a dog"},  # no target: the inversion only
    ]
    listed, out = _list(photos, entries), tmp_path / "out"
    argv = ["batch", listed, "--method", "negative-prompt", "--model", eps_dir, "-o", out, *INVERSION_FAST]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    picture = out / "001-shapes-a-red-circle.png"  # named as the inversion: after its source
    inversion = Artifact.load(out / "001-shapes-a-red-circle")
    assert inversion.method == "negative-prompt" and inversion.meta["prompts"]["source"] == "a red circle"
    assert Image.open(picture).size == (inversion.meta["resolution"],) * 2
    assert sorted(p.name for p in out.glob("*.png")) == [picture.name, "batch.png"]
    overview = Image.open(out / "batch.png")
    preview = Image.open(out / "001-shapes-a-red-circle" / "preview.png")
    assert overview.height == 2 * ROW
    assert overview.width == round(preview.width * 160 / preview.height) + 160  # preview, then the edit: no blank
    assert Image.open(picture).text["peftedit.target"] == "a blue circle"
    picture.unlink()  # e.g. a run stopped between saving the inversion and rendering its edit
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert picture.is_file()
    assert json.loads((out / "batch.json").read_text())["counts"]["done earlier"] == 2

    # A new target: the inversion is kept (its source is the same; it was named after the target, so a new target
    # inverted the photo again), the picture rendered again for the new target.
    made = (out / "001-shapes-a-red-circle" / "edit.safetensors").read_bytes()
    entries[0]["target"] = "a green square"
    _list(photos, entries)
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert Image.open(picture).text["peftedit.target"] == "a green square"
    assert (out / "001-shapes-a-red-circle" / "edit.safetensors").read_bytes() == made
    assert json.loads((out / "batch.json").read_text())["counts"]["done earlier"] == 2
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["001-shapes-a-red-circle", "002-dog-a-dog"]

    # A picture peftedit did not render is not replaced by a resumed run.
    Image.new("RGB", (8, 8)).save(picture)
    code, _, _ = run_cli(capsys, *argv)
    status = json.loads((out / "batch.json").read_text())["items"][0]["status"]
    assert code == 1 and "was not rendered by peftedit batch; move it or pass --overwrite (overwrite=True)" in status
    assert Image.open(picture).size == (8, 8)

    # Interrupted in the first entry: the summary says so, and still says what earlier runs finished (the second).
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "_one", interrupted)
    code, _, err = run_cli(capsys, *argv)
    assert code == 130 and "finished entries are kept" in err
    assert [i["status"] for i in json.loads((out / "batch.json").read_text())["items"]] == [
        "interrupted",
        "done earlier",
    ]
    monkeypatch.undo()

    # resumed on another base model: the earlier edits are not this run's
    code, stdout, _ = run_cli(capsys, *[other_dir if a == eps_dir else a for a in argv])
    assert code == 1 and "2 failed of 2" in stdout
    statuses = [i["status"] for i in json.loads((out / "batch.json").read_text())["items"]]
    assert all("base model mismatch" in s for s in statuses), statuses


def test_too_many_steps_fail_the_run_once_before_any_entry(eps_dir, photos, tmp_path, capsys):
    """It failed every entry with the same config error (after loading the model), and exited 1 as if some worked."""
    entries = [{"image": "shapes.png", "source": "a red circle"}, {"image": "dog.png", "source": "a dog"}]
    out = tmp_path / "out"
    argv = ["batch", _list(photos, entries), "--method", "ddim", "--model", eps_dir, "-o", out]
    code, _, err = run_cli(capsys, *argv, "--set", "nulltext.steps=1001", "--set", "nulltext.lr_decay=0")
    assert code == 2 and "nulltext.steps = 1001 is more than the model's 1000 training timesteps" in err
    assert not out.exists()


def test_an_inversion_named_after_its_target_by_an_older_batch_is_reused(eps_dir, photos, tmp_path, capsys):
    """Batches before 2026-11-24 named an inversion with a target after the target: a resumed run renames it to the
    source-named folder and keeps it, rather than inverting the photo again."""
    entries = [{"image": "shapes.png", "source": "a red circle", "target": "a blue circle"}]
    listed, out = _list(photos, entries), tmp_path / "out"
    argv = ["batch", listed, "--method", "negative-prompt", "--model", eps_dir, "-o", out, *INVERSION_FAST]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    new, old = out / "001-shapes-a-red-circle", out / "001-shapes-a-blue-circle"
    made = (new / "edit.safetensors").read_bytes()
    new.rename(old)  # as the older batch left it
    Path(f"{new}.png").rename(f"{old}.png")
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert json.loads((out / "batch.json").read_text())["counts"]["done earlier"] == 1
    assert (new / "edit.safetensors").read_bytes() == made and not old.exists()
    assert Path(f"{new}.png").is_file() and not Path(f"{old}.png").exists()


def test_a_picture_batch_did_not_render_names_the_overwrite_argument(tmp_path):
    """batch.run(..., overwrite=True) is how a Python caller replaces it: the error names that beside the flag."""
    picture = tmp_path / "001-photo-a-cat.png"
    Image.new("RGB", (8, 8)).save(picture)
    with pytest.raises(FileExistsError, match=r"; move it or pass --overwrite \(overwrite=True\)$"):
        batch._rendered_for(picture)


def test_a_finished_entry_whose_folder_is_gone_is_pending_again(tmp_path):
    """An earlier run's 'done' is carried into batch.json only while the entry's folder still exists."""
    item = batch.Item(1, tmp_path / "cat.png", target="a photo of a cat")
    record, previous = batch._record(item, "imagic"), {"status": batch.DONE, "seconds": 3.0, "losses": {"x": 1.0}}
    assert batch._carried(record, previous, tmp_path)["status"] == batch.PENDING
    (tmp_path / item.name).mkdir()
    carried = batch._carried(record, previous, tmp_path)
    assert (carried["status"], carried["seconds"], carried["losses"]) == (batch.EARLIER, 3.0, {"x": 1.0})


def test_an_entry_whose_folder_was_deleted_is_redone_over_its_own_picture(eps_dir, photos, tmp_path, capsys):
    """Deleting an entry's folder makes it pending again, but its P2P picture, which batch itself rendered, then
    failed the entry ("already exists; pass --overwrite"), and --overwrite redoes every entry of the list."""
    entries = [{"image": "shapes.png", "source": "a red circle", "target": "a blue circle"}]
    listed, out = _list(photos, entries), tmp_path / "out"
    argv = ["batch", listed, "--method", "ddim", "--model", eps_dir, "-o", out, *INVERSION_FAST]
    assert run_cli(capsys, *argv)[0] == 0
    folder, picture = out / "001-shapes-a-red-circle", out / "001-shapes-a-red-circle.png"
    shutil.rmtree(folder)
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert Artifact.load(folder).method == "ddim"
    assert json.loads((out / "batch.json").read_text())["counts"]["done"] == 1
    assert Image.open(picture).text["peftedit.target"] == "a blue circle"

    shutil.rmtree(folder)  # a picture batch did not render is still not replaced
    Image.new("RGB", (8, 8)).save(picture)
    code, _, _ = run_cli(capsys, *argv)
    status = json.loads((out / "batch.json").read_text())["items"][0]["status"]
    assert code == 1 and "was not rendered by peftedit batch" in status
    assert Image.open(picture).size == (8, 8) and not folder.exists()
