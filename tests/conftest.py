"""Tiny Stable Diffusion models built in code (no download) and small input photos."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image, ImageDraw

from peftedit.config import RuntimeConfig
from peftedit.models import load_model
from peftedit.tiny import build_pipeline, write_tokenizer

# One thread: on a shared 2-core machine two threads per process spin far slower on these tiny models.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _model_dir(tmp_path_factory, tokenizer_dir, prediction_type: str, seed: int = 0):
    folder = tmp_path_factory.mktemp(f"tiny-{prediction_type}-{seed}")
    build_pipeline(tokenizer_dir, prediction_type=prediction_type, seed=seed).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=["epsilon", "v_prediction"])
def tiny_dir(request, tmp_path_factory, tokenizer_dir):
    """A saved tiny SD folder, once per prediction type."""
    return _model_dir(tmp_path_factory, tokenizer_dir, request.param)


@pytest.fixture(scope="session")
def eps_dir(tmp_path_factory, tokenizer_dir):
    return _model_dir(tmp_path_factory, tokenizer_dir, "epsilon")


@pytest.fixture(scope="session")
def other_dir(tmp_path_factory, tokenizer_dir):
    """Same architecture as ``eps_dir``, other weights."""
    return _model_dir(tmp_path_factory, tokenizer_dir, "epsilon", seed=1)


@pytest.fixture
def tiny_model(tiny_dir):
    return load_model(str(tiny_dir), RuntimeConfig(device="cpu"))


@pytest.fixture
def eps_model(eps_dir):
    return load_model(str(eps_dir), RuntimeConfig(device="cpu"))


def write_photo(folder):
    """A small non-square RGB picture: a red disc and a blue bar on white, saved as ``folder``/photo.png."""
    image = Image.new("RGB", (48, 40), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 6, 26, 26), fill=(220, 40, 40))
    draw.rectangle((30, 10, 42, 34), fill=(40, 90, 220))
    path = folder / "photo.png"
    image.save(path)
    return path


@pytest.fixture
def photo(tmp_path):
    """:func:`write_photo` in the test's own folder."""
    return write_photo(tmp_path)


@pytest.fixture(scope="session")
def shared_photo(tmp_path_factory):
    """The same picture for session- and module-scoped fixtures (which must not change it)."""
    return write_photo(tmp_path_factory.mktemp("photo"))


@pytest.fixture(autouse=True)
def _peftedit_logs_propagate():
    """Let caplog see peftedit's warnings even after the CLI configured its own handler."""
    logger = logging.getLogger("peftedit")
    logger.propagate = True
    logger.handlers[:] = []
    yield
