"""Where the Triton backward goes wrong on a GPU: its intermediate buffers against fp64 expectations.

    python -m benchmarks.gpu_diagnose --out DIR                 # GPU
    TRITON_INTERPRET=1 python -m benchmarks.gpu_diagnose --out DIR --rehearse   # CPU (every check passes there)

Why: the first GPU run (H200, 2026-12-04, benchmarks/results/2026-12-04-nvidia-h200-session) failed the float32
backward tests with tiny buckets (4, 8) at D = 16 (dq off by up to 1.1, dk by 0.46; output, and v3 / unbucketed
configs, exact), while the same kernels with the same launch configs pass under the CPU interpreter.  ``dq`` and
``dk`` are each a content part (``dS K``, ``dS^T Q``) plus a relative part from the kernels' per-run sums of ``dS``
(``CSUM`` / ``PSUM``; the kernels add it themselves since 2026-12-07, ``_run_products``: this recomputes it from
the sums :func:`kernels.triton_attention_launch._position_grads` receives, so a wrong sum and a wrong share differ).
This compares each piece with its fp64 value from the reference's probabilities:

    dS = P * (dO V^T - rowsum(dO * O)) * scale (0 on HF's uniform rows)  CSUM[i, r] = sum_j dS[i, j] [run(i - j) = r]
    content dq = dS K,  content dk = dS^T Q           PSUM[j, r] = sum_i dS[i, j] [run(i - j) = r]

with ``run(d) = clamp(d - lo, 0, hi - lo)`` (:func:`deberta_fast.positions.distance_runs`), for a few bucket
configs and head dims, under the shipped backward configs and two others (``16x16/4w/1s``, ``32x32/4w/1s``: the
interpreter's tile), and the final gradients against fp64 autograd; on a GPU also the cuda backend's output and
gradients in bf16 (``CUDA_TOL``; head dims it lacks are refused and recorded).  Writes ``diagnose.json`` /
``diagnose.md``; exit status 1 when any piece is off (tolerance 2e-5 relative to the piece's largest magnitude,
float32).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

#: (name, B, H, Lq, Lk, D, (position_buckets, max_relative_positions), terms)
CASES = [
    ("tiny-17", 1, 2, 17, 17, 16, (4, 8), "both"),
    ("tiny-45x70", 2, 2, 45, 70, 16, (4, 8), "both"),
    ("tiny-p2c", 2, 2, 45, 70, 16, (4, 8), "p2c"),
    ("tiny-D64", 1, 2, 45, 45, 64, (4, 8), "both"),
    ("unbucketed-32", 1, 2, 100, 100, 16, (-1, 32), "both"),
    ("shared-16-4", 1, 2, 37, 37, 16, (16, 4), "both"),
    ("control-v3", 2, 2, 50, 50, 16, (256, 512), "both"),
]
TOL = 2e-5
CUDA_TOL = 3e-2  # bf16: 4 ulps of its 7.8e-3, relative to the piece's largest magnitude (the parity suite's floor)


def _inputs(case, device, seed=0):
    _, B, H, Lq, Lk, D, buckets, terms = case
    from deberta_fast.positions import attention_span
    g = torch.Generator().manual_seed(seed)
    span = attention_span(*buckets)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v, do = rnd(B, H, Lq, D), rnd(B, H, Lk, D), rnd(B, H, Lk, D), rnd(B, H, Lq, D)
    pk = rnd(H, 2 * span, D) if terms in ("both", "c2p") else None
    pq = rnd(H, 2 * span, D) if terms in ("both", "p2c") else None
    lengths = torch.randint(1, Lk + 1, (B,), generator=g)
    lengths[0] = max(1, Lk - Lk // 3)
    mask = (torch.arange(Lk)[None, :] < lengths[:, None]).long()
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return [mv(t) for t in (q, k, v, pk, pq, do, mask)], dict(position_buckets=buckets[0],
                                                              max_relative_positions=buckets[1])


def expected(ts, kw):
    """fp64 pieces: output, dS-derived run sums and content grads, and autograd's final grads."""
    from deberta_fast import disentangled_attention_reference
    from deberta_fast.positions import attention_span, distance_runs
    q, k, v, pk, pq, do, mask = ts
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (q, k, v, pk, pq)]
    out, probs = disentangled_attention_reference(*leaves, attention_mask=mask, return_probs=True, **kw)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], do)
    from deberta_fast.reference import default_scale, normalize_mask
    scale = default_scale(D, (pk is not None) + (pq is not None))
    p = probs.detach()
    ds = p * (do @ v.transpose(-1, -2) - (do * out.detach()).sum(-1, keepdim=True)) * scale
    _, _, _, uniform = normalize_mask(mask, B, H, Lq, Lk)  # HF's uniform rows: constant scores, no dS
    if uniform is not None:
        ds = ds.masked_fill(uniform[..., None], 0.0)
    span = attention_span(kw["position_buckets"], kw["max_relative_positions"])
    runs = distance_runs(Lq, Lk, kw["position_buckets"], kw["max_relative_positions"], span, q.device)  # the kernels'
    d = torch.arange(Lq)[:, None] - torch.arange(Lk)[None, :]
    rid = (d - runs.lo).clamp(0, runs.hi - runs.lo).to(q.device)
    onehot = torch.nn.functional.one_hot(rid, runs.hi - runs.lo + 1).to(ds.dtype)  # [Lq, Lk, NRUN]
    csum = torch.einsum("bhij,ijr->bhir", ds, onehot)
    psum = torch.einsum("bhij,ijr->bhjr", ds, onehot)
    names = [n for n, t in zip(("dq", "dk", "dv", "dpos_key", "dpos_query"), (q, k, v, pk, pq)) if t is not None]
    return dict(out=out.detach(), csum=csum, psum=psum, dq_content=ds @ k, dk_content=ds.transpose(-1, -2) @ q,
                **dict(zip(names, grads)))


