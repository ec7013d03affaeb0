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
# (the kernels' third template argument: their wgmma variant, sm_90a only: WG in dfa_fwd.cu / dfa_bwd.cu; the
# forward's fourth: PIPE, its products overlapped with the softmax)
_KERNEL = re.compile(r"dfa_(fwd|bwd_dq|bwd_dkdv)_kernel.*?I(6__half|13__nv_bfloat16)Li(\d+)E(Lb([01])E)?(Lb([01])E)?")
# ptxas serializing a kernel's wgmmas (a wait after each; C7510 - C7515 name the causes: registers read (C7514) or
# written (C7515) while in flight, too few registers (C7511), calls ...)
_SERIALIZED = re.compile(r"\((C75\d\d)\).*?serialized due to (.*?) in the function '(\w+)'")


def tile_shapes() -> dict:
    """``{kernel: fn(D) -> (BLOCK_M, BLOCK_N)}`` read from the sources' Cfg structs (so a retiling shows up here)."""
    fwd = open(os.path.join(CSRC, "dfa_fwd.cu")).read()
    bwd = open(os.path.join(CSRC, "dfa_bwd.cu")).read()
    bm = int(re.search(r"static constexpr int BM = (\d+);", fwd)[1])
    bn = re.search(r"static constexpr int BN = D == (\d+) \? (\d+) : (\d+);", fwd)
    dq = re.search(r"DQ_BM = (\d+), DQ_BN = (\d+);", bwd)
    kv = re.search(r"KV_BN = (\d+), KV_BM = (\d+);", bwd)
    if not (bn and dq and kv):
        raise RuntimeError("benchmarks.static_cuda: a kernel's Cfg no longer matches the pattern; update tile_shapes")
    return {"fwd": lambda D: (bm, int(bn[2]) if D == int(bn[1]) else int(bn[3])), "bwd_dq": lambda D: (int(dq[1]), int(dq[2])),
            "bwd_dkdv": lambda D: (int(kv[2]), int(kv[1]))}


def parse_ptxas(log: str) -> dict:
    """``{mangled kernel: {regs, spill_stores, spill_loads, stack, static_smem}}`` from ``-Xptxas -v``."""
    out, fn = {}, None
    for line in log.splitlines():
        m = _SERIALIZED.search(line)
        if m:
            out.setdefault(m[3], {})["wgmma_serialized"] = f"{m[1]}: " + " ".join(m[2].split())
            continue
        m = _ENTRY.search(line)
        if m:
            fn = m[1]
            out.setdefault(fn, {})
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
        wgmma, serial = m[5] == "1", m[7] == "0"
        if wgmma and arch != "90a":
            continue  # a trap: the host launches the wgmma variants only where the sm_90a build runs
        bm, bn = tiles[kernel](D)
        per = THREADS / (bm * bn)
        loops = static.main_loops(static.parse(text))
        for lp in loops:
            lp["per_element_shortest"] = round(lp["shortest"] * per, 2)
            lp["per_element_longest"] = round(lp["longest"] * per, 2)
        variant = (" (wgmma serial)" if serial else " (wgmma)") if wgmma else ""
        rows.append(dict(kernel=f"dfa_{kernel}_kernel" + variant, arch=f"sm_{arch}", dtype=dtype, D=D, block_m=bm,
                         block_n=bn,
                         mma=static.mma_kind(text), sass_instructions=len(static.parse(text)), loops=loops,
                         **res.get(fn, {})))
    return rows


# the helper kernels beside the attention kernels (launch_sat_terms, band_to_slots): registers and spills only (no
# main loop); their template arguments: the element type, then D / BY_KEY
_HELPER = re.compile(r"dfa_(sat_terms|band_to_slots)_kernel.*?I(6__half|13__nv_bfloat16)L([ib])(\d+)E")


def helpers(ptxas_log: str, arch: str) -> list[dict]:
    """One row per helper-kernel instantiation in a ``-Xptxas -v`` log: registers, spills, stack."""
    rows = []
    for fn, res in sorted(parse_ptxas(ptxas_log).items()):
        m = _HELPER.search(fn)
        if m:
            arg = f"D={m[4]}" if m[3] == "i" else ("by key" if m[4] == "1" else "by query")
            rows.append(dict(kernel=f"dfa_{m[1]}_kernel", arch=f"sm_{arch}",
                             dtype="fp16" if m[2] == "6__half" else "bf16", args=arg, **res))
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


