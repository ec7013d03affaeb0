"""Every kernel variant of one backend at small shapes, forward and backward: the workload that
``compute-sanitizer`` (memcheck, racecheck, synccheck) watches in ``python -m benchmarks.gpu_session``.

    compute-sanitizer --tool memcheck python -m benchmarks.sanitize_cases --backend cuda
    TRITON_INTERPRET=1 python -m benchmarks.sanitize_cases --backend triton --rehearse   # CPU rehearsal

Variants: relative terms (both, c2p, p2c, none) x masks (none, ``[B, L]`` key padding, 4-D full mask where
the backend serves it) x dropout (0, 0.1), Lq != Lk, odd lengths, bucket configs (DeBERTa-v3 256/512, tiny
4/8 with saturated tiles, unbucketed), and packed varlen calls (the triton backend's band tiles gather their
tables unpredicated, rows and keys clamped to the lengths: the odd lengths and packed calls are where a wrong clamp
reads out of bounds); for the triton backend also its forward's two experiments (the launcher's ``REL_SOURCE``):
``"skew"`` (barriers around a per-program scratch) and ``"distance"`` (unpredicated table reads, also with ``Lq``
well above ``Lk``).  Each call is checked for finite results
(the sanitizer reports the memory errors); a refusal of a variant is printed with its reason, never hidden.
Exit status 1 when a call raises or returns NaN/inf.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

from deberta_fast import BackendUnavailableError, disentangled_attention, disentangled_attention_varlen
from deberta_fast.positions import attention_span

BUCKETS = [(256, 512), (4, 8), (-1, 24)]
TERMS = ["both", "c2p", "p2c", "none"]


def _inputs(B, H, Lq, Lk, D, terms, buckets, dtype, device, g):
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype).requires_grad_(True)  # noqa: E731
    span = attention_span(*buckets)
    q, k, v = mk(B, H, Lq, D), mk(B, H, Lk, D), mk(B, H, Lk, D)
    pk = mk(H, 2 * span, D) if terms in ("both", "c2p") else None
    pq = mk(H, 2 * span, D) if terms in ("both", "p2c") else None
    return q, k, v, pk, pq


def _mask(kind, B, H, Lq, Lk, device, g):
    if kind == "none":
        return None
    if kind == "key":
        m = torch.ones(B, Lk, dtype=torch.long)
        m[0, Lk - Lk // 3:] = 0
        return m.to(device)
    m = torch.rand(B, H, Lq, Lk, generator=g) > 0.4
    m[..., Lq // 2, :] = False
    return m.to(device)


def _run(fn, tensors) -> str:
    try:
        out = fn()
        out.float().square().sum().backward()
    except BackendUnavailableError as e:
        return f"refused: {str(e).splitlines()[0][:160]}"
    except Exception as e:  # noqa: BLE001 - a failing variant is reported; the others still run
        return f"FAIL: raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    grads = [t.grad for t in tensors if t is not None]
    bad = [i for i, x in enumerate([out] + grads) if not torch.isfinite(x).all()]
    return "ok" if not bad else f"FAIL: non-finite values in results {bad}"


def _rel_source(run, source: str):
    """``run`` under the Triton launcher's ``REL_SOURCE = source``."""
    from deberta_fast._kernels import triton_attention_launch as launch

    def wrapped():
        old, launch.REL_SOURCE = launch.REL_SOURCE, source
        try:
            return run()
        finally:
            launch.REL_SOURCE = old
    return wrapped


def _tma(run):
    """``run`` with the Triton forward reading through tensor descriptors (DEBERTA_FAST_TRITON_TMA=1; sm_90)."""
    from deberta_fast._kernels import triton_attention_launch as launch

    def wrapped():
        with launch.use_tma():
            return run()
    return wrapped


def _wgmma(run):
    """``run`` on the cuda kernels' wgmma variants (DEBERTA_FAST_CUDA_WGMMA=1; sm_90a)."""
    from deberta_fast import _cuda_ext

    def wrapped():
        with _cuda_ext.use_wgmma():
            return run()
    return wrapped