def triton_pieces(ts, kw, bwd_cfg=None):
    """The triton backend's output, final grads, run sums and content grads (float32 inputs)."""
    from deberta_fast import disentangled_attention
    from deberta_fast._kernels import triton_attention_launch as launch
    q, k, v, pk, pq, do, mask = ts
    got, rel = {}, {}
    real_grads, real_config = launch._position_grads, launch._config

    def position_grads(s, pos, x, pr, rev=False):  # the run sums: dq's (rev: runs in decreasing order), dK/dV's
        name = "c" if rev else "p"
        sums = s[..., :x.shape[-2], :]  # (padded buffers: rows past the length are not written)
        got[f"{name}sum"] = sums.flip(-1) if rev else sums.clone()
        # the relative share the kernels added to dq / dk (_run_products), recomputed here from their sums
        sub = pos[..., pr.rows, :].float().index_select(-2, pr.run_rows_rev if rev else pr.run_rows)
        rel[f"d{'q' if rev else 'k'}_rel"] = sums @ sub
        return real_grads(s, pos, x, pr, rev)

    def config(pass_, *a):
        return bwd_cfg if (pass_ == "bwd" and bwd_cfg is not None) else real_config(pass_, *a)

    launch._position_grads, launch._config = position_grads, config
    try:
        leaves = [t.float().clone().requires_grad_() if t is not None else None for t in (q, k, v, pk, pq)]
        out = disentangled_attention(*leaves, attention_mask=mask, backend="triton", **kw)
        grads = torch.autograd.grad(out, [t for t in leaves if t is not None], do.float())
    finally:
        launch._position_grads, launch._config = real_grads, real_config
    names = [n for n, t in zip(("dq", "dk", "dv", "dpos_key", "dpos_query"), (q, k, v, pk, pq)) if t is not None]
    got.update(out=out.detach(), **dict(zip(names, grads)))
    got["dq_content"] = got["dq"] - rel["dq_rel"] if pk is not None else got["dq"]
    got["dk_content"] = got["dk"] - rel["dk_rel"] if pq is not None else got["dk"]
    return got


def cuda_pieces(ts, kw):
    """The cuda backend's output and final grads in bf16 (it has no float32 kernels and no run sums to compare)."""
    from deberta_fast import disentangled_attention
    q, k, v, pk, pq, do, mask = ts
    leaves = [t.to(torch.bfloat16).requires_grad_() if t is not None else None for t in (q, k, v, pk, pq)]
    out = disentangled_attention(*leaves, attention_mask=mask, backend="cuda", **kw)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], do.to(torch.bfloat16))
    names = [n for n, t in zip(("dq", "dk", "dv", "dpos_key", "dpos_query"), (q, k, v, pk, pq)) if t is not None]
    return dict(out=out.detach(), **dict(zip(names, grads)))


