r"""Pure-PyTorch reference of DeBERTa's disentangled attention: the oracle of every kernel.

Math (one head; ``i`` a query, ``j`` a key, ``span`` = half the rows of the tables)::

    slot(i, j) = clamp(delta(i - j) + span, 0, 2*span - 1)
    delta(d)   = log_bucket(d)  if position_buckets > 0  else  d
    s[i, j]    = scale * ( q_i . k_j                     # content -> content
                         + q_i . pos_key[slot(i, j)]     # c2p  (if pos_key given)
                         + k_j . pos_query[slot(i, j)] ) # p2c  (if pos_query given)
    p          = softmax_j(mask(s));   out_i = sum_j dropout(p)[i, j] v_j

``scale`` defaults to ``1 / sqrt(D * (1 + #relative terms))`` with the square
root taken in float32, as HF does.  HF gathers p2c at ``-delta(j - i)``, which
equals ``delta(i - j)`` (the bucket function is odd), hence one slot for both.

Masks follow HF: a position the mask zeroes gets ``finfo.min`` before the
softmax, so a query row with every key masked becomes *uniform* over all
``Lk`` keys (HF's padded query rows).  A 2-D ``[B, Lk]`` mask with
``Lq == Lk`` is HF's padding mask, i.e. the outer product ``m_i * m_j``; with
``Lq != Lk`` it masks keys only.  3-D ``[B, Lq, Lk]`` and 4-D ``[B, 1|H, Lq, Lk]``
masks are used as given (nonzero = attend), a query dim of 1 broadcast over the queries (HF's extended
``[B, 1, 1, Lk]`` mask: keys masked, no query row made uniform but one with no key; the kernels serve it as a key
mask).  Here masked scores are ``-inf`` and uniform rows are zero rows, which gives HF's probabilities exactly.

DeBERTa v1 is the same function with ``position_buckets = -1``, ``span =
min(max(Lq, Lk), max_relative_positions)`` and HF's ``1/scale`` folded into
``scale``.  A caller-supplied ``relative_pos`` (HF's argument) replaces
``delta``; then c2p reads ``rel[i, j]`` and p2c reads ``-rel[j, i]`` exactly as
HF does.  All tensors are materialised ``[B, H, Lq, Lk]``: quadratic memory,
for checking and for CPU use.
"""
from __future__ import annotations


import functools

import torch
import torch.nn.functional as F

from .positions import relative_slot_table, trace_constant, trimmed_slot_table, values_unreadable

__all__ = ["default_scale", "mask_kind", "key_mask_of", "key_uniform_rows", "normalize_mask", "slot_index",
           "disentangled_attention_reference"]


@functools.lru_cache(maxsize=None)
def _hf_scale(head_dim: int, num_rel_terms: int) -> float:
    return 1.0 / torch.sqrt(torch.tensor(head_dim, dtype=torch.float, device="cpu") * (1 + num_rel_terms)).item()


@trace_constant  # torch.compile / export: evaluated once while tracing, a constant
def _hf_scale_constant(head_dim: int, num_rel_terms: int) -> float:
    return _hf_scale(head_dim, num_rel_terms)


def _specialized(n) -> int:
    """A symbolic size (``torch.compile(dynamic=True)`` marks every dim dynamic, the head dim too) as the Python int it
    is at trace time, by comparisons the compiler turns into guards (``assume_constant_result`` takes no symbols): the
    scale of a head dim is a constant of the graph, which recompiles for another head dim."""
    lo, hi = 0, 1 << 31
    while lo < hi:
        mid = (lo + hi) // 2
        if n <= mid:
            hi = mid
        else:
            lo = mid + 1
    return lo


def default_scale(head_dim: int, num_rel_terms: int) -> float:
    """``1 / sqrt(D * (1 + terms))`` with HF's float32 square root, computed as HF does (torch on CPU,
    not always the correctly rounded sqrt), once per shape so later calls do no tensor work."""
    if torch.compiler.is_compiling():
        return _hf_scale_constant(_specialized(head_dim), int(num_rel_terms))
    return _hf_scale(int(head_dim), int(num_rel_terms))