def _variants(shapes, masks, drops, rehearse, padded, packed, lens, skew=False, wgmma=False):
    """``(name, run)`` of every variant, the widest coverage first (a sanitizer run cut by its time cap has seen
    as many kernel specializations as it could): DeBERTa-v3 buckets at the first shape over every term x mask x
    dropout (band tiles), the tiny buckets there with both terms (saturated tiles), the packed calls, with ``skew``
    the Triton forward's experiments (``REL_SOURCE`` "skew" and "distance": v3 and tiny buckets, key mask, each
    dropout rate; "distance", whose tables the backward reads too, also at ``Lq = 4 Lk`` and ``Lk = 4 Lq`` with the
    tiny buckets, and packed, keys of the queries' lengths and of others), with ``wgmma`` the cuda kernels' wgmma
    variants (v3 and tiny buckets, key mask, each dropout rate, padded and packed), the rest; last (a device fault
    of theirs cannot take the others with it), with ``skew`` the Triton forward's TMA loads
    (``DEBERTA_FAST_TRITON_TMA=1``: v3 and tiny buckets, key mask, each dropout rate, ``Lq != Lk``, packed, keys of
    the queries' lengths and of others)."""
    ranked = []
    for buckets, (B, Lq, Lk), terms, mask, p in itertools.product(BUCKETS, shapes, TERMS, masks, drops):
        if rehearse and (buckets != BUCKETS[0] and (mask != "key" or terms != "both")):
            continue  # the interpreter is slow: other bucket configs with one mask / term pair only
        if mask == "key" and Lq != Lk:
            continue  # HF's [B, L] mask is for self-attention (Lq == Lk)
        name = f"padded B={B} Lq={Lq} Lk={Lk} terms={terms} buckets={buckets} mask={mask} p={p}"
        first_shape = (B, Lq, Lk) == shapes[0]
        rank = 0 if first_shape and buckets == BUCKETS[0] else (1 if first_shape and buckets == BUCKETS[1]
                                                                  and terms == "both" else 3)
        ranked.append((rank, name, lambda a=(B, Lq, Lk, terms, buckets, mask, p): padded(*a)))
    ranked += [(2, f"varlen lens={lens} terms={terms} p={p}", lambda a=(terms, p): packed(*a))
               for terms, p in itertools.product(TERMS, drops)]
    if skew:
        B, Lq, Lk = shapes[0]
        ranked += [(2, f"{src} padded B={B} Lq={Lq} Lk={Lk} terms=both buckets={buckets} mask=key p={p}",
                    _rel_source(lambda a=(B, Lq, Lk, "both", buckets, "key", p): padded(*a), src))
                   for src, buckets, p in itertools.product(("skew", "distance"), BUCKETS[:2], drops)]
        ranked += [(2, f"distance padded B=1 Lq={4 * Lk} Lk={Lk} terms=both buckets={BUCKETS[1]} mask=none p={p}",
                    _rel_source(lambda a=(1, 4 * Lk, Lk, "both", BUCKETS[1], "none", p): padded(*a), "distance"))
                   for p in drops]
        ranked += [(2, f"distance padded B=1 Lq={Lk} Lk={4 * Lk} terms=both buckets={BUCKETS[1]} mask=none p={p}",
                    _rel_source(lambda a=(1, Lk, 4 * Lk, "both", BUCKETS[1], "none", p): padded(*a), "distance"))
                   for p in drops]
        lens_k = [5, 70, 2, 33]
        ranked += [(2, f"distance varlen lens={lens} terms=both p={p}",
                    _rel_source(lambda a=("both", p): packed(*a), "distance")) for p in drops]
        ranked += [(2, f"distance varlen lens={lens} lens_k={lens_k} terms=both p={p}",
                    _rel_source(lambda a=("both", p, lens_k): packed(*a), "distance")) for p in drops]
        ranked += [(4, f"tma padded B={B} Lq={Lq} Lk={Lk} terms=both buckets={buckets} mask=key p={p}",
                    _tma(lambda a=(B, Lq, Lk, "both", buckets, "key", p): padded(*a)))
                   for buckets, p in itertools.product(BUCKETS[:2], drops)]
        ranked += [(4, f"tma padded B=1 Lq={Lk} Lk={4 * Lk} terms=both buckets={BUCKETS[1]} mask=none p={p}",
                    _tma(lambda a=(1, Lk, 4 * Lk, "both", BUCKETS[1], "none", p): padded(*a))) for p in drops]
        ranked += [(4, f"tma varlen lens={lens} lens_k={lk} terms=both p={p}",
                    _tma(lambda a=("both", p, lk): packed(*a))) for p in drops for lk in (None, lens_k)]
    if wgmma:
        B, Lq, Lk = shapes[0]
        ranked += [(2, f"wgmma padded B={B} Lq={Lq} Lk={Lk} terms=both buckets={buckets} mask=key p={p}",
                    _wgmma(lambda a=(B, Lq, Lk, "both", buckets, "key", p): padded(*a)))
                   for buckets, p in itertools.product(BUCKETS[:2], drops)]
        ranked += [(2, f"wgmma varlen lens={lens} terms=both p={p}", _wgmma(lambda a=("both", p): packed(*a)))
                   for p in drops]
    return [(name, run) for _, name, run in sorted(ranked, key=lambda r: r[0])]  # (stable: product order within)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sanitize_cases", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", required=True, choices=["triton", "cuda"])
    ap.add_argument("--rehearse", action="store_true", help="CPU tensors (Triton interpreter), fewer variants")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.rehearse else "cuda")
    dtype = torch.float32 if args.rehearse else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    H, D = 2, 64
    shapes = [(2, 37, 37), (1, 33, 70)]  # odd lengths, Lq != Lk
    masks = ["none", "key", "full"]
    drops = [0.0, 0.1]
    if args.rehearse:
        shapes = shapes[:1]
    n_fail = n_ok = n_ref = 0
    lens = [37, 5, 64, 1]  # packed: odd lengths, a 1-token sequence
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)

    def padded(B, Lq, Lk, terms, buckets, mask, p):
        ts = _inputs(B, H, Lq, Lk, D, terms, buckets, dtype, device, g)
        am = _mask(mask, B, H, Lq, Lk, device, g)
        kw = dict(position_buckets=buckets[0], max_relative_positions=buckets[1], attention_mask=am,
                  dropout_p=p, backend=args.backend)
        return _run(lambda: disentangled_attention(*ts, **kw), ts)

    def packed(terms, p, lens_k=None):
        """``lens_k``: keys of other lengths than the queries (default: ``lens``)."""
        lk = lens_k or lens
        cu_k = cu if lens_k is None else torch.tensor([0] + list(itertools.accumulate(lk)), dtype=torch.int32,
                                                      device=device)
        Tq, Tk = int(cu[-1]), int(cu_k[-1])
        mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype).requires_grad_(True)  # noqa: E731
        span = attention_span(256, 512)
        ts = (mk(Tq, H, D), mk(Tk, H, D), mk(Tk, H, D), mk(H, 2 * span, D) if terms in ("both", "c2p") else None,
              mk(H, 2 * span, D) if terms in ("both", "p2c") else None)
        return _run(lambda: disentangled_attention_varlen(*ts, cu, cu_k, max(lens), max(lk), position_buckets=256,
                                                          max_relative_positions=512, dropout_p=p,
                                                          backend=args.backend), ts)

    wgmma = args.backend == "cuda" and not args.rehearse and torch.cuda.get_device_capability()[0] == 9
    for name, run in _variants(shapes, masks, drops, args.rehearse, padded, packed, lens, args.backend == "triton",
                               wgmma):
        res = run()
        n_ok += res == "ok"
        n_ref += res.startswith("refused")
        n_fail += res.startswith("FAIL")
        print(f"{name}: {res}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize_cases[{args.backend}]: {n_ok} ran, {n_ref} refused (reasons above), {n_fail} failed")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
