"""Static profile of the shipped Triton kernels, from the compiler alone (no GPU):

    python -m benchmarks.static [--full | --sweep | --tma] [--out benchmarks/results/<date>-static]

Every kernel the launcher launches (``deberta_fast._compile_check``: the launcher's own launches, compiled with
the launch-time specialization for sm_80 and sm_90) gets: registers, spill stores/loads, stack, shared memory,
the MMA instruction kind (``HMMA`` = mma.sync, ``HGMMA`` = wgmma) from the SASS, and the length of its main loop
in SASS instructions per score element, for the shortest and the longest path through one iteration.

Main loop: a backward branch whose body holds the tile's MMAs (the key-tile loops of the forward and of dq, the
query-tile loops of dK/dV).  The kernels walk each kind of tile in a loop of its own (``_tile_regions``: the
forward's saturated loop, then its in-band loop, then (masked calls) the pass over the keys of a program holding
HF's uniform rows; dq / dK/dV: saturated, in-band strictly inside the run band (``INNER``), in-band reaching an end of
it (both sides of the inner tiles), saturated), so a kernel reports one entry per loop, in code order.  One iteration
handles ``BLOCK_M x BLOCK_N`` scores (the forward's saturated loop: ``BLOCK_M x SAT_N``) with ``32 * num_warps``
threads, so ``per element = instructions on the path * 32 * num_warps / (BLOCK_M * BLOCK_N)``
(per-thread instructions, predicated-off ones included: they issue).  Shortest and longest path through an
iteration differ where a loop body still branches.  Inner loops inside the body count once.
Writes ``static.json`` and ``table.md``; ``--sweep`` instead compiles the training launches under each launch config
of :data:`SWEEP` (``sweep.json``, ``sweep.md``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

_INST = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_MMA = re.compile(r"\bH(?:G)?MMA\.")
_BRA = re.compile(r"\bBRA\b(?:\s+`?\(?[^,]*?,)?\s*(0x[0-9a-f]+)")


def sass_of(cubin: bytes, cc: int) -> str:
    from deberta_fast._compile_check import _nvidia_tool

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_nvidia_tool("cuobjdump", cc), "--dump-sass", path], check=True,
                              capture_output=True, text=True).stdout


def parse(sass: str) -> list[tuple[int, str]]:
    """``(address, instruction)`` in order."""
    out = []
    for line in sass.splitlines():
        m = _INST.match(line)
        if m:
            out.append((int(m[1], 16), m[2]))
    return out


def _branch(text: str):
    """``(target, conditional)`` of a BRA, else None."""
    if "BRA" not in text.split():
        return None
    m = _BRA.search(text)
    if not m:
        return None
    conditional = text.startswith("@") or bool(re.search(r"BRA\s+!?U?P\d", text))
    return int(m[1], 16), conditional


def loop_paths(insts: list[tuple[int, str]], head: int, tail: int) -> tuple[int, int] | None:
    """Shortest and longest instruction count from ``head`` to the back-edge at ``tail`` (forward edges only;
    inner backward branches fall through; paths leaving the loop are not iterations).  None when no forward path
    joins them: the backward branch closes no loop (out-of-line code, e.g. a slow path that jumps back)."""
    body = [(a, t) for a, t in insts if head <= a <= tail]
    index = {a: i for i, (a, _) in enumerate(body)}
    INF = float("inf")
    lo, hi = [INF] * len(body), [-INF] * len(body)
    for i in range(len(body) - 1, -1, -1):
        a, t = body[i]
        if a == tail:
            lo[i] = hi[i] = 1
            continue
        succ = []
        br = _branch(t)
        if br is not None and br[0] > a:
            target, cond = br
            if target in index:
                succ.append(index[target])
            if cond:
                succ.append(i + 1)
        elif t.startswith("EXIT") or t.startswith("RET"):
            succ = []
        else:
            succ.append(i + 1)  # plain instruction, predicated EXIT or an inner backward branch: fall through
        cand = [j for j in succ if j < len(body) and lo[j] < INF]
        if cand:
            lo[i] = 1 + min(lo[j] for j in cand)
            hi[i] = 1 + max(hi[j] for j in cand)
    if lo[0] == INF:
        return None
    return int(lo[0]), int(hi[0])


def main_loops(insts: list[tuple[int, str]]) -> list[dict]:
    """Backward branches whose body holds an MMA, outermost first: ``{head, tail, mma, ldg, shortest, longest}``."""
    loops = []
    for a, t in insts:
        br = _branch(t)
        if br is None or br[0] >= a:
            continue
        head = br[0]
        body = [x for b, x in insts if head <= b <= a]
        mma = sum(bool(_MMA.search(x)) for x in body)
        if not mma:
            continue
        paths = loop_paths(insts, head, a)
        if paths is None:
            continue
        shortest, longest = paths
        loops.append({"head": head, "tail": a, "instructions": len(body), "mma": mma,
                      "ldg": sum(" LDG" in f" {x}" for x in body), "shortest": shortest, "longest": longest})
    # keep the outermost loops (a loop inside another MMA loop is part of its body)
    loops.sort(key=lambda d: d["head"] - d["tail"])
    outer = []
    for lp in loops:
        if not any(o["head"] <= lp["head"] and lp["tail"] <= o["tail"] for o in outer):
            outer.append(lp)
    return sorted(outer, key=lambda d: d["head"])


def mma_kind(sass: str) -> str:
    if "HGMMA" in sass:
        return "wgmma (HGMMA)"
    if "HMMA" in sass:
        return "mma.sync (HMMA)"
    return "none (FMA)"


def _constexpr_values(job) -> dict:
    names = [p.name for p in job.fn.params]
    return {names[path[0]]: v for path, v in job.constexprs.items()}


def _blocks(job) -> tuple[int, int]:
    vals = _constexpr_values(job)
    return int(vals["BLOCK_M"]), int(vals["BLOCK_N"])


def _loop_widths(job, n_loops: int) -> list[int]:
    """Key (or query) tile width of each main loop in code order: the forward's first loop, the saturated one,
    walks ``SAT_N`` keys per iteration (``LaunchConfig.sat_block_n``), every other loop ``BLOCK_N``."""
    vals = _constexpr_values(job)
    bn = int(vals["BLOCK_N"])
    return [int(vals.get("SAT_N", bn)) if i == 0 else bn for i in range(n_loops)]


def _run_chunk() -> int:
    """Runs per iteration of the backward's relative-share epilogue (``_run_products``)."""
    from deberta_fast._kernels.triton_attention_bwd import RUN_CHUNK
    return int(RUN_CHUNK.value)


