"""Time the Triton kernels under every candidate launch config on a GPU: the measurement that picks
``launch_config``'s values (the static sweep says which configs spill, not which is faster).

    python -m benchmarks.tune_configs [--out DIR] [--budget SECONDS]    # GPU
    TRITON_INTERPRET=1 python -m benchmarks.tune_configs --rehearse     # CPU: the code path, tiny sizes

DeBERTa-v3 attention (H=12, D=64, v3 buckets, bf16), padded batches of 16,384 tokens with key padding at L = 512,
2048 and 8192, and a packed (varlen) call of 48 sequences of random lengths up to 512:
- ``fwd``: the forward (inference: no dropout; training: dropout 0.1) under each config of :data:`FWD`;
- ``dq`` / ``dkdv``: the backward (dropout 0.1) with one kernel under each config of ``SWEEP["bwd"]`` and the other
  at its shipped config, so a row's difference from the shipped row is that kernel's;
- ``dkdv (no dropout)``: the padded L = 512 backward without dropout, whose sm_90 dK/dV ships 32x64 tiles, against
  the 16x64 ones it had until 2026-12-07 (:data:`NODROP_DKDV`).
Rows run in that order (every case's inference forward first), so a budget cuts the backward rows first; a shipped
row is labelled with the config the launcher chose for it.
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


#: forward candidates (BLOCK_M, BLOCK_N, warps, stages, saturated-tile width): the stage and saturated-width
#: neighbours of the shipped configs.  The first H200 tune (2026-12-04, ``SWEEP["fwd"]``, L = 512 only) found 2
#: stages 1.5x faster than 3 and every 3-stage config slower than its 2-stage twin; the saturated width shows at
#: L >= 2048 only; packed calls ship 64x32 on 3 stages.  (64, 64, 4, 2, 128), the inference config, is there for the
#: training rows (dropout ships 64-key saturated tiles): statically 27.5 against 32.4 instructions per saturated
#: element on sm_90, +1.4 in band, 36 B spilled against 8 (2026-12-05, NOTES "The saturated forward's key mask")
FWD = [(64, 64, 4, 2, 128), (64, 64, 4, 3, 128), (64, 64, 4, 2, 64), (64, 64, 4, 1, 128), (128, 64, 8, 2, 128),
       (128, 64, 4, 2, 128), (64, 32, 4, 2, 64), (64, 32, 4, 2, 128), (64, 64, 8, 2, 128), (32, 64, 4, 2, 128)]


#: dK/dV candidates for the backward without dropout (padded L = 512 only): the 16x64 tiles the sm_90 kernel had
#: before its 32x64 ones (2026-12-07; statically 35.88 -> 33.88 instructions per in-band element, untimed)
NODROP_DKDV = [(16, 64, 4, 1, 0, 255)]


def _cases(rehearse: bool) -> list[tuple[str, int, int, int, int]]:
    """``(name, B, H, L, D)``: padded batches of 16,384 tokens, and ``packed``: B sequences of random lengths up
    to L in one varlen call (what ``deberta_fast.patch`` runs on padded batches)."""
    if rehearse:
        return [("padded", 1, 2, 24, 16), ("packed", 3, 2, 24, 16)]
    return [("padded", 32, 12, 512, 64), ("padded", 8, 12, 2048, 64), ("padded", 2, 12, 8192, 64),
            ("packed", 48, 12, 512, 64)]


class _Case:
    """One case's inputs and its forward / backward under the launcher's current config."""

    def __init__(self, name, B, H, L, D, device, dtype):
        from deberta_fast.backends.triton_backend import kernel_masks
        from deberta_fast.dispatch import build_call, build_varlen_call

        self.name, self.B, self.L, self.D = name, B, L, D
        self.packed = name == "packed"
        g = torch.Generator().manual_seed(0)
        rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        pk, pq = rnd(H, 512, D), rnd(H, 512, D)
        kw = dict(position_buckets=256, max_relative_positions=512, scale=None, dropout_p=0.0)
        if self.packed:
            lens = torch.randint(max(1, L // 8), L + 1, (B,), generator=g)
            lens[0] = L
            cu = torch.zeros(B + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(lens, 0)
            cu = cu.to(device)
            T = int(cu[-1])
            q, k, v, self.do = rnd(T, H, D), rnd(T, H, D), rnd(T, H, D), rnd(T, H, D)
            c = build_varlen_call(q, k, v, pk, pq, cu, cu, L, L, **kw)
            self.args = (c.query, c.key, c.value, c.pos_key, c.pos_query, cu, cu, L, L)
            self.tokens = T
        else:
            lengths = torch.full((B,), L)
            lengths[::3] = max(1, L - L // 7)  # some padding, as a real batch has
            mask = (torch.arange(L)[None, :] < lengths[:, None]).to(device)
            q, k, v, self.do = rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)
            c = build_call(q, k, v, pk, pq, attention_mask=mask, **kw)
            self.args = (c.query, c.key, c.value, c.pos_key, c.pos_query, *kernel_masks(c))
            self.tokens = B * L
        self.kw = dict(position_buckets=256, max_relative_positions=512, span=c.span, scale=c.scale)
        self.saved = {}

    def forward(self, p):
        from deberta_fast._kernels import triton_attention_launch as launch

        fn = launch.attention_forward_varlen if self.packed else launch.attention_forward
        return fn(*self.args, **self.kw, dropout_p=p, seed=1)

    def backward(self, p=0.1):
        """The backward (dropout ``p``) from a forward (the same ``p``) saved under the shipped config."""
        from deberta_fast._kernels import triton_attention_launch as launch

        if p not in self.saved:
            self.saved[p] = self.forward(p)
        out, stats = self.saved[p]
        if self.packed:
            q, k, v, pk, pq, cq, ck, mq, mk = self.args
            return launch.attention_backward_varlen(self.do, q, k, v, pk, pq, out, stats, cq, ck, mq, mk, **self.kw,
                                                    dropout_p=p, seed=1)
        q, k, v, pk, pq, km, fm, uni = self.args
        return launch.attention_backward(self.do, q, k, v, pk, pq, out, stats, km, fm, uni, **self.kw,
                                         dropout_p=p, seed=1)


def _jobs(cases, fwd_cfgs, bwd_cfgs, nodrop_cfgs):
    """``(case, what, config or None for the shipped one)`` in the order they are timed, the most telling first
    (a budget cuts the tail): every case's inference forward, then its training forward, then the backward, then the
    first padded case's dK/dV without dropout."""
    jobs = []
    for what in ("fwd", "fwd+dropout"):
        for case in cases:
            jobs += [(case, what, c) for c in [None] + fwd_cfgs]
    for case in cases:
        for kernel in ("dq", "dkdv"):
            jobs += [(case, kernel, c) for c in [None] + bwd_cfgs]
    case = next(c for c in cases if not c.packed)
    jobs += [(case, "dkdv (no dropout)", c) for c in [None] + nodrop_cfgs]
    return jobs


