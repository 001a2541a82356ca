"""Edit folders on disk, with no model: --overwrite replaces only earlier edits, a changed header is refused in one
line, format-1 folders still load, and a broken preview does not block an edit."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_run import one_line_error, run_cli
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peftedit.artifact_checks import HEADER_CHECKSUM
from peftedit.artifacts import CARD_FILE, EDIT_FILE, LORA_FILE, PREVIEW_FILE, Artifact, check_replaceable
from peftedit.errors import ArtifactError

RANK = 8


def imagic_edit(target: str = "a red square") -> Artifact:
    """An Imagic artifact with made-up tensors: everything but a render."""
    lora = {
        "down.ff.lora_A.weight": torch.randn(RANK, 16),
        "down.ff.lora_B.weight": torch.randn(16, RANK),
        "down.conv.lora_A.weight": torch.randn(RANK, 4, 3, 3),
        "down.conv.lora_B.weight": torch.randn(4, RANK, 1, 1),
    }
    config = {"r": RANK, "lora_alpha": 8.0, "target_modules": ["ff", "conv"], "init_lora_weights": True}
    recipe = {"runtime": {"seed": 0}, "imagic": {"eta": 0.7, "guidance": 7.5, "render_steps": 3}}
    tensors = {name: torch.randn(1, 77, 8) for name in ("e_tgt", "e_opt", "e_uncond")}
    tensors["base_probe"] = torch.randn(16)
    return Artifact("imagic", tensors, _meta(recipe, {"target": target}), lora=lora, lora_config=config)


def direct_edit() -> Artifact:
    """A ``direct`` inversion with made-up tensors."""
    steps = 3
    tensors = {name: torch.randn(1, 4, 2, 2) for name in ("z_T", "z_0")}
    tensors.update(
        timesteps=torch.tensor([667, 334, 1]),
        e_src=torch.randn(1, 77, 8),
        e_uncond=torch.randn(1, 77, 8),
        offsets=torch.randn(steps, 4, 2, 2),
        base_probe=torch.randn(16),
    )
    meta = _meta({"runtime": {}, "nulltext": {"method": "direct"}}, {"source": "a red circle"})
    meta.update(steps=steps, guidance=7.5)
    return Artifact("direct", tensors, meta)


def _meta(recipe: dict, prompts: dict) -> dict:
    return {
        "base_model": "peftedit-demo",
        "base_architecture": "0" * 64,
        "base_fingerprint": "abc",
        "scheduler": {"prediction_type": "epsilon"},
        "recipe": recipe,
        "prompts": prompts,
        "image": {"name": "photo.png"},
    }


def _header(folder) -> dict[str, str]:
    with safe_open(str(folder / EDIT_FILE), framework="pt") as handle:
        return dict(handle.metadata())


def _rewrite(folder, change, format_1: bool = False) -> None:
    """Change the header of ``folder``'s edit.safetensors in place (tensors kept); ``format_1``: as an older
    peftedit wrote it, with no header checksum (so only the structural checks can catch the change)."""
    header, tensors = _header(folder), load_file(str(folder / EDIT_FILE))
    change(header, tensors) if getattr(change, "takes_tensors", False) else change(header)
    if format_1:
        header["peftedit.format_version"] = "1"
        header.pop(HEADER_CHECKSUM)
    save_file(tensors, str(folder / EDIT_FILE), metadata=header)


def _json_edit(key: str, change):
    def edit(header):
        value = json.loads(header[key])
        header[key] = json.dumps(change(value))

    return edit


def _meta_edit(change):
    return _json_edit("peftedit.meta", change)


def _without(*path):
    def change(meta):
        inner = meta
        for key in path[:-1]:
            inner = inner[key]
        del inner[path[-1]]
        return meta

    return _meta_edit(change)


def _set(key: str, path: tuple, value):
    def change(data):
        inner = data
        for step in path[:-1]:
            inner = inner[step]
        inner[path[-1]] = value
        return data

    return _json_edit(key, change)


def _method(name):
    return lambda header: header.update({"peftedit.method": name})


def _tensor_moved(name: str):
    """``name``'s values shifted with peftedit.tensors_sha256 recomputed to fit: only the header checksum can tell."""
    from peftedit.artifacts import tensors_sha256

    def change(header, tensors):
        tensors[name] = tensors[name] + 1
        header["peftedit.tensors_sha256"] = tensors_sha256(tensors)

    change.takes_tensors = True
    return change