def _run_products_loop(job, n_loops: int) -> int | None:
    """Index of the backward's epilogue loop (``_run_products``: dq's with c2p, dK/dV's with p2c, unless
    ``RUN_PRODUCTS`` is off), the one after its four region loops (``_tile_regions``, ``_inner_tiles``), or None."""
    vals = _constexpr_values(job)
    term = {"disentangled_bwd_dq_kernel": "HAS_C2P", "disentangled_bwd_dkdv_kernel": "HAS_P2C"}.get(job.kernel)
    on = term and vals.get(term) and vals.get("RUN_PRODUCTS", True)
    return 4 if on and n_loops > 4 else None


def _analyse(jobs, results) -> list[dict]:
    """One row per compiled job: resources from the compile check, MMA kind and main-loop paths from the SASS."""
    import triton
    from triton.compiler import ASTSource

    rows = []
    for job, res in zip(jobs, results):
        row = {"kernel": job.kernel, "cc": job.cc, "launch": job.labels[0], "num_warps": job.options.num_warps,
               "num_stages": job.options.num_stages, "maxnreg": getattr(job.options, "maxnreg", None),
               "config": job.describe_constexprs(), "ok": res["ok"]}
        if not res["ok"]:
            row["error"] = res["error"]
            rows.append(row)
            continue
        r = res["res"]
        row.update(regs=r.get("regs"), spill_stores=r.get("spill_stores"), spill_loads=r.get("spill_loads"),
                   stack=r.get("stack"), shared=res["shared"])
        kernel = triton.compile(ASTSource(job.fn, job.signature, job.constexprs, job.attrs),  # Triton's cache
                                target=triton.backends.compiler.GPUTarget("cuda", job.cc, 32),
                                options=job.options.__dict__)
        sass = sass_of(kernel.asm["cubin"], job.cc)
        bm, bn = _blocks(job)
        loops = main_loops(parse(sass))
        epilogue, run_chunk = _run_products_loop(job, len(loops)), _run_chunk()
        for i, (lp, width) in enumerate(zip(loops, _loop_widths(job, len(loops)))):
            per = 32 * job.options.num_warps / (bm * width)
            if i == epilogue:  # its rows (dq's queries, dK/dV's keys) x RUN_CHUNK runs per iteration
                lp["role"], width = "run products", run_chunk
                per = 32 * job.options.num_warps / ((bm if "dq" in job.kernel else bn) * width)
            lp["tile_n"] = width
            lp["per_element_shortest"] = round(lp["shortest"] * per, 2)
            lp["per_element_longest"] = round(lp["longest"] * per, 2)
        row.update(mma=mma_kind(sass), sass_instructions=len(parse(sass)), block_m=bm, block_n=bn, loops=loops)
        rows.append(row)
    return rows


