"""Static profile of the CUDA C++ kernels (``csrc/``), from the compiler alone (no GPU):

    python -m benchmarks.static_cuda [--out benchmarks/results/<date>-static] [--archs 80,90a]

Each ``.cu`` is compiled as CI compiles it (``csrc.build_config.nvcc_check_cmd``: the build's flags, ``-Xptxas -v``)
for sm_80 and sm_90a.  Per attention kernel instantiation (fp16 / bf16 x head dim): registers, spill stores /
loads, stack, shared memory (static; the tiles' dynamic shared memory is ``Cfg::SMEM``), the MMA kind, and the
main loop's SASS instructions per score element on its shortest and longest path (``benchmarks.static``'s
analysis: per element = instructions x 32 x warps / (BLOCK_M x BLOCK_N); the tile shapes are read from the
sources' ``Cfg`` structs).  Writes ``cuda.json`` and ``cuda.md``.  nvcc took 14-22 s per file and arch (measured on
the 2-core CPU machine, 2026-12-02, nvcc 13.0).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
THREADS = 128  # kThreads in dfa_common.cuh (4 warps)

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_KERNEL = re.compile(r"dfa_(fwd|bwd_dq|bwd_dkdv)_kernel.*?I(6__half|13__nv_bfloat16)Li(\d+)E")


def tile_shapes() -> dict:
    """``{kernel: fn(D) -> (BLOCK_M, BLOCK_N)}`` read from the sources' Cfg structs (so a retiling shows up here)."""
    fwd = open(os.path.join(CSRC, "dfa_fwd.cu")).read()
    bwd = open(os.path.join(CSRC, "dfa_bwd.cu")).read()
    bm = int(re.search(r"static constexpr int BM = (\d+);", fwd)[1])
    bn = int(re.search(r"static constexpr int BN = (\d+);", fwd)[1])
    dq = re.search(r"DQ_BM = (\d+), DQ_BN = (\d+);", bwd)
    kv = re.search(r"KV_BN = (\d+), KV_BM = \(D >= (\d+) \? (\d+) : (\d+)\);", bwd)
    if not (dq and kv):
        raise RuntimeError("benchmarks.static_cuda: the backward's Cfg no longer matches the pattern; update tile_shapes")
    return {"fwd": lambda D: (bm, bn), "bwd_dq": lambda D: (int(dq[1]), int(dq[2])),
            "bwd_dkdv": lambda D: (int(kv[3]) if D >= int(kv[2]) else int(kv[4]), int(kv[1]))}


def parse_ptxas(log: str) -> dict:
    """``{mangled kernel: {regs, spill_stores, spill_loads, stack, static_smem}}`` from ``-Xptxas -v``."""
    out, fn = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            fn = m[1]
            out[fn] = {}
            continue
        if fn is None:
            continue
        m = _PROPS.search(line)
        if m:
            out[fn].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        m = _USED.search(line)
        if m:
            out[fn].update(regs=int(m[1]), static_smem=int(m[2] or 0))
    return out


def split_sass(sass: str) -> dict:
    """``{mangled function: its SASS text}`` from ``cuobjdump -sass``."""
    out, name, buf = {}, None, []
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            if name:
                out[name] = "\n".join(buf)
            name, buf = m[1], []
        elif name:
            buf.append(line)
    if name:
        out[name] = "\n".join(buf)
    return out


def analyse(obj: str, ptxas_log: str, arch: str) -> list[dict]:
    """One row per attention kernel instantiation in the object ``obj`` compiled for ``arch``."""
    from benchmarks import static

    sass = subprocess.run([_cuobjdump(), "-sass", obj], check=True, capture_output=True, text=True).stdout
    funcs, res, tiles = split_sass(sass), parse_ptxas(ptxas_log), tile_shapes()
    rows = []
    for fn, text in sorted(funcs.items()):
        m = _KERNEL.search(fn)
        if not m:
            continue
        kernel, dtype, D = m[1], "fp16" if m[2] == "6__half" else "bf16", int(m[3])
        bm, bn = tiles[kernel](D)
        per = THREADS / (bm * bn)
        loops = static.main_loops(static.parse(text))
        for lp in loops:
            lp["per_element_shortest"] = round(lp["shortest"] * per, 2)
            lp["per_element_longest"] = round(lp["longest"] * per, 2)
        rows.append(dict(kernel=f"dfa_{kernel}_kernel", arch=f"sm_{arch}", dtype=dtype, D=D, block_m=bm, block_n=bn,
                         mma=static.mma_kind(text), sass_instructions=len(static.parse(text)), loops=loops,
                         **res.get(fn, {})))
    return rows