# (which edit, how the header is changed, what a format-1 folder's load says; None: nothing can tell)
TAMPERING = {
    "meta without recipe": (imagic_edit, _without("recipe"), "meta.recipe is missing"),
    "meta without prompts": (imagic_edit, _without("prompts"), "meta.prompts is missing"),
    "meta without scheduler": (direct_edit, _without("scheduler"), "meta.scheduler is missing"),
    "meta without base_architecture": (imagic_edit, _without("base_architecture"), "meta.base_architecture is"),
    "meta without the source prompt": (direct_edit, _without("prompts", "source"), "meta.prompts.source is"),
    "meta a JSON list": (imagic_edit, _meta_edit(lambda meta: [meta]), "peftedit.meta is a JSON list"),
    "recipe runtime a list": (imagic_edit, _set("peftedit.meta", ("recipe", "runtime"), []), "recipe.runtime is"),
    "eta a string": (imagic_edit, _set("peftedit.meta", ("recipe", "imagic", "eta"), "0.7"), "expected a number"),
    "guidance a string": (direct_edit, _set("peftedit.meta", ("guidance",), "7.5"), "meta.guidance is '7.5'"),
    "steps a string": (direct_edit, _set("peftedit.meta", ("steps",), "5"), "meta.steps is '5', expected a positive"),
    "steps zero": (direct_edit, _set("peftedit.meta", ("steps",), 0), "meta.steps is 0"),
    "lora rank 8 -> 4": (imagic_edit, _set("peftedit.lora_config", ("r",), 4), "lora_config says rank 4"),
    "lora alpha 8 -> 800": (imagic_edit, _set("peftedit.lora_config", ("lora_alpha",), 800.0), None),
    "lora config a list": (imagic_edit, _json_edit("peftedit.lora_config", lambda c: [c]), "lora_config is a JSON"),
    "lora config unknown key": (imagic_edit, _set("peftedit.lora_config", ("use_dora",), True), "use_dora"),
    "method direct -> ddim": (direct_edit, _method("ddim"), "unexpected: ['offsets']"),
    "method unknown": (direct_edit, _method("fast"), "unknown method 'fast'"),
    "files emptied": (imagic_edit, lambda h: h.update({"peftedit.files": "{}"}), "peftedit.files lists []"),
    "files list one more": (
        imagic_edit,
        _json_edit("peftedit.files", lambda f: {**f, "notes.txt": "0" * 64}),
        "peftedit.files lists ['notes.txt', 'pytorch_lora_weights.safetensors']; a imagic edit has",
    ),
    "inversion files list a LoRA": (
        direct_edit,
        _json_edit("peftedit.files", lambda f: {**f, LORA_FILE: "0" * 64}),
        "peftedit.files lists ['pytorch_lora_weights.safetensors']; a direct edit has []",
    ),
    "guidance NaN": (direct_edit, _set("peftedit.meta", ("guidance",), float("nan")), "meta.guidance is nan, expect"),
    "lora alpha a string": (
        imagic_edit,
        _set("peftedit.lora_config", ("lora_alpha",), "8"),
        "lora_config.lora_alpha is '8', expected a number",
    ),
    "lora targets a string": (
        imagic_edit,
        _set("peftedit.lora_config", ("target_modules",), "ff"),
        "lora_config.target_modules is 'ff', expected a list of names",
    ),
    "files point elsewhere": (imagic_edit, _json_edit("peftedit.files", lambda f: {"../x": "0" * 64}), "../x"),
    "a key added": (direct_edit, lambda h: h.update({"peftedit.note": "hi"}), None),
    "tensors and their digest": (imagic_edit, _tensor_moved("e_opt"), None),
    "format version 2 -> 3": (direct_edit, lambda h: h.update({"peftedit.format_version": "3"}), None),
}


