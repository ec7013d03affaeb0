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
  element (float32);
* ``gluon_smem`` / ``gluon_smem_16``: the same in Gluon (``triton.experimental.gluon``, explicit layouts and
  shared memory; no interpreter, so compiled only): ``P`` from ``mma_v2`` stored to shared memory in its MMA
  layout (float32, or rounded to the 16-bit input type as HF's ``bmm`` rounds c2p), a barrier, and
  ``shared_memory_descriptor.gather`` with the skew's indices in the MMA layout.

Writes ``skew_probe.json`` and ``skew_probe.md``.
"""
from __future__ import annotations

import argparse
import functools
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


@functools.lru_cache(maxsize=None)
def _gluon_kernel():
    """The Gluon variant, defined on first use (``None`` where this Triton has no Gluon)."""
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    except ImportError:
        return None

    @gluon.jit
    def _skew_gluon(A, KW, OUT, BM: gl.constexpr, BN: gl.constexpr, W: gl.constexpr, NW: gl.constexpr,
                    HALF: gl.constexpr):
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])
        blk_t: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, NW], [0, 1])
        r = gl.arange(0, BM, layout=gl.SliceLayout(1, blk))
        d = gl.arange(0, 64, layout=gl.SliceLayout(0, blk))
        a = gl.convert_layout(gl.load(A + r[:, None] * 64 + d[None, :]), a_l)
        dt = gl.arange(0, 64, layout=gl.SliceLayout(1, blk_t))
        w = gl.arange(0, W, layout=gl.SliceLayout(0, blk_t))
        smem = gl.allocate_shared_memory(gl.float16 if HALF else gl.float32, [BM, W],
                                         gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        rm = gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
        cm = gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
        widx = rm[:, None] - cm[None, :] + (BN - 1)
        acc = gl.zeros([BM, BN], gl.float32, mma)
        for it in range(0, 8):
            kwt = gl.convert_layout(gl.load(KW + it * 64 + w[None, :] * 64 + dt[:, None]), b_l)
            p = mma_v2(a, kwt, gl.zeros([BM, W], gl.float32, mma))
            if HALF:
                smem.store(p.to(gl.float16))
            else:
                smem.store(p)
            gl.barrier()
            acc += smem.gather(widx, 1).to(gl.float32)
            gl.barrier()
        gl.store(OUT + rm[:, None] * BN + cm[None, :], acc)

    return _skew_gluon


def _compile_gluon(cc: int, bm: int, bn: int, warps: int, half: int):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    w = triton.next_power_of_2(bm + bn - 1)
    sig = {"A": "*fp16", "KW": "*fp16", "OUT": "*fp32", "BM": "constexpr", "BN": "constexpr", "W": "constexpr",
           "NW": "constexpr", "HALF": "constexpr"}
    src = GluonASTSource(_gluon_kernel(), sig, {"BM": bm, "BN": bn, "W": w, "NW": warps, "HALF": half},
                         {(i,): [["tt.divisibility", 16]] for i in range(3)})
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps}), w


def probe(cc: int = 90) -> list[dict]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from benchmarks.static import main_loops, parse, sass_of
    from deberta_fast._compile_check import _resources

    rows = []

    def row(name, k, bm, bn, w, warps):
        res = _resources(k.asm["cubin"], k.asm["ptx"], cc, k.metadata, None)
        sass = sass_of(k.asm["cubin"], cc)
        loops = main_loops(parse(sass))
        per = 32 * warps / (bm * bn)
        # sm_80 unrolls the Gluon variant's 8 iterations: no loop; then the whole kernel / 8 (an upper bound)
        pe = [round(lp["longest"] * per, 2) for lp in loops] or [round(len(parse(sass)) * per / 8, 2)]
        return {"variant": name, "cc": cc, "block_m": bm, "block_n": bn, "window": w, "num_warps": warps,
                "regs": res.get("regs"), "spill_stores": res.get("spill_stores"),
                "ptx_shuffles": k.asm["ptx"].count("shfl.sync"), "per_element": pe, "loop": bool(loops)}

    if _gluon_kernel() is not None:
        for half, name in ((0, "gluon_smem"), (1, "gluon_smem_16")):
            for bm, bn, warps in ((64, 64, 4), (128, 64, 8)):
                try:
                    k, w = _compile_gluon(cc, bm, bn, warps, half)
                except Exception as e:  # an older Gluon (3.6: no gl.barrier, no shared-memory gather): say so
                    why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    rows.append({"variant": name, "cc": cc, "block_m": bm, "block_n": bn, "error": why[:200]})
                    continue
                rows.append(row(name, k, bm, bn, w, warps))
    for mode, name in MODES.items():
        for bm, bn, warps in ((64, 64, 4), (128, 64, 8)):
            w = triton.next_power_of_2(bm + bn - 1)
            sig = {"A": "*fp16", "KW": "*fp16", "S": "*fp32", "OUT": "*fp32", "MODE": "constexpr", "BM": "constexpr",
                   "BN": "constexpr", "W": "constexpr"}
            src = ASTSource(_skew_kernel, sig, {"MODE": mode, "BM": bm, "BN": bn, "W": w},
                            {(i,): [["tt.divisibility", 16]] for i in range(4)})
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})
            rows.append(row(name, k, bm, bn, w, warps))
    return rows


def table(rows: list[dict]) -> str:
    out = ["| variant | target | tile | window | warps | regs | spill stores B | PTX shuffles | main loop instr/element |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['variant']} | sm_{r['cc']} | {r['block_m']}x{r['block_n']} | | | | | | "
                       f"not compiled: {r['error']} |")
            continue
        per = "; ".join(str(x) for x in r["per_element"]) + ("" if r.get("loop", True) else " (unrolled: kernel / 8)")
        out.append(f"| {r['variant']} | sm_{r['cc']} | {r['block_m']}x{r['block_n']} | {r['window']} | {r['num_warps']} "
                   f"| {r['regs']} | {r['spill_stores']} | {r['ptx_shuffles']} | {per} |")
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
