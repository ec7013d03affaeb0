"""How Triton lowers the skew of relative attention (compiler output only, no GPU):

    python -m benchmarks.skew_probe [--out benchmarks/results/<date>-static]

The redesign of the Triton kernels (issue 12) computes c2p of a ``BM x BN`` tile as ``P = Q Kr[window]^T``
(``BM x W``, ``W = next_pow2(BM + BN - 1)``) and picks ``c2p[r, c] = P[r, r - c + BN - 1]``: a per-element
selection along the window axis (the "skew").  This compiles that selection alone, in a loop of 8 tiles, for
sm_90 in three ways and reports, per variant: registers, spill bytes, warp shuffles in the PTX, and the main
loop's SASS instructions per score element (the QK-sized MMA and the window load included):

* ``gather``: ``tl.gather(P, idx, axis=1)``;
* ``gather_t``: the transposed product and ``tl.gather(P^T, idx^T, axis=0)``;
* ``scratch``: ``P`` stored to a per-program global buffer (L1/L2), a CTA barrier, and one gathered load per
  element (float32).

Writes ``skew_probe.json`` and ``skew_probe.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import triton
import triton.language as tl


@triton.jit
def _skew_kernel(A, KW, S, OUT, MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, W: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, BM)
    c = tl.arange(0, BN)
    w = tl.arange(0, W)
    d = tl.arange(0, 64)
    a = tl.load(A + r[:, None] * 64 + d[None, :])
    widx = r[:, None] - c[None, :] + (BN - 1)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    scratch = S + pid.to(tl.int64) * (BM * W)
    for it in range(0, 8):
        kw = tl.load(KW + it * 64 + w[:, None] * 64 + d[None, :])
        if MODE == 0:
            acc += tl.gather(tl.dot(a, tl.trans(kw)), widx, 1)
        elif MODE == 1:
            acc += tl.trans(tl.gather(tl.dot(kw, tl.trans(a)), tl.trans(widx), 0))
        else:
            tl.store(scratch + r[:, None] * W + w[None, :], tl.dot(a, tl.trans(kw)))
            tl.debug_barrier()
            acc += tl.load(scratch + r[:, None] * W + widx)
            tl.debug_barrier()
    tl.store(OUT + r[:, None] * BN + c[None, :], acc)


MODES = {0: "gather", 1: "gather_t", 2: "scratch"}


def probe(cc: int = 90) -> list[dict]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from benchmarks.static import main_loops, parse, sass_of
    from deberta_fast._compile_check import _resources

    rows = []
    for mode, name in MODES.items():
        for bm, bn, warps in ((64, 64, 4), (128, 64, 8)):
            w = triton.next_power_of_2(bm + bn - 1)
            sig = {"A": "*fp16", "KW": "*fp16", "S": "*fp32", "OUT": "*fp32", "MODE": "constexpr", "BM": "constexpr",
                   "BN": "constexpr", "W": "constexpr"}
            src = ASTSource(_skew_kernel, sig, {"MODE": mode, "BM": bm, "BN": bn, "W": w},
                            {(i,): [["tt.divisibility", 16]] for i in range(4)})
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})
            res = _resources(k.asm["cubin"], k.asm["ptx"], cc, k.metadata, None)
            loops = main_loops(parse(sass_of(k.asm["cubin"], cc)))
            per = 32 * warps / (bm * bn)
            rows.append({"variant": name, "cc": cc, "block_m": bm, "block_n": bn, "window": w, "num_warps": warps,
                         "regs": res.get("regs"), "spill_stores": res.get("spill_stores"),
                         "ptx_shuffles": k.asm["ptx"].count("shfl.sync"),
                         "per_element": [round(lp["longest"] * per, 2) for lp in loops]})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| variant | target | tile | window | warps | regs | spill stores B | PTX shuffles | main loop instr/element |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['variant']} | sm_{r['cc']} | {r['block_m']}x{r['block_n']} | {r['window']} | {r['num_warps']} "
                   f"| {r['regs']} | {r['spill_stores']} | {r['ptx_shuffles']} | {'; '.join(str(x) for x in r['per_element'])} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.skew_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="default benchmarks/results/<date>-static")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: the probe compiles for the GPU")
    rows = probe()
    date = time.strftime("%Y-%m-%d")
    from benchmarks.static import write_report

    md = (f"# Skew probe ({date}, triton {triton.__version__}; compiler output only, no GPU)\n\n"
          "See benchmarks/skew_probe.py.\n\n" + table(rows))
    write_report(a.out, f"{date}-static", "skew_probe.json", "skew_probe.md",
                 {"date": date, "triton": triton.__version__, "rows": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
