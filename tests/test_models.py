"""Weight probes that identify an artifact's base model."""

from __future__ import annotations

import torch
from safetensors import safe_open

from peftedit.demo import DEMO_MODEL_DIR
from peftedit.models import PROBE_PER_TENSOR, probe_indices

SD_TOKEN_EMBEDDING = 49408 * 768  # over 2**24 values: float32 cannot hold its last index


def test_probe_stays_inside_large_tensors():
    index = probe_indices(SD_TOKEN_EMBEDDING)
    assert index.dtype == torch.int64 and len(index) == PROBE_PER_TENSOR
    assert index[0] == 0 and index[-1] == SD_TOKEN_EMBEDDING - 1
    assert bool((index[1:] > index[:-1]).all())
    assert probe_indices(1).tolist() == [0] * PROBE_PER_TENSOR


def test_probe_positions_unchanged_for_the_demo_model():
    """Artifacts written before the integer positions used float32 linspace; on the demo model both agree."""
    sizes = set()
    for path in DEMO_MODEL_DIR.glob("*/*.safetensors"):
        with safe_open(str(path), "pt") as weights:
            sizes |= {weights.get_tensor(key).numel() for key in weights.keys()}
    assert len(sizes) > 10
    for numel in sizes:
        old = torch.linspace(0, numel - 1, PROBE_PER_TENSOR).long()
        assert torch.equal(probe_indices(numel), old), numel