def _cuobjdump() -> str:
    """cuobjdump: on PATH, next to nvcc, else the one Triton ships (this machine's CUDA 13.0 install has none)."""
    import shutil

    from csrc import build_config

    nvcc = build_config.find_nvcc()
    for cand in (shutil.which("cuobjdump"),
                 os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump") if nvcc else None):
        if cand and os.path.exists(cand):
            return cand
    from deberta_fast._compile_check import _nvidia_tool

    return _nvidia_tool("cuobjdump", 90)


def _compile(name: str, arch: str, tmp: str) -> tuple[str, str]:
    from csrc import build_config

    nvcc = build_config.find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found: the CUDA static profile needs it (no GPU needed)")
    keep = os.path.join(tmp, f"keep_{name}_{arch}")
    os.makedirs(keep)
    obj = os.path.join(tmp, f"{name}.sm_{arch}.o")
    r = subprocess.run(build_config.nvcc_check_cmd(nvcc, name, arch, obj, keep), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed for {name} sm_{arch}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return obj, r.stdout + r.stderr


def _header() -> dict:
    import torch
    from csrc import build_config

    nvcc = build_config.find_nvcc()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1] \
        if nvcc else "nvcc not found"
    return {"date": time.strftime("%Y-%m-%d"), "nvcc": version, "torch_headers": torch.__version__}


def profile(archs=("80", "90a"), progress=print) -> dict:
    t0 = time.time()
    names = sorted((n for n in os.listdir(CSRC) if n.endswith(".cu")), key=lambda n: n != "dfa_bwd.cu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, cf.ThreadPoolExecutor(2) as ex:
        futs = {(n, a): ex.submit(_compile, n, a, tmp) for n in names for a in archs}
        for (n, a), f in futs.items():
            obj, log = f.result()
            progress(f"static_cuda: {n} sm_{a} compiled ({time.time() - t0:.0f} s)")
            rows += analyse(obj, log, a)
    return {**_header(), "seconds": round(time.time() - t0, 1), "kernels": rows}


def table(prof: dict) -> str:
    lines = [f"# Static profile of the CUDA C++ kernels ({prof['date']}, {prof['nvcc']}; compiler output only, no GPU)",
             "",
             "Per element = SASS instructions on the shortest / longest path through one main-loop iteration x 128 "
             "threads / (BLOCK_M x BLOCK_N); see benchmarks/static_cuda.py.", "",
             "| kernel | target | dtype | D | tile | regs | spill st/ld B | stack B | MMA | main loop instr/element "
             "(shortest - longest) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(prof["kernels"], key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["D"])):
        loops = "; ".join(f"{lp['per_element_shortest']} - {lp['per_element_longest']}" for lp in r["loops"]) or "?"
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['D']} | {r['block_m']}x{r['block_n']} | "
                     f"{r.get('regs')} | {r.get('spill_stores')}/{r.get('spill_loads')} | {r.get('stack')} | "
                     f"{r['mma']} | {loops} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.static_cuda", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="80,90a", help="comma-separated nvcc archs (default 80,90a)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/<date>-static")
    a = ap.parse_args(argv)
    prof = profile(tuple(x.strip() for x in a.archs.split(",") if x.strip()),
                   progress=lambda m: print(m, file=sys.stderr, flush=True))
    from benchmarks.static import write_report

    write_report(a.out, f"{prof['date']}-static", "cuda.json", "cuda.md", prof, table(prof))
    return 0 if prof["kernels"] else 1


if __name__ == "__main__":
    sys.exit(main())
