"""Pack a padded batch into one ``[total_tokens, ...]`` sequence and back (FlashAttention's ``cu_seqlens``).

:func:`pack_info` reads a ``[B, L]`` padding mask once; :func:`pack` / :func:`unpack`
then move any ``[B, L, ...]`` tensor to ``[T, ...]`` and back, reusable across all layers
of a forward.  Valid tokens must be contiguous in each row (right or left padding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackInfo:
    """Where the valid tokens of a ``[B, L]`` batch go in the packed ``[T]`` sequence.

    indices: long ``[T]`` flat positions ``b * L + l`` of the valid tokens, in order.
    cu_seqlens: int32 ``[B + 1]`` sequence starts in the packed sequence.
    max_seqlen: longest sequence.  batch, seqlen: ``B``, ``L`` of the padded batch.
    kept: bool ``[T]``, the tokens the padded batch holds (:func:`pad_varlen` of unchecked offsets), or None: all.
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    seqlen: int
    kept: torch.Tensor | None = None

    @property
    def total(self) -> int:
        return self.indices.numel()


def is_contiguous_padding(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[B]``: whether each row's valid tokens form one contiguous run (right/left padding)."""
    m = mask.bool()
    L = m.shape[-1]
    n = m.sum(-1)
    pos = torch.arange(L, device=m.device)
    first = torch.where(m, pos, L).amin(-1)
    last = torch.where(m, pos, -1).amax(-1)
    return (n == 0) | (last - first + 1 == n)


def pack_info(mask: torch.Tensor) -> PackInfo:
    """``mask``: ``[B, L]``, nonzero = real token.  Raises ``ValueError`` when a row has holes
    (packing would change relative positions)."""
    if mask.dim() != 2:
        raise ValueError(f"pack_info needs a 2-D [B, L] padding mask, got shape {list(mask.shape)}")
    if not bool(is_contiguous_padding(mask).all()):
        raise ValueError("pack_info: some rows have non-contiguous valid tokens; packing would change their "
                         "relative positions (only right- or left-padded batches can be packed)")
    m = mask.bool()
    B, L = m.shape
    lens = m.sum(-1, dtype=torch.int32)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=m.device)
    cu[1:] = torch.cumsum(lens, 0)
    indices = m.reshape(-1).nonzero().squeeze(-1)
    return PackInfo(indices, cu, int(lens.max().item()) if B else 0, B, L)


def pack(x: torch.Tensor, info: PackInfo) -> torch.Tensor:
    """``[B, L, ...] -> [T, ...]`` (differentiable)."""
    return x.reshape(info.batch * info.seqlen, *x.shape[2:]).index_select(0, info.indices)


def unpack(x: torch.Tensor, info: PackInfo, fill: float = 0.0) -> torch.Tensor:
    """``[T, ...] -> [B, L, ...]`` with ``fill`` at padded positions (differentiable)."""
    out = x.new_full((info.batch * info.seqlen, *x.shape[1:]), fill)
    out = out.index_copy(0, info.indices, x)
    return out.view(info.batch, info.seqlen, *x.shape[1:])


def pad_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int):
    """``[T, H, D] -> ([N, H, max_seqlen, D], key mask bool [N, max_seqlen], PackInfo)`` for sequences
    given by ``cu_seqlens`` (int ``[N + 1]``).  Every shape follows from ``T``, ``N`` and ``max_seqlen`` (no
    ``nonzero``), so fake tensors and tracing see no data-dependent size.  Offsets that are not valid (unchecked:
    while tracing, or ``check_offsets=False``) give wrong rows, never an index out of range: a token no sequence
    covers within ``max_seqlen`` is left out (``PackInfo.kept``; :func:`pack_padded_varlen` gives it 0)."""
    N, T, L = cu_seqlens.numel() - 1, x.shape[0], max_seqlen
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    mask = torch.arange(L, device=x.device)[None, :] < lens[:, None]
    token = torch.arange(T, device=x.device)
    seq = torch.searchsorted(cu[1:].contiguous(), token, right=True).clamp_(max=N - 1)  # each packed token's
    pos = token - cu[seq]
    kept = (pos >= 0) & (pos < lens[seq]) & (pos < L)
    indices = torch.where(kept, seq * L + pos, 0)
    # added, not copied: a token left out adds 0 to slot 0 instead of overwriting it
    src = torch.where(kept.view(T, *[1] * (x.dim() - 1)), x, 0)
    frame = x.new_zeros((N * L, *x.shape[1:])).index_add(0, indices, src)
    info = PackInfo(indices, cu_seqlens, L, N, L, kept)
    return frame.view(N, L, *x.shape[1:]).transpose(1, 2), mask, info


def pack_padded_varlen(x: torch.Tensor, info: PackInfo) -> torch.Tensor:
    """``[N, L, ...] -> [T, ...]`` for :func:`pad_varlen`'s ``info`` (differentiable): 0 for a token it left out."""
    out = pack(x, info)
    return torch.where(info.kept.view(-1, *[1] * (out.dim() - 1)), out, 0)