@pytest.fixture
def saved(tmp_path):
    def save(make, name="edit"):
        return make().save(tmp_path / name)

    return save


@pytest.mark.parametrize("case", TAMPERING)
def test_a_changed_header_is_refused(case, saved, tmp_path, capsys):
    make, change, _ = TAMPERING[case]
    folder = saved(make)
    Artifact.load(folder)
    _rewrite(folder, change)
    with pytest.raises(ArtifactError, match="header was changed"):
        Artifact.load(folder)
    code, _, err = run_cli(capsys, "edit", folder, "-o", tmp_path / "out.png")
    one_line_error(code, err, "header was changed")
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("case", [c for c, (_, _, fragment) in TAMPERING.items() if fragment])
def test_format_1_headers_are_checked_for_what_a_render_needs(case, saved, tmp_path, capsys):
    make, change, fragment = TAMPERING[case]
    folder = saved(make)
    _rewrite(folder, change, format_1=True)
    with pytest.raises(ArtifactError) as caught:
        Artifact.load(folder)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    code, _, err = run_cli(capsys, "inspect", folder)
    one_line_error(code, err, fragment, warned=["predates header checksums (format 1)"])


@pytest.mark.parametrize("make", [imagic_edit, direct_edit])
def test_format_1_folders_still_load_with_a_warning(make, saved, caplog):
    folder = saved(make)
    assert _header(folder)[HEADER_CHECKSUM]
    with caplog.at_level(logging.WARNING, logger="peftedit"):
        Artifact.load(folder)
    assert "format 1" not in caplog.text
    _rewrite(folder, lambda header: None, format_1=True)
    with caplog.at_level(logging.WARNING, logger="peftedit"):
        loaded = Artifact.load(folder)
    assert "format 1" in caplog.text
    original = make()
    assert loaded.method == original.method and loaded.meta == original.meta
    assert loaded.lora_config == original.lora_config


def test_other_format_versions_are_refused(saved):
    folder = saved(direct_edit)
    _rewrite(folder, lambda header: header.update({"peftedit.format_version": "4"}))
    with pytest.raises(ArtifactError, match="format version 4; this peftedit reads versions 1, 2, 3"):
        Artifact.load(folder)


