"""Attention as the null-text reference implementation runs it, for the baseline.

The reference (prompt-to-prompt's ``null_text_w_ptp`` notebook) replaces every attention layer's forward with one that
materialises the attention probabilities; while editing, its ``AttentionStore`` keeps the conditional half's maps of
every layer with at most 32x32 queries on the device, summed over steps. Here that is done with attention processors
(the official plug-in point): diffusers' ``AttnProcessor`` (explicit probabilities, no fused kernel) on every layer,
and for the edit peftedit's map-materialising P2P processor with a store that keeps maps as the reference does.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor

from peftedit.methods.p2p import ControlledAttention

STORE_MAX_QUERIES = 32**2  # the reference's AttentionStore keeps maps of layers with at most this many queries


class LayerStore:
    """Keeps one layer's attention maps (conditional half, all heads) summed over steps, like ``AttentionStore``."""

    def __init__(self, name: str, store: dict[str, torch.Tensor]) -> None:
        self.name, self.store = name, store

    def attend(self, probs: torch.Tensor, cross: bool, edit: bool, store: bool) -> torch.Tensor:
        """Add the conditional half of ``probs`` [batch, heads, queries, keys] to the store; returns them unchanged."""
        if probs.shape[2] <= STORE_MAX_QUERIES:
            kept = probs[probs.shape[0] // 2 :].detach()
            self.store[self.name] = kept if self.name not in self.store else self.store[self.name] + kept
        return probs


def materialise_attention(unet, store: dict[str, torch.Tensor] | None = None) -> None:
    """Explicit attention probabilities in every layer; with ``store``, also kept there as the reference does."""
    if store is None:
        unet.set_attn_processor(AttnProcessor())
        return
    processors = {name: ControlledAttention(LayerStore(name, store), False, True) for name in unet.attn_processors}
    unet.set_attn_processor(processors)
