"""The ``"torch"`` backend: the reference, differentiable by autograd, any device and dtype.

Its entry points are the ops ``deberta_fast::torch_attention`` and ``deberta_fast::torch_attention_varlen``,
registered as *composite* ops (``CompositeImplicitAutograd``): ``torch.compile``'s graph and ``torch.export``'s
program hold one op per attention call, as for the triton and cuda backends, and everything below them (AOT
autograd, inductor, ``ExportedProgram.run_decompositions``, the ONNX exporter) sees the reference's aten ops, so
autograd, dropout (torch's RNG, HF's stream) and ONNX export work unchanged.  The decomposition is also the ops'
fake (meta) implementation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..packing import pack_padded_varlen, pad_varlen
from ..positions import values_unreadable
from ..reference import disentangled_attention_reference
from .base import AttentionCall, Backend, VarlenCall


def _longest(cu_seqlens, max_seqlen: int) -> int:
    """Length of the longest sequence (>= 1), read from the offsets (one sync; ``max_seqlen`` while tracing)."""
    if values_unreadable(cu_seqlens):
        return max_seqlen
    return max(1, min(max_seqlen, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())))


torch.library.define(
    "deberta_fast::torch_attention",
    "(Tensor query, Tensor key, Tensor value, Tensor? pos_key, Tensor? pos_query, Tensor? attention_mask, "
    "int position_buckets, int max_relative_positions, float scale, float dropout_p) -> Tensor")


@torch.library.impl("deberta_fast::torch_attention", "CompositeImplicitAutograd")
def torch_attention(query: Tensor, key: Tensor, value: Tensor, pos_key: Optional[Tensor], pos_query: Optional[Tensor],
                    attention_mask: Optional[Tensor], position_buckets: int, max_relative_positions: int,
                    scale: float, dropout_p: float) -> Tensor:
    """``[B,H,Lq,D]``: :func:`deberta_fast.reference.disentangled_attention_reference` (validated inputs)."""
    return disentangled_attention_reference(
        query, key, value, pos_key, pos_query, position_buckets=position_buckets,
        max_relative_positions=max_relative_positions, attention_mask=attention_mask, scale=scale,
        dropout_p=dropout_p)


torch.library.define(
    "deberta_fast::torch_attention_varlen",
    "(Tensor query, Tensor key, Tensor value, Tensor? pos_key, Tensor? pos_query, Tensor cu_seqlens_q, "
    "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, int position_buckets, "
    "int max_relative_positions, float scale, float dropout_p) -> Tensor")


@torch.library.impl("deberta_fast::torch_attention_varlen", "CompositeImplicitAutograd")
def torch_attention_varlen(query: Tensor, key: Tensor, value: Tensor, pos_key: Optional[Tensor],
                           pos_query: Optional[Tensor], cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                           max_seqlen_k: int, position_buckets: int, max_relative_positions: int, scale: float,
                           dropout_p: float) -> Tensor:
    """``[Tq,H,D]``: pads to ``[N,H,L,D]`` with ``L`` the longest real sequence (``max_seqlen`` while tracing;
    it may be far larger), runs the reference with a key mask, packs back."""
    lq, lk = _longest(cu_seqlens_q, max_seqlen_q), _longest(cu_seqlens_k, max_seqlen_k)
    q, _, qinfo = pad_varlen(query, cu_seqlens_q, lq)
    k, kmask, _ = pad_varlen(key, cu_seqlens_k, lk)
    v, _, _ = pad_varlen(value, cu_seqlens_k, lk)
    full = kmask[:, None, None, :].expand(-1, 1, lq, -1)
    out = disentangled_attention_reference(
        q, k, v, pos_key, pos_query, position_buckets=position_buckets, max_relative_positions=max_relative_positions,
        attention_mask=full, scale=scale, dropout_p=dropout_p)
    return pack_padded_varlen(out.transpose(1, 2), qinfo)


class TorchBackend(Backend):
    name = "torch"
    summary = "pure PyTorch reference: any device, dtype, head dim, mask and dropout; O(L^2) memory"
    supports_varlen = True

    def refusals(self, call: AttentionCall) -> list[str]:
        return []

    def forward(self, call: AttentionCall):
        return torch.ops.deberta_fast.torch_attention(
            call.query, call.key, call.value, call.pos_key, call.pos_query, call.attention_mask,
            call.position_buckets, call.max_relative_positions, float(call.scale), float(call.dropout_p))

    def refusals_varlen(self, call: VarlenCall) -> list[str]:
        return []

    def forward_varlen(self, call: VarlenCall):
        return torch.ops.deberta_fast.torch_attention_varlen(
            call.query, call.key, call.value, call.pos_key, call.pos_query, call.cu_seqlens_q, call.cu_seqlens_k,
            call.max_seqlen_q, call.max_seqlen_k, call.position_buckets, call.max_relative_positions,
            float(call.scale), float(call.dropout_p))