def mask_kind(attention_mask, batch: int, heads: int, q_len: int, k_len: int) -> str:
    """Validate a user mask (shape, type) and return its kind: ``"none"`` | ``"key"`` (a key mask: ``[B, Lk]``, HF's
    padding mask, or one broadcast over the heads and queries, ``[B|1, 1, Lk]`` / ``[B|1, 1, 1, Lk]``, as HF's
    attention broadcasts an extended mask: keys masked, no query row made uniform; :func:`key_mask_of`) | ``"full"``
    (``[B, Lq, Lk]`` or ``[B|1, 1|H, 1|Lq, Lk]`` otherwise, a query dim of 1 broadcast over the queries).  No tensor
    work."""
    if attention_mask is None:
        return "none"
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    m = attention_mask
    if m.dim() == 2:
        if m.shape != (batch, k_len):
            raise ValueError(
                f"a 2-D attention_mask must be [B, Lk] = [{batch}, {k_len}] (key padding), got {list(m.shape)}")
        return "key"
    if m.dim() == 3:
        m = m[:, None]
    if m.dim() != 4:
        raise ValueError(
            f"attention_mask must be [B, Lk], [B, Lq, Lk] or [B, 1|H, Lq, Lk]; got {m.dim()}-D {list(m.shape)}")
    b, h, lq, lk = m.shape
    if b not in (1, batch) or h not in (1, heads) or lq not in (1, q_len) or lk != k_len:
        raise ValueError(
            f"attention_mask of shape {list(attention_mask.shape)} does not fit B={batch}, H={heads}, "
            f"Lq={q_len}, Lk={k_len}: expected [B, 1|Lq, Lk] or [B|1, 1|H, 1|Lq, Lk]")
    return "key" if h == lq == 1 else "full"


def key_mask_of(attention_mask: torch.Tensor, batch: int) -> torch.Tensor:
    """bool ``[B, Lk]`` of a mask of kind ``"key"`` (:func:`mask_kind`): ``[B, Lk]`` itself, ``[B|1, 1, Lk]`` /
    ``[B|1, 1, 1, Lk]`` as a view (a batch dim of 1 expanded, stride 0), nonzero = attend."""
    if attention_mask.dim() == 2:
        return attention_mask.bool()
    lk = attention_mask.shape[-1]  # (not -1: ambiguous for an empty batch)
    return attention_mask.reshape(attention_mask.shape[0], lk).bool().expand(batch, lk)


def key_uniform_rows(key_mask: torch.Tensor, q_len: int, pads_queries: bool = True) -> torch.Tensor:
    """bool ``[B, 1, Lq]``: the query rows HF makes uniform under a key mask (bool ``[B, Lk]``): with ``Lq == Lk``
    and ``pads_queries`` (a 2-D padding mask: HF's ``[B, L, L]`` mask masks the padded rows' every key) the padded
    rows, else (``Lq != Lk``, or a mask broadcast over the queries) the rows of a batch entry with no key at all."""
    if pads_queries and q_len == key_mask.shape[1]:
        uniform = ~key_mask  # also covers a row of a sequence with no key at all (every key masked)
    else:
        uniform = (~key_mask.any(-1, keepdim=True)).expand(key_mask.shape[0], q_len)
    return uniform.unsqueeze(1)


def normalize_mask(attention_mask, batch: int, heads: int, q_len: int, k_len: int):
    """Validate a user mask and return ``(kind, key_mask, full_mask, uniform_rows)``.

    kind: ``"none"`` | ``"key"`` | ``"full"`` (:func:`mask_kind`).
    key_mask: bool ``[B, Lk]`` (kind key, :func:`key_mask_of`).  full_mask: bool ``[B|1, 1|H, Lq, Lk]`` (kind full; a
    mask broadcast over the queries as an expanded view).
    uniform_rows: bool ``[B, 1|H, Lq]``: rows with no key to attend (HF makes them uniform).
    """
    kind = mask_kind(attention_mask, batch, heads, q_len, k_len)
    if kind == "none":
        return "none", None, None, None
    if kind == "key":
        km = key_mask_of(attention_mask, batch)
        return "key", km, None, key_uniform_rows(km, q_len, attention_mask.dim() == 2)
    m = attention_mask[:, None] if attention_mask.dim() == 3 else attention_mask
    fm = m.bool()
    if fm.shape[2] != q_len:  # [.., 1, Lk]: the same keys for every query (a stride-0 view, no copy)
        fm = fm.expand(fm.shape[0], fm.shape[1], q_len, k_len)
    return "full", None, fm, ~fm.any(-1)


