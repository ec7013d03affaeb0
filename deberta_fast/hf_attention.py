"""Forward passes of HF's DeBERTa attention modules, routed through :func:`disentangled_attention`.

One function per HF family, taking the module as ``mod`` so that the same code
serves HF's own ``DisentangledSelfAttention`` (when patched) and
:class:`deberta_fast.DisentangledAttention` (same attribute names):

* :func:`v2_forward`: DeBERTa-v2/v3/mDeBERTa (``models/deberta_v2``).
* :func:`v1_forward`: DeBERTa v1 (``models/deberta``: fused ``in_proj``, ``q_bias``/``v_bias``,
  ``pos_proj``/``pos_q_proj``, span ``min(max(Lq, Lk), max_relative_positions)``, no buckets).

``relative_pos`` may be a tensor (HF's argument: used as given, through the
reference path unless it equals the canonical positions), None, or
:data:`CANONICAL` (what a patched encoder passes: positions come from the O(L)
slot table, never an ``[L, L]`` matrix).
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from .dispatch import disentangled_attention, disentangled_attention_varlen
from .positions import relative_delta
from .reference import default_scale, disentangled_attention_reference, normalize_mask


class _Canonical:
    """Marker passed as ``relative_pos`` by patched encoders: the standard positions."""

    def __repr__(self):
        return "deberta_fast.CANONICAL"


CANONICAL = _Canonical()


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, L, H*D] -> [B, H, L, D]`` (a view)."""
    return x.view(*x.shape[:-1], num_heads, -1).transpose(-2, -3)


def _merge(ctx: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D] -> [B, L, H*D]``."""
    B, H, L, D = ctx.shape
    return ctx.transpose(1, 2).reshape(B, L, H * D)


def _dropout_p(drop: nn.Module | None, training: bool) -> float:
    if drop is None or not training:
        return 0.0
    p = getattr(drop, "p", None)
    if p is None:  # transformers < 4.4x StableDropout
        p = getattr(drop, "drop_prob", 0.0)
    return float(p)


@functools.lru_cache(maxsize=None)
def _hf_conventions(cls) -> tuple[bool, bool]:
    """``(returns_tuple, zeroes_masked_rows)`` of the HF class being patched.

    transformers < 4.48 returns the context alone (no ``(context, None)``) and uses
    ``XSoftmax``, which gives fully masked query rows zero probabilities (later versions:
    uniform).  Read from the class's source, so any installed version is matched.
    """
    if not cls.__module__.startswith("transformers."):
        return True, False
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True, False
    return "(context_layer, None)" in src, "XSoftmax" in src


def conventions(mod) -> tuple[bool, bool]:
    """``_hf_conventions`` of ``mod``: stored on the module by ``patch`` (decided at patch time, so that
    nothing is introspected while torch.compile traces a forward), else read from its class now."""
    conv = mod.__dict__.get("_deberta_fast_conventions")
    return conv if conv is not None else _hf_conventions(type(mod))


def _finish(mod, ctx, probs, attention_mask, output_attentions):
    """Merge heads and return in the convention of the patched HF version."""
    returns_tuple, zero_rows = conventions(mod)
    if zero_rows and isinstance(attention_mask, torch.Tensor):
        B, H, Lq, _ = ctx.shape
        *_, uniform = normalize_mask(attention_mask, B, H, Lq, attention_mask.shape[-1])
        ctx = ctx.masked_fill(uniform[..., None], 0)
        probs = None if probs is None else probs.masked_fill(uniform[..., None], 0)
    out = _merge(ctx)
    if output_attentions:
        return out, probs
    return (out, None) if returns_tuple else out


def _is_canonical(relative_pos, q_len, k_len, buckets, max_rel) -> bool:
    """Whether a caller's ``relative_pos`` tensor is exactly ``delta(i - j)``."""
    rel = relative_pos
    while rel.dim() > 2 and rel.shape[0] == 1:
        rel = rel[0]
    if rel.dim() != 2 or tuple(rel.shape) != (q_len, k_len):
        return False
    d = torch.arange(q_len, device=rel.device)[:, None] - torch.arange(k_len, device=rel.device)[None, :]
    return torch.equal(rel.long(), relative_delta(d, buckets, max_rel))


def _attend(mod, q, k, v, pos_key, pos_query, *, buckets, max_rel, span, attention_mask, scale,
            output_attentions, relative_pos):
    """Run the core and return ``(context [B,H,Lq,D], probs or None)``."""
    dropout_p = _dropout_p(getattr(mod, "dropout", None), mod.training)
    backend = getattr(mod, "_deberta_fast_backend", "auto")
    if hasattr(attention_mask, "info"):  # PackedMask from the packed encoder: q, k, v are [1, H, T, D]
        info = attention_mask.info
        out = disentangled_attention_varlen(
            q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), pos_key, pos_query,
            info.cu_seqlens, info.cu_seqlens, info.max_seqlen, info.max_seqlen, position_buckets=buckets,
            max_relative_positions=max_rel, scale=scale, dropout_p=dropout_p, backend=backend,
            check_offsets=False)  # built by packing.pack_info
        return out.transpose(0, 1)[None], None
    custom = isinstance(relative_pos, torch.Tensor) and (pos_key is not None or pos_query is not None)
    if custom and _is_canonical(relative_pos, q.shape[-2], k.shape[-2], buckets, max_rel):
        custom = False
    if output_attentions or custom:
        out, probs = disentangled_attention_reference(
            q, k, v, pos_key, pos_query, position_buckets=buckets, max_relative_positions=max_rel,
            attention_mask=attention_mask, scale=scale, dropout_p=dropout_p,
            relative_pos=relative_pos if custom else None, return_probs=True)
        return out, (probs if output_attentions else None)
    out = disentangled_attention(
        q, k, v, pos_key, pos_query, position_buckets=buckets, max_relative_positions=max_rel,
        attention_mask=attention_mask, scale=scale, dropout_p=dropout_p, backend=backend)
    return out, None


