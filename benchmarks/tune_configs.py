"""Time the Triton kernels under every candidate launch config on a GPU: the measurement that picks
``launch_config``'s values (the static sweep says which configs spill, not which is faster).

    python -m benchmarks.tune_configs [--out DIR] [--budget SECONDS]    # GPU
    TRITON_INTERPRET=1 python -m benchmarks.tune_configs --rehearse     # CPU: the code path, tiny sizes

DeBERTa-v3 attention (H=12, D=64, v3 buckets, bf16, key padding), 16,384 tokens at L = 512 and 2048:
- ``fwd``: the forward (inference: no dropout; training: dropout 0.1) under each config of
  ``benchmarks.static.SWEEP["fwd"]``;
- ``dq`` / ``dkdv``: the backward (dropout 0.1) with one kernel under each config of ``SWEEP["bwd"]`` and the other
  at its shipped config, so a row's difference from the shipped row is that kernel's.
Writes ``tune.json`` and ``tune.md`` (milliseconds, median of ``triton.testing.do_bench``; the largest difference
of the output (fwd) or of dq, dk, dv (backward) from the shipped config's, which should be rounding only; a config
that fails to compile or launch is a row with its error).  Nothing is changed: the fastest spill-free config per row is the
candidate for ``_gpu_config`` in ``kernels/triton_attention_launch.py``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _shapes(rehearse: bool) -> list[tuple[int, int, int, int]]:
    """``(B, H, L, D)``."""
    return [(1, 2, 24, 16)] if rehearse else [(32, 12, 512, 64), (8, 12, 2048, 64)]


def _inputs(B, H, L, D, device, dtype):
    from deberta_fast.dispatch import build_call

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    lengths = torch.full((B,), L)
    lengths[::3] = max(1, L - L // 7)  # some padding, as a real batch has
    mask = (torch.arange(L)[None, :] < lengths[:, None]).to(device)
    q, k, v, do = rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)
    pk, pq = rnd(H, 512, D), rnd(H, 512, D)
    call = build_call(q, k, v, pk, pq, position_buckets=256, max_relative_positions=512, attention_mask=mask,
                      scale=None, dropout_p=0.0)
    return call, do


def _timer(rehearse: bool):
    if rehearse:
        def bench(fn):
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return bench
    from triton.testing import do_bench
    return lambda fn: float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def tune(rehearse: bool, budget: float, progress=print, save=None) -> dict:
    from benchmarks.envinfo import environment
    from benchmarks.static import SWEEP
    from deberta_fast._kernels import triton_attention_launch as launch

    device = "cpu" if rehearse else "cuda"
    dtype = torch.float32 if rehearse else torch.bfloat16
    shipped = launch.launch_config
    bench = _timer(rehearse)
    fwd_cfgs = [launch.LaunchConfig(*c) for c in SWEEP["fwd"]]
    bwd_cfgs = [launch.LaunchConfig(*c) for c in SWEEP["bwd"]]
    if rehearse:
        fwd_cfgs, bwd_cfgs = fwd_cfgs[-1:], bwd_cfgs[-1:]
    t_end = time.time() + budget
    env = environment()
    rows, reference = [], {}
    for B, H, L, D in _shapes(rehearse):
        call, do = _inputs(B, H, L, D, device, dtype)
        args = (call.query, call.key, call.value, call.pos_key, call.pos_query, call.key_mask, call.full_mask,
                call.uniform_rows)
        kw = dict(position_buckets=256, max_relative_positions=512, span=call.span, scale=call.scale)
        base_f = shipped("fwd", L, L, D)
        base_b = shipped("bwd", L, L, D)
        out, stats = launch.attention_forward(*args, **kw, dropout_p=0.1, seed=1)
        jobs = []
        for c in [None] + fwd_cfgs:
            for p in (0.0, 0.1):
                jobs.append(("fwd" if p == 0.0 else "fwd+dropout", c, p))
        for kernel in ("dq", "dkdv"):
            jobs += [(kernel, c, 0.1) for c in [None] + bwd_cfgs]
        for what, cfg, p in jobs:
            if time.time() > t_end:
                rows.append(dict(L=L, B=B, what=what, config=_s(cfg), skipped="budget"))
                continue
            f_cfg = cfg if (what.startswith("fwd") and cfg is not None) else base_f
            if what == "dq" and cfg is not None:
                b_cfg = launch.BackwardConfig(dq=cfg, dkdv=base_b.dkdv)
            elif what == "dkdv" and cfg is not None:
                b_cfg = launch.BackwardConfig(dq=base_b.dq, dkdv=cfg)
            else:
                b_cfg = base_b
            launch.launch_config = lambda pass_, *a, _f=f_cfg, _b=b_cfg, **k: _f if pass_ == "fwd" else _b
            if what.startswith("fwd"):
                fn = lambda: launch.attention_forward(*args, **kw, dropout_p=p, seed=1)  # noqa: E731
            else:
                fn = lambda: launch.attention_backward(do, call.query, call.key, call.value, call.pos_key,  # noqa: E731
                                                       call.pos_query, out, stats, call.key_mask, call.full_mask,
                                                       call.uniform_rows, **kw, dropout_p=0.1, seed=1)
            row = dict(L=L, B=B, what=what, config=_s(cfg) if cfg is not None else "shipped " + _s(
                f_cfg if what.startswith("fwd") else getattr(b_cfg, what)))
            try:
                got = fn()
                got = got[:1] if what.startswith("fwd") else got[:3]  # out; dq, dk, dv
                if cfg is None:
                    reference[(L, what)] = got
                else:  # the same function under another tiling: a difference beyond rounding is a bug
                    row["max_diff_vs_shipped"] = max(float((a.float() - b.float()).abs().max())
                                                     for a, b in zip(got, reference[(L, what)]))
                row["ms"] = round(bench(fn), 4)
            except Exception as e:  # a config that does not fit (shared memory, registers) is a result
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            finally:
                launch.launch_config = shipped
            progress(f"tune: L={L} {what:12s} {row['config']:24s} {row.get('ms', row.get('error'))}")
            rows.append(row)
            if save is not None:  # after every row: a run stopped at its stage's cap keeps what it timed
                save({"env": env, "rehearse": rehearse, "dtype": str(dtype), "rows": rows})
    return {"env": env, "rehearse": rehearse, "dtype": str(dtype), "rows": rows}


def _s(cfg) -> str:
    return "/".join(str(x) for x in (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)) if cfg else "-"


def table(res: dict) -> str:
    lines = [f"# Launch-config timing ({'CPU rehearsal, interpreter: not a measurement' if res['rehearse'] else 'GPU'}"
             f", {res['dtype']})", "",
             "ms: median of triton.testing.do_bench; relative to the shipped config of the same row group.", "",
             "| L | B | kernel | config (BM/BN/warps/stages) | ms | vs shipped | max abs diff vs shipped |",
             "|---|---|---|---|---|---|---|"]
    base = {}
    for r in res["rows"]:
        if r["config"].startswith("shipped") and "ms" in r:
            base[(r["L"], r["what"])] = r["ms"]
    for r in res["rows"]:
        ms = r.get("ms")
        ref = base.get((r["L"], r["what"]))
        rel = f"{ms / ref:.3f}x" if ms and ref else ""
        cell = f"{ms}" if ms is not None else (r.get("error") or f"skipped ({r.get('skipped')})")
        diff = r.get("max_diff_vs_shipped")
        lines.append(f"| {r['L']} | {r['B']} | {r['what']} | {r['config']} | {cell} | {rel} | "
                     f"{'' if diff is None else f'{diff:.3g}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tune_configs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rehearse", action="store_true", help="CPU, under TRITON_INTERPRET=1: tiny sizes, 2 configs")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later rows are marked skipped")
    ap.add_argument("--out", default=None, help="default benchmarks/results/<date>-tune")
    a = ap.parse_args(argv)
    if a.rehearse and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--rehearse runs the kernels under the interpreter: set TRITON_INTERPRET=1")
    if not a.rehearse and not torch.cuda.is_available():
        ap.error("no GPU: use --rehearse (with TRITON_INTERPRET=1) on a CPU")
    from benchmarks.static import write_report

    def save(res):
        write_report(a.out, time.strftime("%Y-%m-%d") + "-tune", "tune.json", "tune.md", res, table(res), quiet=True)

    res = tune(a.rehearse, a.budget, progress=lambda m: print(m, file=sys.stderr, flush=True), save=save)
    save(res)
    print(table(res))
    return 0 if all("error" not in r for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
