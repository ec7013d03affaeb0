"""The ``"torch"`` backend: the reference, differentiable by autograd, any device and dtype."""
from __future__ import annotations

from ..reference import disentangled_attention_reference
from .base import AttentionCall, Backend


class TorchBackend(Backend):
    name = "torch"
    summary = "pure PyTorch reference: any device, dtype, head dim, mask and dropout; O(L^2) memory"

    def refusals(self, call: AttentionCall) -> list[str]:
        return []

    def forward(self, call: AttentionCall):
        return disentangled_attention_reference(
            call.query, call.key, call.value, call.pos_key, call.pos_query,
            position_buckets=call.position_buckets, max_relative_positions=call.max_relative_positions,
            attention_mask=call.attention_mask, scale=call.scale, dropout_p=call.dropout_p)
