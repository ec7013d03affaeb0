"""The ``"torch"`` backend: the reference, differentiable by autograd, any device and dtype."""
from __future__ import annotations

import torch

from ..packing import pack, pad_varlen
from ..reference import disentangled_attention_reference
from .base import AttentionCall, Backend, VarlenCall


def _longest(cu_seqlens, max_seqlen: int) -> int:
    """Length of the longest sequence (>= 1), read from the offsets (one sync; ``max_seqlen`` while tracing)."""
    if torch.compiler.is_compiling() or cu_seqlens.device.type == "meta":
        return max_seqlen
    return max(1, min(max_seqlen, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())))


class TorchBackend(Backend):
    name = "torch"
    summary = "pure PyTorch reference: any device, dtype, head dim, mask and dropout; O(L^2) memory"
    supports_varlen = True

    def refusals(self, call: AttentionCall) -> list[str]:
        return []

    def forward(self, call: AttentionCall):
        return disentangled_attention_reference(
            call.query, call.key, call.value, call.pos_key, call.pos_query,
            position_buckets=call.position_buckets, max_relative_positions=call.max_relative_positions,
            attention_mask=call.attention_mask, scale=call.scale, dropout_p=call.dropout_p)

    def refusals_varlen(self, call: VarlenCall) -> list[str]:
        return []

    def forward_varlen(self, call: VarlenCall):
        """Pads to ``[N, H, L, D]`` with ``L`` the longest real sequence (not ``max_seqlen``, which
        may be far larger), runs the reference with a key mask, packs back."""
        lq, lk = _longest(call.cu_seqlens_q, call.max_seqlen_q), _longest(call.cu_seqlens_k, call.max_seqlen_k)
        q, _, qinfo = pad_varlen(call.query, call.cu_seqlens_q, lq)
        k, kmask, _ = pad_varlen(call.key, call.cu_seqlens_k, lk)
        v, _, _ = pad_varlen(call.value, call.cu_seqlens_k, lk)
        full = kmask[:, None, None, :].expand(-1, 1, lq, -1)
        out = disentangled_attention_reference(
            q, k, v, call.pos_key, call.pos_query, position_buckets=call.position_buckets,
            max_relative_positions=call.max_relative_positions, attention_mask=full, scale=call.scale,
            dropout_p=call.dropout_p)
        return pack(out.transpose(1, 2), qinfo)