def _header(full) -> dict:
    import torch
    import triton

    return {"date": time.strftime("%Y-%m-%d"), "triton": triton.__version__, "torch": torch.__version__, "full": full}


def profile(full: bool, progress=print) -> dict:
    from deberta_fast import _compile_check as cc_mod

    t0 = time.time()
    jobs = cc_mod.build_jobs(cc_mod.scenarios(full), progress)
    rows = _analyse(jobs, cc_mod.compile_all(jobs, cc_mod._default_procs(), progress))
    return {**_header(full), "seconds": round(time.time() - t0, 1), "kernels": rows}


# Launch configs the sweep compiles (BLOCK_M, BLOCK_N, num_warps, num_stages[, sat_block_n]), head dims 64 (and 32
# for the backward).
# A backward config is compiled for both of its kernels (dq and dK/dV), each analysed on its own: the launcher picks
# one per kernel (``BackwardConfig``).
SWEEP = {
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 2), (128, 32, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3),
            (64, 64, 4, 2), (64, 32, 4, 3), (64, 64, 4, 3, 128), (64, 32, 4, 3, 64)],
    # (64, 64, 8, 2), the slowest of both kernels in the H200 tune (2026-12-04), gave its place to 16x64 (the dK/dV
    # kernel's since 2026-12-05)
    "bwd": [(64, 64, 4, 2), (64, 64, 4, 1), (16, 64, 4, 1), (64, 64, 8, 1), (64, 32, 4, 2), (64, 32, 4, 1),
            (32, 64, 4, 2), (32, 64, 4, 1), (32, 32, 4, 2), (128, 64, 8, 1)],
}


def _sweep_scenarios(cc_mod, pass_: str, tag: str) -> list:
    """fwd: DeBERTa training (fp16, D=64, L=512, c2p+p2c, key mask, dropout; sm_80 + sm_90) and inference (sm_90);
    bwd: training, packed (sm_80 + sm_90) and training at D=32."""
    if pass_ == "fwd":
        return [cc_mod.Scenario("fwd", why=f"sweep {tag}"),
                cc_mod.Scenario("fwd", dropout=False, targets=(90,), why=f"sweep {tag} inference")]
    return [cc_mod.Scenario("bwd", why=f"sweep {tag}"),
            cc_mod.Scenario("bwd", varlen=True, mask="none", why=f"sweep {tag} packed"),
            cc_mod.Scenario("bwd", D=32, why=f"sweep {tag} D=32")]


def sweep(progress=print, configs: dict | None = None) -> dict:
    """The launches of :func:`_sweep_scenarios` compiled under every launch config of :data:`SWEEP` (or
    ``configs``, same form; ``launch_config`` replaced for the capture), with the same analysis as
    :func:`profile`."""
    from deberta_fast import _compile_check as cc_mod

    t0 = time.time()
    launch = cc_mod._launch_module()
    original = launch.launch_config
    jobs = []
    try:
        for pass_, cfgs in (SWEEP if configs is None else configs).items():
            for cfg in cfgs:
                c = launch.LaunchConfig(*cfg)
                if pass_ == "bwd":
                    c = launch.BackwardConfig(dq=c, dkdv=c)
                # the swept pass gets the config, the other its usual one (the backward scenario runs a forward)
                launch.launch_config = lambda p, *a, _c=c, _p=pass_, **k: _c if p == _p else original(p, *a, **k)
                jobs += cc_mod.build_jobs(_sweep_scenarios(cc_mod, pass_, "/".join(map(str, cfg))), progress)
    finally:
        launch.launch_config = original
    rows = _analyse(jobs, cc_mod.compile_all(jobs, cc_mod._default_procs(), progress))
    return {**_header(False), "sweep": True, "seconds": round(time.time() - t0, 1), "kernels": rows}


def tma_pairs(progress=print) -> dict:
    """The TMA experiment (``DEBERTA_FAST_TRITON_TMA=1``): every TMA launch of the full compile tier beside the same
    launch with pointer loads (``why`` "TMA (A/B), pointer loads"), with the same analysis as :func:`profile`."""
    import dataclasses

    from deberta_fast import _compile_check as cc_mod

    t0 = time.time()
    seen, scs = set(), []
    for sc in cc_mod.scenarios(True):
        if sc.tma and sc.label not in seen:
            seen.add(sc.label)
            scs += [dataclasses.replace(sc, tma=False, why="TMA (A/B), pointer loads"), sc]
    jobs = cc_mod.build_jobs(scs, progress)
    rows = _analyse(jobs, cc_mod.compile_all(jobs, cc_mod._default_procs(), progress))
    return {**_header(True), "tma": True, "seconds": round(time.time() - t0, 1), "kernels": rows}


