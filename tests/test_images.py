"""Input photos as users have them: modes, sizes, EXIF, broken files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from peftedit import PeftEditError
from peftedit import images as images_mod
from peftedit.images import grid, load_image

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["couple_beach.jpeg", "milk_cookie.jpeg", "dog2_standing.png"])
def test_tedbench_photos_load_at_model_size(name):
    image, info = load_image(DATA / name, 64)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert info["name"] == name and len(info["sha256"]) == 64


def _save(tmp_path, image, name="in.png", **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("L", (50, 40), 128),
        lambda: Image.new("1", (50, 40), 1),
        lambda: Image.new("P", (50, 40), 3),
        lambda: Image.new("CMYK", (50, 40), (0, 0, 0, 0)),
        lambda: Image.fromarray(np.full((40, 50), 40000, dtype=np.uint16)),
    ],
    ids=["grayscale", "bilevel", "palette", "cmyk-as-jpeg", "16-bit"],
)
def test_odd_modes_become_rgb(tmp_path, make):
    image = make()
    path = _save(tmp_path, image, "in.jpg" if image.mode == "CMYK" else "in.png")
    out, info = load_image(path, 32)
    assert out.mode == "RGB" and out.size == (32, 32)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    path = _save(tmp_path, Image.fromarray(np.full((40, 50), 32768, dtype=np.uint16)))
    out, _ = load_image(path, 32)
    assert abs(int(np.asarray(out)[0, 0, 0]) - 128) <= 1


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (10, 10, 30, 30))
    out, _ = load_image(_save(tmp_path, rgba), 40)
    pixels = np.asarray(out)
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert tuple(pixels[20, 20]) == (0, 0, 255)


def test_a_palette_image_transparent_index_is_composited_on_white(tmp_path):
    """A GIF/PNG palette image's transparent colour goes through RGBA onto white, not its stored (black) colour."""
    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (10, 10, 30, 30))
    out, _ = load_image(_save(tmp_path, image, "in.gif", transparency=0), 40)
    assert tuple(np.asarray(out)[0, 0]) == (255, 255, 255) and tuple(np.asarray(out)[20, 20]) == (0, 0, 255)


def test_a_float_image_is_scaled_by_its_maximum():
    """Mode F (32-bit float) is scaled so its brightest value is 255, not read as 0-255 values."""
    out, _ = load_image(Image.fromarray(np.linspace(0, 2, 40 * 40, dtype=np.float32).reshape(40, 40), "F"), 40)
    assert np.asarray(out).max() == 255


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 40), "white")
    image.paste((255, 0, 0), (0, 0, 10, 40))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    path = _save(tmp_path, image, "rot.jpg", exif=exif, quality=95)
    upright, _ = images_mod.open_image(path)
    assert upright.size == (40, 60)
    top, bottom = np.asarray(upright)[2, 20], np.asarray(upright)[57, 20]
    assert top[0] > 200 and top[1] < 80 and bottom.min() > 200  # the strip is now along the top
    _, info = load_image(path, 40)
    assert info["size"] == [40, 60]


def test_non_square_is_centre_cropped(tmp_path):
    image = Image.new("RGB", (120, 40), "white")
    image.paste((0, 0, 0), (40, 0, 80, 40))  # black centre square
    out, _ = load_image(_save(tmp_path, image), 40)
    assert np.asarray(out).mean() < 5


def test_tiny_image_is_refused(tmp_path):
    with pytest.raises(PeftEditError, match="too small"):
        load_image(_save(tmp_path, Image.new("RGB", (16, 100))), 64)


def test_the_smallest_side_allowed_is_min_side_itself():
    """MIN_SIDE is the smallest side accepted (>=), one pixel less is refused."""
    side = images_mod.MIN_SIDE
    assert load_image(Image.new("RGB", (side, 100)), side)[0].size == (side, side)
    with pytest.raises(PeftEditError, match="too small"):
        load_image(Image.new("RGB", (side - 1, 100)), side)


def test_huge_image_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 1000)
    with pytest.raises(PeftEditError, match="too large"):
        load_image(_save(tmp_path, Image.new("RGB", (100, 100))), 64)