# Profile builds beside the shipped one: every tile in the band / beyond it (-DDFA_PROFILE_ZONE, tile_saturation),
# interior (-DDFA_PROFILE_INTERIOR), the common call's paths (-DDFA_PROFILE_PLAIN, DFA_PROFILE_ASSUME); "saturated,
# key mask": the same with a key mask present (-DDFA_PROFILE_KEY_MASK: a padded batch, whose interior tiles without
# a masked key skip the per-element tests but pay the per-tile vote); "..., dropout": a training call (attention
# dropout on: -DDFA_PROFILE_DROPOUT); "saturated, per-tile terms": the column terms computed per tile in every block
# (-DDFA_PROFILE_TILE_TERMS: the default below half the tiles saturated) instead of precomputed (launch_sat_terms);
# "saturated, settled": the forward once its rows' maxima have settled (-DDFA_PROFILE_SETTLED: the rescale reduced to
# two multiplies, the vote and the factors kept), so its longest path is the common iteration, an interior tile with
# the next tile's copies.
ZONES = {"band": (0, ()), "saturated": (1, ()), "saturated, per-tile terms": (1, ("-DDFA_PROFILE_TILE_TERMS",)),
         "saturated, key mask": (1, ("-DDFA_PROFILE_KEY_MASK",)),
         "band, dropout": (0, ("-DDFA_PROFILE_DROPOUT",)), "saturated, dropout": (1, ("-DDFA_PROFILE_DROPOUT",)),
         "saturated, settled": (1, ("-DDFA_PROFILE_SETTLED",))}
#: zones built for one source file only (the others' kernels would not change)
ZONE_FILES = {"saturated, settled": "dfa_fwd.cu"}


def _compile(name: str, arch: str, tmp: str, zone: str | None = None) -> tuple[str, str]:
    from csrc import build_config

    nvcc = build_config.find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found: the CUDA static profile needs it (no GPU needed)")
    tag = f"{name}_{arch}" + ("" if zone is None else "_" + re.sub(r"\W+", "_", zone))
    keep = os.path.join(tmp, f"keep_{tag}")
    os.makedirs(keep)
    obj = os.path.join(tmp, f"{tag}.o")
    cmd = build_config.nvcc_check_cmd(nvcc, name, arch, obj, keep)
    if zone is not None:
        z, extra = ZONES[zone]
        cmd += [f"-DDFA_PROFILE_ZONE={z}", "-DDFA_PROFILE_PLAIN", "-DDFA_PROFILE_INTERIOR", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
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


def profile(archs=("80", "90a"), progress=print, zones=True) -> dict:
    """Rows of the build as shipped; with ``zones``, each row also gets ``zones[<ZONES key>]``: the main loop's
    per-element figures of a build where every tile is of that kind (the shipped loop holds every kind)."""
    t0 = time.time()
    names = sorted((n for n in os.listdir(CSRC) if n.endswith(".cu")), key=lambda n: n != "dfa_bwd.cu")
    variants = [None, *(ZONES if zones else ())]
    rows, by_zone, helper_rows = [], {}, []
    with tempfile.TemporaryDirectory() as tmp, cf.ThreadPoolExecutor(2) as ex:
        futs = {(n, a, z): ex.submit(_compile, n, a, tmp, z) for n in names for a in archs for z in variants
                if ZONE_FILES.get(z, n) == n}
        for (n, a, z), f in futs.items():
            obj, log = f.result()
            progress(f"static_cuda: {n} sm_{a}{'' if z is None else ' ' + z} compiled "
                     f"({time.time() - t0:.0f} s)")
            got = analyse(obj, log, a)
            if z is None:
                rows += got
                helper_rows += helpers(log, a)
            else:
                for r in got:
                    by_zone[(r["kernel"], r["arch"], r["dtype"], r["D"], z)] = r["loops"]
    for r in rows:
        zl = {zn: by_zone.get((r["kernel"], r["arch"], r["dtype"], r["D"], zn)) for zn in ZONES}
        if any(v is not None for v in zl.values()):
            r["zones"] = zl
    return {**_header(), "seconds": round(time.time() - t0, 1), "kernels": rows, "helpers": helper_rows}


def table(prof: dict) -> str:
    lines = [f"# Static profile of the CUDA C++ kernels ({prof['date']}, {prof['nvcc']}; compiler output only, no GPU)",
             "",
             "Per element = SASS instructions on the shortest / longest path through one main-loop iteration x 128 "
             "threads / (BLOCK_M x BLOCK_N); see benchmarks/static_cuda.py.", "",
             "Band / saturated tiles: the same loop built with every tile in the band / beyond it "
             "(-DDFA_PROFILE_ZONE) and interior (no edge or mask checks: -DDFA_PROFILE_INTERIOR), for the common "
             "call: c2p + p2c present, no mask, no dropout, the saturated column terms precomputed "
             "(launch_sat_terms, the default once half the tiles are saturated) (-DDFA_PROFILE_PLAIN: the compiler"
             " drops the other branches; per-tile terms: computed in every block, the default below that, "
             "-DDFA_PROFILE_TILE_TERMS); the shipped loop holds them all.  Shortest: the last key tile (no "
             "prefetch); longest: with the next tile's copies issued.  Saturated, key mask: the saturated build "
             "with a key mask present (a padded batch; its interior tiles without a masked key skip the tests and "
             "pay a per-tile vote).  Dropout: the band / saturated builds of a training call "
             "(-DDFA_PROFILE_DROPOUT).  Settled (forward only): the saturated build once the rows' maxima have "
             "settled (-DDFA_PROFILE_SETTLED: the rescale reduced to two multiplies); its longest path is the common "
             "iteration, an interior tile with the next tile's copies.",
             "",
             "| kernel | target | dtype | D | tile | regs | spill st/ld B | stack B | MMA | main loop instr/element "
             "(shortest - longest) | band tiles | saturated tiles | saturated tiles, per-tile terms | saturated tiles, "
             "key mask | band tiles, dropout | saturated tiles, dropout | saturated, settled |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(loops):
        return "; ".join(f"{lp['per_element_shortest']} - {lp['per_element_longest']}" for lp in loops or []) or "?"

    for r in sorted(prof["kernels"], key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["D"])):
        z = r.get("zones", {})
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['D']} | {r['block_m']}x{r['block_n']} | "
                     f"{r.get('regs')} | {r.get('spill_stores')}/{r.get('spill_loads')} | {r.get('stack')} | "
                     f"{r['mma']} | {fmt(r['loops'])} | {fmt(z.get('band'))} | {fmt(z.get('saturated'))} | "
                     f"{fmt(z.get('saturated, per-tile terms'))} | "
                     f"{fmt(z.get('saturated, key mask'))} | {fmt(z.get('band, dropout'))} | "
                     f"{fmt(z.get('saturated, dropout'))} | "
                     f"{fmt(z.get('saturated, settled')) if z.get('saturated, settled') else '-'} |")
    if prof.get("helpers"):
        lines += ["", "Helper kernels (no main loop):", "", "| kernel | target | dtype | template | regs | spill st/ld B "
                  "| stack B |", "|---|---|---|---|---|---|---|"]
        for r in sorted(prof["helpers"], key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["args"])):
            lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['args']} | {r.get('regs')} | "
                         f"{r.get('spill_stores')}/{r.get('spill_loads')} | {r.get('stack')} |")
    return "\n".join(lines) + "\n"