def table(prof: dict) -> str:
    tier = ("launch-config sweep" if prof.get("sweep") else "the TMA launches and their pointer-load twins"
            if prof.get("tma") else "full tier" if prof["full"] else "default tier")
    out = [f"# Static profile of the Triton kernels ({prof['date']}, triton {prof['triton']}, {tier}; "
           "compiler output only, no GPU)", "",
           "Per element = SASS instructions on the shortest / longest path through one main-loop iteration "
           "x 32 x warps / (BLOCK_M x BLOCK_N) (the forward's first loop: BLOCK_M x SAT_N; a backward's `[runs]` loop, "
           f"the relative share's epilogue: its rows x {_run_chunk()} runs); see benchmarks/static.py.",
           "",
           "| kernel | target | launch | config | warps/stages | regs | spill st/ld B | smem B | MMA | main loop "
           "instr/element (shortest - longest) | loop LDG |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(prof["kernels"], key=lambda r: (r["kernel"], r["cc"], r["launch"])):
        if not r["ok"]:
            out.append(f"| {r['kernel']} | sm_{r['cc']} | {r['launch']} | {r['config']} | | FAILED | | | | | |")
            continue
        loops = "; ".join(("[runs] " if lp.get("role") else "") +
                          f"{lp['per_element_shortest']:g} - {lp['per_element_longest']:g}" for lp in r["loops"]) or "?"
        ldg = "; ".join(str(lp["ldg"]) for lp in r["loops"])
        out.append(f"| {r['kernel']} | sm_{r['cc']} | {r['launch']} | {r['config']} | "
                   f"{r['num_warps']}/{r['num_stages']}{_maxnreg(r)} "
                   f"| {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {r['mma']} | {loops} | "
                   f"{ldg} |")
    return "\n".join(out) + "\n"


def _maxnreg(row: dict) -> str:
    """`` maxnreg N`` where the launch caps the registers (``LaunchConfig.max_regs``), else nothing."""
    return f" maxnreg {row['maxnreg']}" if row.get("maxnreg") else ""


def write_report(out: str | None, default_dir: str, json_name: str, md_name: str, data: dict, md: str,
                 quiet: bool = False) -> None:
    """Write ``data`` as ``json_name`` and ``md`` as ``md_name`` under ``out`` (default
    ``benchmarks/results/<default_dir>``), and print ``md`` (unless ``quiet``): the last step of every static /
    tuning report."""
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", default_dir)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, json_name), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out, md_name), "w") as f:
        f.write(md)
    if not quiet:
        print(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="every launch config (compile_check --full; slow cold)")
    ap.add_argument("--sweep", action="store_true", help="the launches of _sweep_scenarios under every config of "
                    "SWEEP (writes sweep.json / sweep.md instead)")
    ap.add_argument("--configs", default=None, help="with --sweep: only these, e.g. "
                    "'fwd=128/64/8/3,fwd=64/64/4/2/128,bwd=64/64/4/2' (forward: an optional 5th field, the saturated "
                    "tiles' width; a 6th: ptxas's register limit, LaunchConfig.max_regs, as the compile check prints "
                    "configs)")
    ap.add_argument("--name", default="sweep", help="with --sweep: output file stem (default sweep: sweep.json, "
                    "sweep.md)")
    ap.add_argument("--tma", action="store_true", help="the TMA experiment's launches beside their pointer-load "
                    "twins (writes tma.json / tma.md instead)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/<date>-static")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: the static profile compiles the kernels for the GPU")
    progress = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    configs = None
    if a.configs:
        configs = {}
        for item in a.configs.split(","):
            pass_, _, cfg = item.partition("=")
            if pass_ not in SWEEP or len(cfg.split("/")) not in (4, 5, 6):
                ap.error(f"--configs: {item!r} is not PASS=BM/BN/WARPS/STAGES[/SAT_N[/MAX_REGS]] with PASS in "
                         f"{list(SWEEP)}")
            configs.setdefault(pass_, []).append(tuple(int(x) for x in cfg.split("/")))
    prof = sweep(progress, configs) if a.sweep else tma_pairs(progress) if a.tma else profile(a.full, progress)
    stem = (a.name, a.name) if a.sweep else ("tma", "tma") if a.tma else ("static", "table")
    write_report(a.out, f"{prof['date']}-static", f"{stem[0]}.json", f"{stem[1]}.md", prof, table(prof))
    return 0 if all(r["ok"] for r in prof["kernels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