def tune(rehearse: bool, budget: float, progress=print, save=None) -> dict:
    from benchmarks.envinfo import environment
    from benchmarks.static import SWEEP
    from deberta_fast._kernels import triton_attention_launch as launch

    device = "cpu" if rehearse else "cuda"
    dtype = torch.float32 if rehearse else torch.bfloat16
    shipped = launch.launch_config
    from benchmarks.harness import median_ms_timer

    bench = median_ms_timer(rehearse)
    fwd_cfgs = [launch.LaunchConfig(*c) for c in FWD]
    bwd_cfgs = [launch.LaunchConfig(*c) for c in SWEEP["bwd"]]
    nodrop_cfgs = [launch.LaunchConfig(*c) for c in NODROP_DKDV]
    if rehearse:
        fwd_cfgs, bwd_cfgs = fwd_cfgs[-1:], bwd_cfgs[-1:]
    t_end = time.time() + budget
    env = environment()
    cases = [_Case(*c, device, dtype) for c in _cases(rehearse)]
    rows, reference, used = [], {}, {}

    def recording(pass_, *a, **k):  # the launcher's own choice, recorded for the shipped rows' labels
        used[pass_] = shipped(pass_, *a, **k)
        return used[pass_]

    for case, what, cfg in _jobs(cases, fwd_cfgs, bwd_cfgs, nodrop_cfgs):
        fwd = what.startswith("fwd")
        kernel = what.split()[0]  # dq | dkdv (backward rows)
        p = 0.0 if what == "fwd" or "no dropout" in what else 0.1
        key = (case.name, case.L, what)
        row = dict(case=case.name, L=case.L, B=case.B, tokens=case.tokens, what=what, config=_s(cfg))
        if time.time() > t_end or (cfg is not None and key not in reference):
            rows.append(dict(row, skipped="budget" if time.time() > t_end else "the shipped row failed"))
            continue
        if cfg is None:
            launch.launch_config = recording
        else:
            base = reference[key][1]
            patched = cfg if fwd else launch.BackwardConfig(dq=cfg if kernel == "dq" else base.dq,
                                                            dkdv=cfg if kernel == "dkdv" else base.dkdv)
            launch.launch_config = lambda pass_, *a, _c=patched, _f=fwd, **k: (  # noqa: E731
                _c if (pass_ == "fwd") == _f else shipped(pass_, *a, **k))
        fn = (lambda: case.forward(p)) if fwd else (lambda: case.backward(p))
        try:
            used.clear()
            got = fn()
            got = got[:1] if fwd else got[:3]  # out; dq, dk, dv
            if cfg is None:
                own = used["fwd" if fwd else "bwd"]
                reference[key] = (got, own)
                row["config"] = "shipped " + _s(own if fwd else getattr(own, kernel))
            else:  # the same function under another tiling: a difference beyond rounding is a bug
                row["max_diff_vs_shipped"] = max(float((a.float() - b.float()).abs().max())
                                                 for a, b in zip(got, reference[key][0]))
            row["ms"] = round(bench(fn), 4)
        except Exception as e:  # a config that does not fit (shared memory, registers) is a result
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        finally:
            launch.launch_config = shipped
        progress(f"tune: {case.name} L={case.L} {what:12s} {row['config']:28s} {row.get('ms', row.get('error'))}")
        rows.append(row)
        if save is not None:  # after every row: a run stopped at its stage's cap keeps what it timed
            save({"env": env, "rehearse": rehearse, "dtype": str(dtype), "rows": rows})
    return {"env": env, "rehearse": rehearse, "dtype": str(dtype), "rows": rows}


