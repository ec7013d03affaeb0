"""Shared inputs and oracles of the Triton backend tests (fresh random tensors every call)."""
from __future__ import annotations

import torch

from deberta_fast import disentangled_attention, disentangled_attention_reference
from deberta_fast.dispatch import build_call
from deberta_fast.positions import attention_span

#: (position_buckets, max_relative_positions): tiny buckets (saturated tiles), unbucketed, DeBERTa-v3
BUCKETED, UNBUCKETED, V3 = (4, 8), (-1, 12), (256, 512)


def make_mask(kind: str, B: int, H: int, Lq: int, Lk: int):
    """``kind``: none | key (padding, some rows padded) | full (random, incl. fully masked rows)
    | full_b1 ``[1,H,Lq,Lk]`` | full_h1 ``[B,1,Lq,Lk]`` | full3d ``[B,Lq,Lk]``."""
    if kind == "none":
        return None
    if kind == "key":
        lengths = torch.randint(1, Lk + 1, (B,))
        lengths[0] = max(1, Lk - Lk // 3)  # at least one batch with padding
        return (torch.arange(Lk)[None, :] < lengths[:, None]).long()
    shape = {"full": (B, H, Lq, Lk), "full_b1": (1, H, Lq, Lk), "full_h1": (B, 1, Lq, Lk), "full3d": (B, Lq, Lk)}[kind]
    m = torch.rand(shape) > 0.4
    m[..., Lq // 2, :] = False  # a fully masked query row (uniform, as in HF)
    return m


def make_inputs(B, H, Lq, Lk, D, terms="both", buckets=BUCKETED, pos_batched=False, mask="none"):
    """float32 inputs ``(q, k, v, pos_key, pos_query, mask, kwargs)``; ``terms``: both | c2p | p2c | none."""
    span = attention_span(*buckets)
    pshape = (B, H, 2 * span, D) if pos_batched else (H, 2 * span, D)
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, D)
    pk = torch.randn(pshape) if terms in ("both", "c2p") else None
    pq = torch.randn(pshape) if terms in ("both", "p2c") else None
    kw = dict(position_buckets=buckets[0], max_relative_positions=buckets[1])
    return q, k, v, pk, pq, make_mask(mask, B, H, Lq, Lk), kw


def cast(ts, dtype, grad=False):
    out = []
    for t in ts:
        if t is not None:
            t = t.detach().to(dtype)
            if grad:
                t.requires_grad_(True)
        out.append(t)
    return out


def triton_forward_lse(q, k, v, pk, pq, mask, kw, dropout_p=0.0, seed=0):
    """``(out, lse)`` of the Triton forward op, masks normalised as the dispatcher does."""
    from deberta_fast._kernels.triton_attention_launch import lse_from_stats
    from deberta_fast.backends.triton_backend import _seed
    c = build_call(q, k, v, pk, pq, attention_mask=mask, scale=None, dropout_p=dropout_p, **kw)
    out, stats = torch.ops.deberta_fast.triton_fwd(q, k, v, pk, pq, c.key_mask, c.full_mask, c.uniform_rows,
                                                   c.position_buckets, c.max_relative_positions, max(c.span, 1),
                                                   c.scale, dropout_p, _seed(seed, dropout_p, q.device))
    return out, lse_from_stats(stats)


def reference_forward_lse(q, k, v, pk, pq, mask, kw, dtype):
    q, k, v, pk, pq = cast((q, k, v, pk, pq), dtype)
    return disentangled_attention_reference(q, k, v, pk, pq, attention_mask=mask, return_lse=True, **kw)


def grads(fn, tensors, dtype, do):
    """Output and gradients of ``fn(*tensors)`` w.r.t. every non-None tensor, in ``dtype``."""
    ts = cast(tensors, dtype, grad=True)
    out = fn(*ts)
    live = [t for t in ts if t is not None]
    return [out] + list(torch.autograd.grad(out, live, do.to(dtype)))


def triton_fn(mask, kw, **extra):
    return lambda q, k, v, pk, pq: disentangled_attention(q, k, v, pk, pq, attention_mask=mask, backend="triton",
                                                          **kw, **extra)


def reference_fn(mask, kw):
    return lambda q, k, v, pk, pq: disentangled_attention_reference(q, k, v, pk, pq, attention_mask=mask, **kw)


def max_err(a, b):
    d = (a.double() - b.double()).abs()
    assert not torch.isnan(d).any(), "NaN in result"
    return d.max().item()


def assert_close_fp32(got, ref, tol=1e-5, what=""):
    """Tight check of a float32 result against the float64 oracle (relative to its magnitude)."""
    err = max_err(got, ref)
    bound = tol * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: max abs err {err:.3g} > {bound:.3g}"


def assert_close_lowp(got, ref64, ref_lowp, k=4.0, what=""):
    """Low-precision check: our error may be at most ``k`` times the error of the reference
    computed in the same low precision (both against the float64 oracle)."""
    err = max_err(got, ref64)
    base = max_err(ref_lowp, ref64)
    assert base > 0, f"{what}: the low-precision reference is exact; the check would be meaningless"
    assert err <= k * base, f"{what}: max abs err {err:.3g} > {k} x {base:.3g} (low-precision reference error)"