#: issue 15's static targets: no spill anywhere; the saturated forward at most this many instructions per score
#: element for these head dims (every variant): its shortest path, and its settled iteration's longest
SATURATED_FWD_MAX, SATURATED_FWD_DIMS = 10.0, (32, 64)


def problems(prof: dict) -> list[str]:
    """What breaks a target of issue 15 in a profile: a kernel that spills or whose wgmmas ptxas serialized (C75xx),
    and (with the zone builds) a saturated forward over ``SATURATED_FWD_MAX`` per element at ``SATURATED_FWD_DIMS``:
    its shortest path, or the longest of its settled iteration (the common one: an interior tile with the next
    tile's copies, no rescale)."""
    out = []
    for r in prof.get("helpers", []):
        if r.get("spill_stores") or r.get("spill_loads"):
            out.append(f"{r['kernel']} {r['arch']} {r['dtype']} {r['args']}: spills {r.get('spill_stores')}/"
                       f"{r.get('spill_loads')} B")
    for r in prof["kernels"]:
        what = f"{r['kernel']} {r['arch']} {r['dtype']} D={r['D']}"
        if r.get("spill_stores") or r.get("spill_loads"):
            out.append(f"{what}: spills {r.get('spill_stores')}/{r.get('spill_loads')} B")
        if r.get("wgmma_serialized"):
            out.append(f"{what}: ptxas serialized its wgmmas ({r['wgmma_serialized']})")
        if not (r["kernel"].startswith("dfa_fwd_kernel") and r["D"] in SATURATED_FWD_DIMS):
            continue
        zones = r.get("zones") or {}
        if zones.get("saturated") and not zones.get("saturated, settled"):
            out.append(f"{what}: no 'saturated, settled' build beside the saturated one (ZONES / ZONE_FILES)")
        for zone, path, name in (("saturated", "per_element_shortest", "saturated forward"),
                                 ("saturated, settled", "per_element_longest", "settled saturated iteration")):
            if zones.get(zone):
                worst = max(lp[path] for lp in zones[zone])
                if worst > SATURATED_FWD_MAX:
                    out.append(f"{what}: {name} {worst} instructions per element > {SATURATED_FWD_MAX}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.static_cuda", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="80,90a", help="comma-separated nvcc archs (default 80,90a)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/<date>-static")
    ap.add_argument("--no-zones", action="store_true", help="skip the band / saturated profile builds (4x faster)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target of issue 15 fails (problems())")
    a = ap.parse_args(argv)
    prof = profile(tuple(x.strip() for x in a.archs.split(",") if x.strip()),
                   progress=lambda m: print(m, file=sys.stderr, flush=True), zones=not a.no_zones)
    from benchmarks.static import write_report

    write_report(a.out, f"{prof['date']}-static", "cuda.json", "cuda.md", prof, table(prof))
    bad = problems(prof) if a.check else []
    for b in bad:
        print(f"static_cuda: {b}", file=sys.stderr)
    return 0 if prof["kernels"] and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