def v2_forward(mod, hidden_states, attention_mask, output_attentions=False, query_states=None,
               relative_pos=None, rel_embeddings=None):
    """HF ``DisentangledSelfAttention.forward`` of DeBERTa-v2/v3.  Returns ``(context [B,L,H*D], probs|None)``."""
    if query_states is None:
        query_states = hidden_states
    H = mod.num_attention_heads
    q = _heads(mod.query_proj(query_states), H)
    k = _heads(mod.key_proj(hidden_states), H)
    v = _heads(mod.value_proj(hidden_states), H)
    types = mod.pos_att_type
    scale = default_scale(q.shape[-1], ("c2p" in types) + ("p2c" in types))
    pos_key = pos_query = None
    buckets = max_rel = span = -1
    if mod.relative_attention:
        if rel_embeddings is None:
            raise ValueError("relative_attention is on but rel_embeddings is None: pass the encoder's "
                             "get_rel_embedding() (HF's rel_embeddings argument)")
        buckets, max_rel, span = mod.position_buckets, mod.max_relative_positions, mod.pos_ebd_size
        rel = mod.pos_dropout(rel_embeddings)[: 2 * span]
        if mod.share_att_key:
            key_proj, query_proj = mod.key_proj, mod.query_proj
        else:
            key_proj, query_proj = getattr(mod, "pos_key_proj", None), getattr(mod, "pos_query_proj", None)
        if "c2p" in types:
            pos_key = _heads(key_proj(rel), H)
        if "p2c" in types:
            pos_query = _heads(query_proj(rel), H)
    if relative_pos is CANONICAL:
        relative_pos = None
    ctx, probs = _attend(mod, q, k, v, pos_key, pos_query, buckets=buckets, max_rel=max_rel, span=span,
                         attention_mask=attention_mask, scale=scale, output_attentions=output_attentions,
                         relative_pos=relative_pos)
    return _finish(mod, ctx, probs, attention_mask, output_attentions)


def _v1_qkv(mod, hidden_states, query_states):
    """q, k, v ``[B, H, L, D]`` of DeBERTa v1's fused ``in_proj`` (+ q_bias, v_bias)."""
    H = mod.num_attention_heads
    D = mod.all_head_size // H
    if query_states is None:
        q, k, v = _heads(mod.in_proj(hidden_states), H).chunk(3, dim=-1)
    else:
        # in_proj rows are laid out [head][q|k|v][D]
        w = mod.in_proj.weight.view(H, 3, D, -1)
        q = _heads(nn.functional.linear(query_states, w[:, 0].reshape(H * D, -1)), H)
        k = _heads(nn.functional.linear(hidden_states, w[:, 1].reshape(H * D, -1)), H)
        v = _heads(nn.functional.linear(hidden_states, w[:, 2].reshape(H * D, -1)), H)
    q = q + mod.q_bias.view(H, 1, D).to(q.dtype)
    v = v + mod.v_bias.view(H, 1, D).to(v.dtype)
    return q, k, v


def v1_forward(mod, hidden_states, attention_mask, output_attentions=False, query_states=None,
               relative_pos=None, rel_embeddings=None):
    """HF ``DisentangledSelfAttention.forward`` of DeBERTa v1.  Returns ``(context, probs|None)``."""
    if getattr(mod, "head_logits_proj", None) is not None or getattr(mod, "talking_head", False):
        raise NotImplementedError("DeBERTa v1 talking_head attention mixes heads before the softmax; no fused "
                                  "backend serves it. Run the model unpatched (HF eager).")
    H = mod.num_attention_heads
    q, k, v = _v1_qkv(mod, hidden_states, query_states)
    types = mod.pos_att_type
    scale = default_scale(q.shape[-1], len(types))
    pos_key = pos_query = None
    max_rel = span = -1
    # HF v1 adds relative terms only when it is given both rel_embeddings and relative_pos
    if mod.relative_attention and rel_embeddings is not None and relative_pos is not None:
        max_rel = mod.max_relative_positions
        # span follows the padded length (HF's), also when the encoder runs packed
        length = attention_mask.info.seqlen if hasattr(attention_mask, "info") else max(q.shape[-2], k.shape[-2])
        span = min(length, max_rel)
        rel = mod.pos_dropout(rel_embeddings)[max_rel - span: max_rel + span]
        if "c2p" in types:
            pos_key = _heads(mod.pos_proj(rel), H)
        if "p2c" in types:
            pos_query = _heads(mod.pos_q_proj(rel), H)
    if relative_pos is CANONICAL:
        relative_pos = None
    ctx, probs = _attend(mod, q, k, v, pos_key, pos_query, buckets=-1, max_rel=max_rel, span=span,
                         attention_mask=attention_mask, scale=scale, output_attentions=output_attentions,
                         relative_pos=relative_pos)
    return _finish(mod, ctx, probs, attention_mask, output_attentions)
