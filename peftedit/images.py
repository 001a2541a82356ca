"""Reading photos the way users have them, and the pictures peftedit writes (grids).

Policy (documented in the README): the image is decoded fully (a corrupt file is an error), rotated by its EXIF
orientation, converted to RGB (transparency composited on white; 16-bit and float scaled to 8 bits), then the
shorter side is resized to the model's resolution (Lanczos) and the centre square is cropped. Images under
``MIN_SIDE`` pixels are refused; images over ``MAX_PIXELS`` are refused before decoding.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from .errors import PeftEditError, one_line

log = logging.getLogger("peftedit")

MIN_SIDE = 32
MAX_PIXELS = 80_000_000
# A crop that drops more than this share of the picture is worth a warning.
CROP_WARN_SHARE = 0.5


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F":
            top = max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def normalise(image: Image.Image, where: str) -> Image.Image:
    """The input policy for an opened image (a file's or one made in memory): refused over ``MAX_PIXELS`` before
    decoding, decoded fully, turned by its EXIF orientation, refused under ``MIN_SIDE``, converted to 8-bit RGB.

    ``where`` names the image in errors (its path). The caller's image is not changed, apart from being decoded.
    """
    if image.width * image.height > MAX_PIXELS:
        raise PeftEditError(f"{where}: {image.width}x{image.height} is too large (max {MAX_PIXELS} pixels)")
    try:
        image.load()
        upright = ImageOps.exif_transpose(image)
        upright.load()
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise PeftEditError(f"{where}: corrupt or truncated image ({err})") from None
    except (ValueError, AssertionError):  # Pillow's answer to decoding an image whose file was closed
        raise PeftEditError(
            f"{where}: the image cannot be read (was its file closed before it was decoded?)"
        ) from None
    if min(upright.size) < MIN_SIDE:
        raise PeftEditError(
            f"{where}: {upright.width}x{upright.height} is too small (each side must be >= {MIN_SIDE} px)"
        )
    try:
        return _to_rgb(upright)
    except ValueError as err:
        raise PeftEditError(f"{where}: mode {upright.mode} cannot be converted to RGB ({err})") from None


def open_image(path: str | Path, note_frames: bool = False) -> tuple[Image.Image, str]:
    """Decode an image file fully, apply its EXIF orientation; returns it as 8-bit RGB and its original mode.
    ``note_frames``: warn that an animated or multi-page file gives its first frame (``load_image`` asks, so a photo
    checked early and loaded later warns once)."""
    path = Path(path)
    if path.is_dir():
        raise PeftEditError(f"{path} is a folder, not an image file")
    if path.exists() and not path.is_file():
        raise PeftEditError(f"{path} is not a regular file (a device, a pipe?); give an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as raw:
            # MPO: a phone camera's JPEG with a gain or depth map as a second image, not frames
            if note_frames and getattr(raw, "is_animated", False) and raw.format != "MPO":
                log.warning("%s has %d frames (animated or multi-page): the first is used", path, raw.n_frames)
            return normalise(raw, str(path)), raw.mode
    except UnidentifiedImageError:
        raise PeftEditError(f"{path}: not an image file (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as err:  # Pillow refuses far past MAX_PIXELS before ``normalise`` can
        raise PeftEditError(f"{path}: too large (max {MAX_PIXELS} pixels; {err})") from None
    except (OSError, SyntaxError) as err:
        raise PeftEditError(f"{path}: corrupt or truncated image ({err})") from None


def fit_square(image: Image.Image, side: int) -> Image.Image:
    """Resize the shorter side to ``side`` and crop the centre square."""
    width, height = image.size
    if min(width, height) < side:
        log.warning(
            "image is %dx%d, smaller than the model's %d px: it is upscaled",
            width,
            height,
            side,
        )
    if 1 - min(width, height) / max(width, height) > CROP_WARN_SHARE:
        log.warning(
            "image is %dx%d: the centre square crop drops more than half of it",
            width,
            height,
        )
    scale = side / min(width, height)
    resized = image.resize(
        (max(side, round(width * scale)), max(side, round(height * scale))),
        Image.LANCZOS,
    )
    left = (resized.width - side) // 2
    top = (resized.height - side) // 2
    return resized.crop((left, top, left + side, top + side))


# How an image passed as a PIL object is named in errors, unless Pillow opened it from a file (then: that path).
IN_MEMORY = "input image"


def load_image(source: str | Path | Image.Image, side: int) -> tuple[Image.Image, dict]:
    """Open (a path) or take (a PIL image), normalise and crop an input photo for a model of ``side`` pixels.

    Both go through ``normalise``, so a PIL image gets what its file would. Returns the square RGB image and facts
    for the artifact: sha256 and name of the file (None for a PIL image), size after the EXIF turn, original mode.
    """
    if isinstance(source, Image.Image):
        image, sha256, name = normalise(source, getattr(source, "filename", "") or IN_MEMORY), None, None
        mode = source.mode
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        image, mode = open_image(path, note_frames=True)
        sha256, name = file_sha256(path), path.name
    else:
        raise PeftEditError(f"the image must be a file path or a PIL image, not {type(source).__name__}")
    info = {"sha256": sha256, "name": name, "size": list(image.size), "mode": mode}
    return fit_square(image, side), info


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a [1, 3, H, W] float tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def to_image(tensor: torch.Tensor) -> Image.Image:
    """A [1, 3, H, W] or [3, H, W] tensor in [-1, 1] as an 8-bit RGB image."""
    if tensor.dim() == 4:
        tensor = tensor[0]
    array = ((tensor.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB between two same-size 8-bit images."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def grid(images: list[Image.Image], labels: list[str] | None = None, min_cell: int = 128) -> Image.Image:
    """One row of images with a label under each; small images are enlarged (nearest) to ``min_cell``."""
    cell = max(min_cell, max(im.width for im in images))
    label_h = 14 if labels else 0
    sheet = Image.new("RGB", (cell * len(images), cell + label_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        resample = Image.NEAREST if im.width < cell else Image.LANCZOS
        sheet.paste(im.resize((cell, cell), resample), (i * cell, 0))
        if labels:
            _text(draw, (i * cell + 3, cell + 1), labels[i], "black")
    return sheet


def sheet(rows: list[tuple[str, list[Image.Image], str]], height: int = 160) -> Image.Image:
    """Rows of pictures under a caption each, as ``(caption, pictures, caption colour)``, every picture scaled to
    ``height`` (aspect kept): an overview of many results. A row with no pictures is its caption alone."""
    caption_h = 16
    widths = [sum(round(im.width * height / im.height) for im in images) for _, images, _ in rows]
    tall = sum(caption_h + (height if images else 0) for _, images, _ in rows)
    captions = [_text_width(caption) + 6 for caption, _, _ in rows]  # 3 px margin each side
    page = Image.new("RGB", (max(*widths, *captions), tall), "white")  # as wide as needed: no blank beside a grid
    draw = ImageDraw.Draw(page)
    y = 0
    for caption, images, colour in rows:
        _text(draw, (3, y + 2), caption, colour)
        y += caption_h
        x = 0
        for im in images:
            width = round(im.width * height / im.height)
            page.paste(im.convert("RGB").resize((width, height), Image.LANCZOS), (x, y))
            x += width
        y += height if images else 0
    return page


def eta_seed_grid(pictures: list[Image.Image | None], etas: list[float], seeds: list[int]) -> Image.Image:
    """Renders of every eta for each seed (in that order) as a sheet: a row per seed, a column per eta, each cell
    labelled; a ``None`` (a render that diverged) is a grey cell labelled so."""
    size = next(p for p in pictures if p is not None).size
    rows = []
    for row, seed in enumerate(seeds):
        cells = pictures[row * len(etas) : (row + 1) * len(etas)]
        labels = [f"eta {e:g}" + (" diverged" if p is None else "") for e, p in zip(etas, cells, strict=True)]
        cells = [Image.new("RGB", size, "gray") if p is None else p for p in cells]
        rows.append((f"seed {seed}", [grid(cells, labels)], "black"))
    return sheet(rows, height=rows[0][1][0].height)


# System fonts that Pillow finds by name, tried in this order for every caption: they cover more than ASCII (accents,
# Greek, Cyrillic, ...), where Pillow's default font is Latin only, and draw a space 3 px wide, where the default's
# 10 px font draws it about 1 px ("a photoofa" in batch.png). Size 10: the default FreeType font's.
WIDE_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "LiberationSans-Regular.ttf", "Arial Unicode.ttf", "arial.ttf")
# For captions with Chinese, Japanese or Korean characters, which none of those draws (boxes): the usual file names
# on Linux (Noto CJK, WenQuanYi), Windows and macOS, tried before WIDE_FONTS.
CJK_FONTS = (
    "NotoSansCJK-Regular.ttc",
    "NotoSansCJKsc-Regular.otf",
    "wqy-microhei.ttc",
    "wqy-zenhei.ttc",
    "msyh.ttc",
    "msgothic.ttc",
    "malgun.ttf",
    "PingFang.ttc",
    "Hiragino Sans GB.ttc",
    "AppleSDGothicNeo.ttc",
)
# Code point ranges of CJK scripts: kana, CJK ideographs and symbols, Hangul, full-width forms.
CJK_RANGES = ((0x2E80, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0xFF00, 0xFFEF), (0x20000, 0x2FA1F))
WIDE_FONT_SIZE = 10


@functools.cache
def _first_font(names: tuple[str, ...]):
    """The first of ``names`` that Pillow loads, or None (each list looked for once)."""
    from PIL import ImageFont

    for name in names:
        try:
            return ImageFont.truetype(name, WIDE_FONT_SIZE)
        except OSError:
            continue
    return None


def _wide_font():
    """The first of :data:`WIDE_FONTS` there is, or None."""
    return _first_font(WIDE_FONTS)


def _font_for(text: str):
    """The font captions with ``text`` are drawn in: a CJK one where the text has CJK characters and the system has
    such a font, else :func:`_wide_font` (None: Pillow's default)."""
    if any(low <= ord(c) <= high for c in text for low, high in CJK_RANGES):
        return _first_font(CJK_FONTS) or _wide_font()
    return _wide_font()


def _text_width(text: str) -> int:
    """How many pixels wide :func:`_text` draws ``text``."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    try:
        return math.ceil(draw.textlength(text, font=_font_for(text)))
    except UnicodeEncodeError:  # Pillow's bitmap font (no FreeType), which _text draws in Latin-1
        return math.ceil(draw.textlength(text.encode("latin-1", "replace").decode("latin-1")))


def _text(draw: ImageDraw.ImageDraw, at: tuple[int, int], text: str, fill: str) -> None:
    """Draw ``text`` in a system font where there is one (:func:`_font_for`). Pillow's default font is FreeType's where
    Pillow has FreeType (glyphs it lacks are drawn as boxes); its bitmap font otherwise, which encodes Latin-1 only:
    other characters become '?'."""
    font = _font_for(text)
    try:
        draw.text(at, text, fill=fill, font=font)
    except UnicodeEncodeError:
        draw.text(at, text.encode("latin-1", "replace").decode("latin-1"), fill=fill, font=font)


def read_picture(path: Path) -> Image.Image | None:
    """A picture to show (a preview, a render) as RGB, or None: absent, or unreadable (with a warning). For pictures
    nothing depends on; input photos go through :func:`open_image`."""
    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        log.warning("ignoring %s: not a readable image (%s)", path, one_line(err))
        return None