def compare(got: dict, ref: dict, tol: float = TOL) -> dict:
    """Per piece: max abs error, bound (``tol * max(1, largest magnitude of the piece)``), and the worst locations
    when off."""
    res = {}
    for name, r in ref.items():
        if name not in got:
            continue
        g = got[name].double()
        err = (g - r).abs()
        bound = tol * max(1.0, r.abs().max().item())
        worst = []
        if not torch.isfinite(g).all() or err.max().item() > bound:
            flat = torch.nan_to_num(err, nan=float("inf")).flatten()
            for ix in flat.topk(min(8, flat.numel())).indices.tolist():
                loc = list(torch.unravel_index(torch.tensor(ix), err.shape))
                loc = [int(x) for x in loc]
                worst.append({"at": loc, "got": g[tuple(loc)].item(), "want": r[tuple(loc)].item()})
        res[name] = {"err": err.max().item(), "bound": bound, "ok": not worst, "worst": worst}
    return res


def _say(row):
    bad = [n for n, p in row.get("pieces", {}).items() if not p["ok"]]
    print(f"{row['case']:>14} {row['config']:>12}: " + ("ok" if row["ok"] and not row.get("error") else
                                                         f"{'OFF ' + str(bad) if bad else row.get('error')}"),
          flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_diagnose", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rehearse", action="store_true", help="CPU tensors under the Triton interpreter")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = ap.parse_args(argv)
    from benchmarks.harness import gpu_or_interpreter
    gpu = gpu_or_interpreter(args.rehearse, "gpu_diagnose")
    if gpu is None:
        return 2
    from deberta_fast._kernels.triton_attention_launch import BackwardConfig, LaunchConfig
    device = torch.device("cuda" if gpu else "cpu")
    configs = {"shipped": None,
               "16x16/4w/1s": BackwardConfig(LaunchConfig(16, 16, 4, 1), LaunchConfig(16, 16, 4, 1)),
               "32x32/4w/1s": BackwardConfig(LaunchConfig(32, 32, 4, 1), LaunchConfig(32, 32, 4, 1))}
    want = set(filter(None, args.cases.split(",")))
    cases = [c for c in CASES if not want or c[0] in want]
    os.makedirs(args.out, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for case in cases:
        ts, kw = _inputs(case, device)
        ref = expected(ts, kw)
        for cname, cfg in configs.items():
            try:
                res = compare(triton_pieces(ts, kw, cfg), ref)
                row = {"case": case[0], "config": cname, "pieces": res,
                       "ok": all(p["ok"] for p in res.values())}
            except Exception as e:  # noqa: BLE001 - recorded; the other cases still run
                row = {"case": case[0], "config": cname, "ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
            rows.append(row)
            _say(row)
        if gpu:  # the CUDA kernels on the same inputs, in bf16 (head dims 32/64/128: others are refused)
            from deberta_fast import BackendUnavailableError
            try:
                res = compare(cuda_pieces(ts, kw), ref, CUDA_TOL)
                row = {"case": case[0], "config": "cuda bf16", "pieces": res,
                       "ok": all(p["ok"] for p in res.values())}
            except BackendUnavailableError as e:
                row = {"case": case[0], "config": "cuda bf16", "ok": True, "error": f"refused: {e}"[:200]}
            except Exception as e:  # noqa: BLE001
                row = {"case": case[0], "config": "cuda bf16", "ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
            rows.append(row)
            _say(row)
    pieces = ["out", "csum", "psum", "dq_content", "dk_content", "dq", "dk", "dv", "dpos_key", "dpos_query"]
    md = ["| case | config | " + " | ".join(pieces) + " |", "|---|---|" + "---|" * len(pieces)]
    for r in rows:
        p = r.get("pieces", {})
        cells = [("" if n not in p else f"{p[n]['err']:.1e}" + ("" if p[n]["ok"] else " **OFF**")) for n in pieces]
        md.append(f"| {r['case']} | {r['config']} | " + " | ".join(cells) + f" | {r.get('error', '')}")
    info = {"device": torch.cuda.get_device_name() if gpu else "cpu (Triton interpreter)",
            "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "cases": CASES, "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1)}
    with open(os.path.join(args.out, "diagnose.json"), "w") as f:
        json.dump(info, f, indent=1, default=str)
    with open(os.path.join(args.out, "diagnose.md"), "w") as f:
        f.write(f"# gpu_diagnose on {info['device']}, {info['date']}\n\n" + "\n".join(md) + "\n")
    off = [r for r in rows if not r["ok"]]
    print(f"gpu_diagnose: {len(rows) - len(off)} of {len(rows)} (case, config) pairs exact ({info['seconds']} s)")
    return 1 if off else 0


if __name__ == "__main__":
    sys.exit(main())