def test_an_image_pillow_calls_a_decompression_bomb_is_too_large(tmp_path, monkeypatch):
    """Pillow refuses to open far past its own limit; that was reported as a corrupt image."""
    path = _save(tmp_path, Image.new("RGB", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(PeftEditError, match=r"too large \(max 80000000 pixels; Image size \(10000 pixels\)"):
        load_image(path, 64)


def test_a_file_that_is_not_regular_is_not_called_missing(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(PeftEditError, match="is not a regular file"):
        load_image(fifo, 64)


def test_an_animated_image_warns_that_its_first_frame_is_used(tmp_path, caplog):
    path = tmp_path / "two.gif"
    first, second = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    first.save(path, save_all=True, append_images=[second])
    picture, _ = load_image(path, 64)
    assert caplog.text.count("has 2 frames (animated or multi-page): the first is used") == 1
    assert picture.getpixel((5, 5))[0] > 200  # red: the first frame
    caplog.clear()
    camera = tmp_path / "camera.jpg"  # MPO: a phone JPEG with a second image (a gain or depth map)
    first.save(camera, format="MPO", save_all=True, append_images=[second])
    with Image.open(camera) as opened:
        assert opened.format == "MPO" and opened.n_frames == 2
    load_image(camera, 64)
    assert "frames" not in caplog.text


def test_missing_corrupt_truncated_and_non_image_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "nope.png", 64)
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    with pytest.raises(PeftEditError, match="not an image"):
        load_image(text, 64)
    full = _save(tmp_path, Image.effect_noise((200, 200), 50).convert("RGB"), "full.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[:2000])
    with pytest.raises(PeftEditError, match="corrupt or truncated"):
        load_image(truncated, 64)


def test_grid_lays_images_out_in_a_row():
    sheet = grid([Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")], ["a", "b"])
    assert sheet.size == (256, 128 + 14)
    assert sheet.getpixel((10, 10)) == (255, 0, 0) and sheet.getpixel((200, 10)) == (0, 0, 255)


def _rotated_strip():
    image = Image.new("RGB", (60, 40), "white")
    image.paste((255, 0, 0), (0, 0, 10, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    return image, {"exif": exif, "quality": 95}


def _sixteen_bit_gray():
    return Image.fromarray(np.full((40, 50), 32768, dtype=np.uint16)), {}


def _transparent():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (10, 10, 30, 30))
    return rgba, {}


@pytest.mark.parametrize(
    "make, name",
    [
        (_sixteen_bit_gray, "gray16.png"),
        (_transparent, "rgba.png"),
        (_rotated_strip, "rot.jpg"),
        (None, "dog2_standing.png"),  # TEdBench: RGBA with EXIF
    ],
)
def test_a_pil_image_gets_what_its_file_gets(tmp_path, make, name):
    """The Python API takes PIL images too: they must go through the same policy as paths (16-bit scaling, alpha on
    white, EXIF turn), not a bare convert("RGB")."""
    if make is None:
        path = DATA / name
    else:
        image, kw = make()
        path = _save(tmp_path, image, name, **kw)
    from_path, path_info = load_image(path, 32)
    with Image.open(path) as opened:
        from_pil, pil_info = load_image(opened, 32)
    assert np.array_equal(np.asarray(from_pil), np.asarray(from_path))
    assert pil_info == {**path_info, "sha256": None, "name": None}


def test_pil_images_follow_the_policy():
    out, info = load_image(_sixteen_bit_gray()[0], 32)
    assert abs(int(np.asarray(out)[0, 0, 0]) - 128) <= 1 and info["mode"] == "I;16"
    out, _ = load_image(_transparent()[0], 40)
    assert tuple(np.asarray(out)[0, 0]) == (255, 255, 255) and tuple(np.asarray(out)[20, 20]) == (0, 0, 255)


def test_bad_pil_images_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(PeftEditError, match="input image: 8x8 is too small"):
        load_image(Image.new("RGB", (8, 8)), 64)
    path = _save(tmp_path, Image.new("RGB", (8, 8)), "small.png")
    with pytest.raises(PeftEditError, match="small.png: 8x8 is too small"):
        load_image(Image.open(path), 64)
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 1000)
    with pytest.raises(PeftEditError, match="too large"):
        load_image(Image.new("RGB", (100, 100)), 64)
    monkeypatch.undo()
    with Image.open(_save(tmp_path, Image.new("RGB", (40, 40)), "closed.png")) as closed:
        pass
    with pytest.raises(PeftEditError, match="cannot be read"):
        load_image(closed, 32)
    with pytest.raises(PeftEditError, match="a file path or a PIL image"):
        load_image(np.zeros((40, 40, 3), dtype=np.uint8), 32)


def test_captions_are_drawn_in_a_system_font_where_there_is_one():
    """Pillow's default font drew every Cyrillic, Greek or CJK glyph as the same box in batch.png and grids, and its
    spaces about 1 px wide: "a photo of a" read "a photoofa"."""
    if images_mod._wide_font() is None:
        pytest.skip(f"none of {images_mod.WIDE_FONTS} is installed here")
    tile = Image.new("RGB", (8, 8), "white")

    def drawn(caption):
        return np.asarray(images_mod.sheet([(caption, [], "black")])), np.asarray(grid([tile], [caption]))

    for one, other in zip(drawn("кот Ж"), drawn("кот Д"), strict=True):
        assert not np.array_equal(one, other)
    space = images_mod._wide_font().getlength(" ")
    assert space >= 3, f"{space} px"

    def ink_width(caption):  # of the caption row drawn by sheet
        row = np.asarray(images_mod.sheet([(caption, [], "black")]).convert("L"))[:12] < 128
        columns = np.flatnonzero(row.any(0))
        return columns[-1] - columns[0]

    assert ink_width("a b c d e") - ink_width("abcde") >= 4 * 3  # four spaces, each seen


def test_cjk_captions_take_a_cjk_font_where_the_system_has_one(monkeypatch):
    """DejaVu and the other wide fonts have no Chinese, Japanese or Korean glyphs: such captions were boxes."""
    if images_mod._wide_font() is None:
        pytest.skip(f"none of {images_mod.WIDE_FONTS} is installed here")
    images_mod._first_font.cache_clear()
    monkeypatch.setattr(images_mod, "CJK_FONTS", ("no-such-font.ttc",))  # a system without one: the wide font
    assert images_mod._font_for("猫 cat") is images_mod._wide_font()
    stand_in = images_mod._first_font(("DejaVuSerif.ttf",))  # any other installed font stands for a CJK one here
    if stand_in is None:
        pytest.skip("DejaVuSerif.ttf is not installed here")
    monkeypatch.setattr(images_mod, "CJK_FONTS", ("no-such-font.ttc", "DejaVuSerif.ttf"))
    for text in ("001 猫.png: a cat", "ねこ", "고양이", "ＡＢＣ"):
        assert images_mod._font_for(text).path == stand_in.path, text
    assert images_mod._font_for("a cat, кот, café") is images_mod._wide_font()
    images_mod._first_font.cache_clear()