def _s(cfg) -> str:
    """BM/BN/warps/stages, and /sat for a forward config whose saturated tiles are wider than its band tiles."""
    if cfg is None:
        return "-"
    sat = getattr(cfg, "sat_block_n", 0)
    return "/".join(str(x) for x in (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
                    + ((sat,) if sat and sat != cfg.block_n else ()))


def table(res: dict) -> str:
    lines = [f"# Launch-config timing ({'CPU rehearsal, interpreter: not a measurement' if res['rehearse'] else 'GPU'}"
             f", {res['dtype']})", "",
             "ms: median of triton.testing.do_bench; relative to the shipped config of the same row group.", "",
             "| case | L | B | tokens | kernel | config (BM/BN/warps/stages[/sat]) | ms | vs shipped | "
             "max abs diff vs shipped |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in res["rows"]:
        if r["config"].startswith("shipped") and "ms" in r:
            base[(r.get("case", "padded"), r["L"], r["what"])] = r["ms"]
    for r in res["rows"]:
        ms = r.get("ms")
        ref = base.get((r.get("case", "padded"), r["L"], r["what"]))
        rel = f"{ms / ref:.3f}x" if ms and ref else ""
        cell = f"{ms}" if ms is not None else (r.get("error") or f"skipped ({r.get('skipped')})")
        diff = r.get("max_diff_vs_shipped")
        lines.append(f"| {r.get('case', 'padded')} | {r['L']} | {r['B']} | {r.get('tokens', '')} | {r['what']} | "
                     f"{r['config']} | {cell} | {rel} | {'' if diff is None else f'{diff:.3g}'} |")
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