@pytest.mark.parametrize("damage", [b"not a png", "truncated"])
def test_a_broken_preview_only_warns(damage, tmp_path, capsys, caplog):
    edit = imagic_edit()
    edit.preview = Image.effect_noise((64, 32), 40).convert("RGB")
    folder = edit.save(tmp_path / "with-preview")
    preview = folder / "preview.png"
    assert Artifact.load(folder).preview.size == (64, 32)
    preview.write_bytes(preview.read_bytes()[: len(preview.read_bytes()) // 2] if damage == "truncated" else damage)
    with caplog.at_level(logging.WARNING, logger="peftedit"):
        loaded = Artifact.load(folder)
    assert loaded.preview is None and "preview.png" in caplog.text
    code, out, err = run_cli(capsys, "inspect", folder)
    assert code == 0 and "a red square" in out, err


def _snapshot(path):
    if path.is_symlink():
        return ("link", str(path.readlink()))
    if path.is_file():
        return path.read_bytes()
    return {p.name: _snapshot(p) for p in sorted(path.iterdir())}


def _photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("precious")
    return folder


def _plain_file(tmp_path):
    path = tmp_path / "out"
    path.write_text("precious")
    return path


def _edit_with_a_render(tmp_path):
    folder = imagic_edit().save(tmp_path / "out")
    (folder / "edit.png").write_bytes(b"a render the user made inside the folder")
    return folder


def _edit_with_a_subfolder(tmp_path):
    folder = direct_edit().save(tmp_path / "out")
    (folder / "preview.png").mkdir()  # a known name, but a folder
    (folder / "preview.png" / "keep.txt").write_text("precious")
    return folder


def _other_safetensors(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / EDIT_FILE), metadata={"format": "pt"})
    return folder


def _garbage_safetensors(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / EDIT_FILE).write_bytes(b"\x00" * 40)
    return folder


def _link_to_an_edit(tmp_path):
    target = direct_edit().save(tmp_path / "real")
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    return link


NOT_EDITS = {
    "photos": (_photos, "holds files an edit does not write (holiday.png, notes.txt)"),
    "plain file": (_plain_file, "is not a folder"),
    "edit plus a render": (_edit_with_a_render, "(edit.png)"),
    "edit plus a subfolder": (_edit_with_a_subfolder, "(preview.png)"),
    "other safetensors": (_other_safetensors, "without a peftedit header"),
    "garbage safetensors": (_garbage_safetensors, f"unreadable {EDIT_FILE}"),
    "symbolic link": (_link_to_an_edit, "is a symbolic link"),
}


@pytest.mark.parametrize("case", NOT_EDITS)
def test_overwrite_replaces_only_an_earlier_edit(case, tmp_path):
    make, fragment = NOT_EDITS[case]
    path = make(tmp_path)
    before = _snapshot(tmp_path)
    said = "is a peftedit edit folder that also holds" if "edit plus" in case else "is not a peftedit edit folder"
    for overwrite in (False, True):  # without --overwrite too: "pass --overwrite" sent users to a second refusal
        with pytest.raises(ArtifactError) as caught:
            imagic_edit().save(path, overwrite=overwrite)
        message = str(caught.value)
        assert said in message and fragment in message and "pass --overwrite" not in message, message
        assert message.endswith("choose another -o (folder)"), message  # Artifact.save's argument beside the flag
        assert "edit plus" in case or "; --overwrite (overwrite=True) replaces only edit folders" in message, message
    assert _snapshot(tmp_path) == before  # nothing removed, nothing left behind


def test_overwrite_replaces_an_earlier_edit(tmp_path):
    folder = imagic_edit("a red square").save(tmp_path / "edit")
    with pytest.raises(ArtifactError, match="already exists"):
        imagic_edit("a blue square").save(folder)
    imagic_edit("a blue square").save(folder, overwrite=True)
    assert Artifact.load(folder).meta["prompts"]["target"] == "a blue square"
    direct_edit().save(folder, overwrite=True)  # an inversion replaces an Imagic edit: the LoRA file goes too
    assert Artifact.load(folder).method == "direct" and not (folder / LORA_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["edit"]


def test_a_loaded_edit_saved_elsewhere_keeps_its_card_and_preview(tmp_path, caplog):
    """Artifact.load dropped the README, so copying an edit through the API (load, save) lost its model card."""
    edit = imagic_edit()
    edit.card, edit.preview = "# an edit\n\nmade with care\n", Image.new("RGB", (8, 8), "red")
    copy = Artifact.load(edit.save(tmp_path / "edit")).save(tmp_path / "copy")
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in (tmp_path / "edit").iterdir())
    assert (copy / CARD_FILE).read_text() == edit.card
    assert (copy / PREVIEW_FILE).read_bytes() == (tmp_path / "edit" / PREVIEW_FILE).read_bytes()
    (tmp_path / "edit" / CARD_FILE).write_bytes(b"\xff\xfe broken")
    with caplog.at_level(logging.WARNING, logger="peftedit"):
        assert Artifact.load(tmp_path / "edit").card == ""  # a card is not needed to render: unreadable, left out
    assert f"ignoring {tmp_path / 'edit' / CARD_FILE}: not a readable text file" in caplog.text
    caplog.clear()
    (tmp_path / "edit" / CARD_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="peftedit"):
        assert Artifact.load(tmp_path / "edit").card == ""
    assert caplog.text == ""  # an edit saved without a card is not warned about


def test_a_card_is_utf8_whatever_the_locale(tmp_path):
    """The card was written in the locale's encoding and read back as UTF-8: under an ASCII locale saving an edit
    whose card (its prompts) is not ASCII failed, and a card written in cp1252 (Windows) was dropped on load."""
    card = "# un caf\u00e9 \u2615\n"
    edit = imagic_edit().save(tmp_path / "edit")
    script = (  # ASCII only, the card escaped: the command line is decoded in the locale's encoding too
        f"import locale, sys; from peftedit import Artifact; edit = Artifact.load(sys.argv[1]); edit.card = {card!a}; "
        f"edit.save(sys.argv[2]); print(locale.getpreferredencoding(False), "
        f"Artifact.load(sys.argv[2]).card == {card!a})"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-c", script, str(edit), str(tmp_path / "copy")], env=env, capture_output=True
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    encoding, same = run.stdout.decode().split()[-2:]
    assert same == "True", encoding
    assert (tmp_path / "copy" / CARD_FILE).read_bytes() == card.encode("utf-8")
    if encoding.lower().replace("-", "") == "utf8":
        pytest.skip("this system's C locale is UTF-8: the encoding was not tested")


def test_a_home_relative_edit_folder_goes_home(tmp_path, monkeypatch):
    """save("~/edit") made a folder named "~" in the working folder, while load_model expands "~" in a model's path."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert imagic_edit().save("~/edit") == tmp_path / "home" / "edit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    assert Artifact.load("~/edit").meta["prompts"]["target"] == "a red square"


def test_an_empty_folder_made_for_the_edit_takes_it(tmp_path):
    """`mkdir out` then saving there was refused ("already exists"), and with --overwrite too ("has no
    edit.safetensors"): a dead end with nothing to lose. An empty folder is used as it is; a symbolic link to one is
    not (saving would replace the link, not fill its target)."""
    folder = tmp_path / "out"
    folder.mkdir()
    check_replaceable(folder, overwrite=False)
    assert imagic_edit("a red square").save(folder) == folder
    assert Artifact.load(folder).meta["prompts"]["target"] == "a red square"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty", target_is_directory=True)
    with pytest.raises(ArtifactError, match="is a symbolic link"):
        check_replaceable(tmp_path / "link", overwrite=False)


def test_saving_to_dot_inside_an_edit_folder_replaces_that_folder(tmp_path, monkeypatch):
    """save(".") from inside an edit folder: Path(".").name is "", so the hidden temporary folder went beside
    nothing; it is the folder by its real path (as the CLI's -o . already was)."""
    folder = imagic_edit("a red square").save(tmp_path / "edit")
    monkeypatch.chdir(folder)
    with pytest.raises(ArtifactError, match="already exists"):
        imagic_edit("a blue square").save(".")
    assert imagic_edit("a blue square").save(".", overwrite=True) == folder
    assert Artifact.load(folder).meta["prompts"]["target"] == "a blue square"
    assert [p.name for p in tmp_path.iterdir()] == ["edit"]


@pytest.mark.parametrize("failure", ["edit file", "preview", "rename"])
def test_an_overwrite_that_fails_part_way_keeps_the_earlier_edit(failure, tmp_path, monkeypatch):
    """Written in place, a failed overwrite left a half-replaced edit; with the old folder deleted before the rename
    (or not put back when the rename fails), no edit; without the cleanup, hidden .partial-/.old- folders."""
    import os

    from peftedit import artifacts

    folder = imagic_edit("a red square").save(tmp_path / "edit")
    before = _snapshot(tmp_path)
    new = imagic_edit("a blue square")
    new.preview = Image.new("RGB", (8, 8))

    def fails(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if failure == "edit file":
        monkeypatch.setattr(artifacts, "save_file", fails)
    elif failure == "preview":  # after edit.safetensors and the LoRA are written
        monkeypatch.setattr(new.preview, "save", fails)
    else:
        rename = os.replace

        def no_new_folder(src, dst):
            if ".partial-" in str(src):
                fails()
            rename(src, dst)

        monkeypatch.setattr(os, "replace", no_new_folder)
    with pytest.raises(OSError, match="No space left"):
        new.save(folder, overwrite=True)
    assert _snapshot(tmp_path) == before
    assert Artifact.load(folder).meta["prompts"]["target"] == "a red square"


@pytest.mark.parametrize("case", ["photos", "plain file", "edit plus a render"])
def test_cli_refuses_to_overwrite_before_any_work(case, photo, tmp_path, capsys, monkeypatch):
    import peftedit.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(peftedit.models, "load_model", no_model)
    make, fragment = NOT_EDITS[case]
    path = make(tmp_path)
    before = _snapshot(tmp_path)
    for command in ("invert", "imagic"):
        code, _, err = run_cli(capsys, command, photo, "a red circle", "-o", path, "--overwrite")
        one_line_error(code, err, "peftedit edit folder")
        assert fragment in err
    assert _snapshot(tmp_path) == before


def test_cli_overwrites_an_earlier_edit(eps_dir, photo, tmp_path, capsys):
    folder = imagic_edit().save(tmp_path / "edit")
    args = ["--model", eps_dir, "--method", "ddim", "--steps", 2, "--set", "runtime.device=cpu", "-o", folder]
    code, _, err = run_cli(capsys, "invert", photo, "a red circle", *args, "--overwrite")
    assert code == 0, err
    assert Artifact.load(folder).method == "ddim"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", EDIT_FILE, "preview.png"]


def _changed(make, **tensors):
    """``make()`` with some tensors replaced (saved normally: its checksums fit, as a hand-made edit's would)."""

    def changed():
        artifact = make()
        artifact.tensors.update(tensors)
        return artifact

    return changed


def _nan(shape):
    values = torch.randn(*shape)
    values[0, 0] = float("nan")
    return values


# (edit, what its tensors become, what loading it says)
BAD_TENSORS = {
    "e_opt narrower": (_changed(imagic_edit, e_opt=torch.randn(1, 77, 4)), "does not agree with the edit's other"),
    "e_opt a batch of 2": (_changed(imagic_edit, e_opt=torch.randn(2, 77, 8)), "does not agree"),
    "e_tgt flattened": (_changed(imagic_edit, e_tgt=torch.randn(77 * 8)), "expected 3 dimensions"),
    "e_opt with a NaN": (_changed(imagic_edit, e_opt=_nan((1, 77, 8))), "e_opt holds values that are not finite"),
    "e_opt integers": (_changed(imagic_edit, e_opt=torch.ones(1, 77, 8, dtype=torch.int32)), "expected floating"),
    "offsets for 2 of 3 steps": (_changed(direct_edit, offsets=torch.randn(2, 4, 2, 2)), "or its step count"),
    "z_T with 3 channels": (
        _changed(direct_edit, z_T=torch.randn(1, 3, 2, 2)),
        "z_0 has shape [1, 4, 2, 2], which does not",
    ),
    "z_T with an inf": (_changed(direct_edit, z_T=torch.full((1, 4, 2, 2), float("inf"))), "not finite"),
    "timesteps floats": (_changed(direct_edit, timesteps=torch.tensor([667.0, 334.0, 1.0])), "expected integers"),
    "timesteps booleans": (
        _changed(direct_edit, timesteps=torch.tensor([True, True, False])),
        "timesteps is bool, expected integers",
    ),
    "timesteps and offsets for 2 of 3 steps": (
        _changed(direct_edit, timesteps=torch.tensor([667, 1]), offsets=torch.randn(2, 4, 2, 2)),
        "timesteps has shape [2], which does not agree with the edit's other tensors or its step count",
    ),
}


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_tensors_a_renderer_would_trip_over_are_refused_on_load(case, saved, capsys):
    """A hand-made edit (checksums recomputed) with wrong shapes or non-finite values gave a traceback from deep in
    the renderer or, worse, a black picture with exit status 0."""
    make, said = BAD_TENSORS[case]
    folder = saved(make)
    with pytest.raises(ArtifactError, match=re.escape(said)):
        Artifact.load(folder)
    code, _, err = run_cli(capsys, "edit", str(folder))
    one_line_error(code, err, said)


def test_lora_weights_and_settings_peftedit_never_writes_are_refused(saved):
    def nan_lora():
        artifact = imagic_edit()
        artifact.lora["down.ff.lora_B.weight"] = _nan((16, RANK))
        return artifact

    with pytest.raises(ArtifactError, match="down.ff.lora_B.weight is not finite floating-point values"):
        Artifact.load(saved(nan_lora, "nan"))
    for key, value in (("lora_dropout", 0.9), ("init_lora_weights", "bogus"), ("bias", "all")):

        def other(key=key, value=value):
            artifact = imagic_edit()
            artifact.lora_config = {**artifact.lora_config, key: value}
            return artifact

        with pytest.raises(ArtifactError, match=f"lora_config.{key} is {value!r}; peftedit writes"):
            Artifact.load(saved(other, key))


def test_metadata_nested_too_deep_is_damaged_not_a_crash(saved):
    folder = saved(imagic_edit)
    _rewrite(folder, lambda header: header.update({"peftedit.meta": "[" * 100_000 + "]" * 100_000}), format_1=True)
    with pytest.raises(ArtifactError, match=r"damaged metadata \(RecursionError"):
        Artifact.load(folder)


def _relisted(folder) -> None:
    """Record the LoRA file's new digest in the header (both checksums recomputed: a deliberate hand edit)."""
    import hashlib

    from peftedit.artifact_checks import header_sha256

    digest = hashlib.sha256((folder / LORA_FILE).read_bytes()).hexdigest()
    header, tensors = _header(folder), load_file(str(folder / EDIT_FILE))
    header["peftedit.files"] = json.dumps({LORA_FILE: digest})
    header[HEADER_CHECKSUM] = header_sha256(header)
    save_file(tensors, str(folder / EDIT_FILE), metadata=header)


def test_a_lora_file_that_says_other_settings_or_holds_other_weights_is_refused(saved):
    """diffusers' load_lora_weights reads the LoRA file's own adapter config: one changed there rendered differently
    in vanilla diffusers than in peftedit; text-encoder weights were dropped by peftedit and refused by diffusers."""
    folder = saved(imagic_edit)
    path = folder / LORA_FILE
    with safe_open(str(path), framework="pt") as handle:
        weights, meta = {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())
    declared = json.loads(meta["lora_adapter_metadata"])
    for key, value in (("lora_alpha", 32), ("r", 4), ("target_modules", ["ff"]), ("target_modules", ["ff", "attn"])):
        said = json.dumps({**declared, f"unet.{key}": value})
        save_file(weights, str(path), metadata={**meta, "lora_adapter_metadata": said})
        _relisted(folder)
        with pytest.raises(ArtifactError, match="lora_adapter_metadata .what diffusers reads. differs"):
            Artifact.load(folder)
    extra = {**weights, "text_encoder.layer.lora_A.weight": torch.zeros(RANK, 4)}
    save_file(extra, str(path), metadata=meta)
    _relisted(folder)
    with pytest.raises(ArtifactError, match="holds weights peftedit does not write .text_encoder.layer.lora_A.weight"):
        Artifact.load(folder)
    save_file(weights, str(path), metadata=meta)
    _relisted(folder)
    assert Artifact.load(folder).lora_config["lora_alpha"] == 8.0  # as written: loads