def slot_index(q_len, k_len, position_buckets, max_relative_positions, span, device, relative_pos=None):
    """``(c2p_idx, p2c_idx)``, both long ``[Lq, Lk]``: rows of pos_key / pos_query per (i, j)."""
    if relative_pos is None:
        table = relative_slot_table(q_len, k_len, position_buckets, max_relative_positions, span, device).long()
        i = torch.arange(q_len, device=device)[:, None]
        j = torch.arange(k_len, device=device)[None, :]
        idx = table[i - j + k_len - 1]
        return idx, idx
    rel = relative_pos.to(device=device, dtype=torch.long)
    while rel.dim() > 2:
        if rel.shape[0] != 1:
            raise ValueError(f"relative_pos must be [Lq, Lk] (or with leading 1-sized dims), "
                             f"got {list(relative_pos.shape)}")
        rel = rel[0]
    if tuple(rel.shape) != (q_len, k_len):
        raise ValueError(f"relative_pos must be [Lq, Lk] = [{q_len}, {k_len}], got {list(relative_pos.shape)}")
    c2p = torch.clamp(rel + span, 0, 2 * span - 1)
    p2c = torch.clamp(-rel.t() + span, 0, 2 * span - 1) if q_len == k_len else None
    return c2p, p2c


def _expand_pos(pos, batch, name):
    if pos is None:
        return None
    if pos.dim() == 3:
        return pos[None].expand(batch, *pos.shape)
    return pos


def disentangled_attention_reference(
    query, key, value, pos_key=None, pos_query=None, *,
    position_buckets: int, max_relative_positions: int,
    attention_mask=None, scale=None, dropout_p: float = 0.0,
    relative_pos=None, return_probs: bool = False, return_lse: bool = False,
):
    """Reference forward.  ``query [B,H,Lq,D]``, ``key``/``value [B,H,Lk,D]``,
    ``pos_key``/``pos_query [H|B,H, 2*span, D]`` or None.  Returns ``out [B,H,Lq,D]``,
    plus ``probs [B,H,Lq,Lk]`` (after dropout) and/or ``lse [B,H,Lq]`` (float32 log-sum-exp
    of the scaled, masked scores; ``log(Lk)`` on uniform rows) when asked."""
    B, H, Lq, D = query.shape
    Lk = key.shape[-2]
    n_terms = (pos_key is not None) + (pos_query is not None)
    if scale is None:
        scale = default_scale(D, n_terms)
    scores = torch.matmul(query, key.transpose(-1, -2) * scale)
    if n_terms:
        span = (pos_key if pos_key is not None else pos_query).shape[-2] // 2
        c2p_idx, p2c_idx = slot_index(Lq, Lk, position_buckets, max_relative_positions, span,
                                      query.device, relative_pos)
        # only the rows of the tables some (i, j) uses take part (short sequences use few of 2*span)
        rows = slice(0, 2 * span)
        # (the range is read once per shape; not while tracing, nor from fake or meta tensors)
        if relative_pos is None and not values_unreadable(query):
            _, lo, hi = trimmed_slot_table(Lq, Lk, position_buckets, max_relative_positions, span, query.device)
            rows, c2p_idx = slice(lo, hi + 1), c2p_idx - lo
            p2c_idx = c2p_idx
        if pos_key is not None:
            c2p = torch.matmul(query, _expand_pos(pos_key, B, "pos_key")[..., rows, :].transpose(-1, -2))
            c2p = torch.gather(c2p, -1, c2p_idx.expand(B, H, Lq, Lk))  # [B,H,Lq,rows] -> [B,H,Lq,Lk]
            scores = scores + c2p * scale
        if pos_query is not None:
            if p2c_idx is None:
                raise ValueError("p2c with a caller-supplied relative_pos needs Lq == Lk (as in HF)")
            p2c = torch.matmul(key, _expand_pos(pos_query, B, "pos_query")[..., rows, :].transpose(-1, -2))
            p2c = torch.gather(p2c, -1, p2c_idx.t().expand(B, H, Lk, Lq)).transpose(-1, -2)
            scores = scores + p2c * scale
    kind, key_mask, full_mask, uniform = normalize_mask(attention_mask, B, H, Lq, Lk)
    if kind == "key":
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    elif kind == "full":
        scores = scores.masked_fill(~full_mask, float("-inf"))
    if uniform is not None:
        scores = scores.masked_fill(uniform[..., None], 0.0)
    probs = F.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, value)
    if not (return_probs or return_lse):
        return out
    res = (out,)
    if return_probs:
        res += (probs,)
    if return_lse:
        res += (torch.logsumexp(scores.float(), dim=-1),)
    return res
