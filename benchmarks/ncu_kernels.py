"""The attention kernels' hardware counters on a GPU (Nsight Compute), beside the static profile's instruction counts.

    python -m benchmarks.ncu_kernels --out DIR                          # GPU with ncu: one ncu run per workload
    TRITON_INTERPRET=1 DEBERTA_FAST_CUDA_SIM=1 python -m benchmarks.ncu_kernels --out DIR --rehearse
                                         # CPU: each workload once at a tiny size (the simulator, the interpreter), no ncu
    python -m benchmarks.ncu_kernels --workload NAME                    # one workload (what ncu runs)

Why: the static profiles count SASS instructions per score element (issue 15's target: <= 10 on saturated forward
tiles), a proxy that matters where a kernel is bound by instruction issue; the counters say what binds each kernel
(issue slots, the tensor pipe, shared memory, the L1 tag stage of its tile copies: NOTES, "Tile copies from advanced
sources").  Per workload (bf16, H = 12, D = 64, DeBERTa-v3 buckets, 16,384 tokens, no mask): ``ncu
--profile-from-start off --clock-control none --set full`` over the second call (between
``torch.cuda.profiler.start`` / ``stop``: the first one compiled and warmed up), the report kept
(``<workload>.ncu-rep``, readable offline with ``ncu --import``) and its raw page as CSV; ``ncu_kernels.json`` /
``.md``: per kernel the counters of ``METRICS`` found there and the three largest warp-stall reasons.  Without ncu
(or where it cannot read the counters: gVisor) every workload is a row with the reason.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import time

import torch

#: name -> (backend, L, pass, extra env): the forward at a band-heavy and a saturated-heavy length, the wgmma
#: forward, the Triton forward beside them, and the cuda backward's kernels
WORKLOADS = {
    "cuda-fwd-2048": ("cuda", 2048, "fwd", {}),
    "cuda-fwd-8192": ("cuda", 8192, "fwd", {}),
    "cuda-wgmma-fwd-8192": ("cuda", 8192, "fwd", {"DEBERTA_FAST_CUDA_WGMMA": "1"}),
    "triton-fwd-8192": ("triton", 8192, "fwd", {}),
    "cuda-bwd-2048": ("cuda", 2048, "bwd", {}),
}
#: label -> the raw metric's name (Nsight Compute, sm_80 / sm_90; a name the report lacks is listed as missing)
METRICS = {
    "time_us": "gpu__time_duration.sum",
    "registers": "launch__registers_per_thread",
    "warps_active_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "issue_active_pct": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "instructions": "smsp__inst_executed.sum",
    "tensor_hmma_pct": "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "tensor_gmma_pct": "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
    "ldgsts_tag_requests": "l1tex__t_requests_pipe_lsu_mem_global_op_ldgsts.sum",
    "ldgsts_tag_sectors": "l1tex__t_sectors_pipe_lsu_mem_global_op_ldgsts.sum",
    "smem_wavefronts": "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum",
    "dram_pct": "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
}
STALL_PREFIX, STALL_SUFFIX = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"
BUCKETS = (256, 512)


def _shape(L: int, rehearse: bool) -> tuple[int, int, int, int]:
    return (1, 2, 40, 32) if rehearse else (16384 // L, 12, L, 64)


def workload(name: str, rehearse: bool = False) -> None:
    """Runs workload ``name`` twice, the second call between ``torch.cuda.profiler.start`` and ``stop`` on a GPU."""
    from benchmarks.breakdown import _inputs
    from deberta_fast import disentangled_attention

    backend, L, kind, _ = WORKLOADS[name]
    device = "cpu" if rehearse else "cuda"
    dtype = torch.float16 if rehearse else torch.bfloat16
    q, k, v, pk, pq = _inputs(*_shape(L, rehearse), device, dtype, grad=kind == "bwd")

    def fwd():
        return disentangled_attention(q, k, v, pk, pq, position_buckets=BUCKETS[0],
                                      max_relative_positions=BUCKETS[1], backend=backend)

    def call(profiled: bool):
        out = fwd() if kind == "bwd" else None
        do = torch.randn_like(out) if out is not None else None
        if profiled and device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        if kind == "bwd":
            torch.autograd.grad(out, (q, k, v, pk, pq), do)
        else:
            out = fwd()
        if device == "cuda":
            torch.cuda.synchronize()
            if profiled:
                torch.cuda.profiler.stop()
        if not torch.isfinite(out).all():
            raise RuntimeError(f"{name}: the output is not finite")

    call(False)
    call(True)


def parse_raw_csv(text: str) -> list[dict]:
    """Rows of ``ncu --import R --page raw --csv``: a header of metric names, a row of units, a row per kernel.
    Returns per kernel ``{"kernel", "metrics": {name: float or str}}``."""
    rows = list(csv.reader(io.StringIO(text)))
    head = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if head is None:
        return []
    names = rows[head]
    out = []
    for r in rows[head + 1:]:
        if len(r) != len(names):
            continue
        rec = dict(zip(names, r))
        if not rec.get("ID", "").strip().isdigit():  # the units row
            continue
        vals = {}
        for n, val in rec.items():
            try:
                vals[n] = float(val.replace(",", ""))
            except ValueError:
                vals[n] = val
        out.append({"kernel": rec["Kernel Name"], "metrics": vals})
    return out


def summarize(kernels: list[dict]) -> list[dict]:
    """Per kernel: METRICS' values (None where missing) and its three largest stall reasons."""
    res = []
    for kr in kernels:
        m = kr["metrics"]
        row = {"kernel": kr["kernel"][:120]}
        for label, metric in METRICS.items():
            val = m.get(metric)
            row[label] = val if isinstance(val, float) else None
        stalls = {n[len(STALL_PREFIX):-len(STALL_SUFFIX)]: v for n, v in m.items()
                  if n.startswith(STALL_PREFIX) and n.endswith(STALL_SUFFIX) and isinstance(v, float)}
        row["top_stalls"] = sorted(stalls.items(), key=lambda t: -t[1])[:3]
        res.append(row)
    return res


def _ncu() -> str | None:
    for cand in (shutil.which("ncu"), "/usr/local/cuda/bin/ncu"):
        if cand and os.path.exists(cand):
            return cand
    return None


def run(rehearse: bool, out: str, progress=print) -> dict:
    from benchmarks.envinfo import environment

    res = {"env": environment(), "date": time.strftime("%Y-%m-%d"), "rows": []}
    ncu = None if rehearse else _ncu()
    for name, (backend, L, kind, extra) in WORKLOADS.items():
        row = {"workload": name, "backend": backend, "L": L, "pass": kind, "shape": list(_shape(L, rehearse))}
        t0 = time.time()
        try:
            if rehearse:  # the workload's code path at CPU sizes (no counters)
                old = {key: os.environ.get(key) for key in extra}
                os.environ.update(extra)
                try:
                    workload(name, rehearse=True)
                finally:
                    for key, val in old.items():
                        os.environ.pop(key) if val is None else os.environ.__setitem__(key, val)
                row["kernels"] = []
            elif ncu is None:
                row["error"] = "ncu not found"
            else:
                rep = os.path.join(out, name)
                cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--set", "full",
                       "--target-processes", "all", "-o", rep, "--force-overwrite",
                       sys.executable, "-m", "benchmarks.ncu_kernels", "--workload", name]
                p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **extra}, timeout=600)
                with open(rep + ".log", "w") as f:
                    f.write(p.stdout + p.stderr)
                if p.returncode != 0 or not os.path.exists(rep + ".ncu-rep"):
                    raise RuntimeError(f"ncu exited {p.returncode}: {(p.stdout + p.stderr).strip()[-400:]}")
                raw = subprocess.run([ncu, "--import", rep + ".ncu-rep", "--page", "raw", "--csv"],
                                     capture_output=True, text=True, timeout=300).stdout
                with open(rep + ".csv", "w") as f:
                    f.write(raw)
                row["kernels"] = summarize(parse_raw_csv(raw))
                if not row["kernels"]:
                    row["error"] = "ncu profiled no kernel (see the .log)"
        except Exception as e:  # noqa: BLE001 (a row per workload, whatever failed)
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        row["seconds"] = round(time.time() - t0, 1)
        progress(f"ncu_kernels: {name}: {row.get('error', 'ok')} ({row['seconds']} s)")
        res["rows"].append(row)
    return res


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def table(res: dict) -> str:
    lines = [f"# Kernel counters (Nsight Compute, {res['date']}; {res['env'].get('device', '?')})", "",
             "Per kernel of each workload's second call (`--set full`, clocks left alone); the raw pages are the "
             "`.csv` files beside this one.  " + ", ".join(f"{k} = `{v}`" for k, v in METRICS.items()) + ".", "",
             "| workload | kernel | " + " | ".join(METRICS) + " | top stalls (per issue) |",
             "|---|---|" + "---|" * len(METRICS) + "---|"]
    for r in res["rows"]:
        if r.get("error"):
            lines.append(f"| {r['workload']} | {r['error']} |" + " |" * (len(METRICS) + 1))
            continue
        for kr in r["kernels"]:
            stalls = ", ".join(f"{n} {v:.2f}" for n, v in kr["top_stalls"])
            lines.append(f"| {r['workload']} | {kr['kernel'][:60]} | "
                         + " | ".join(_fmt(kr[k]) for k in METRICS) + f" | {stalls} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--workload"] and len(argv) == 2:
        workload(argv[1])
        return 0
    import argparse

    from benchmarks.static import write_report

    ap = argparse.ArgumentParser(prog="python -m benchmarks.ncu_kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="default benchmarks/results/<date>-ncu-kernels")
    ap.add_argument("--rehearse", action="store_true", help="CPU: each workload once at a tiny size, no ncu")
    a = ap.parse_args(argv)
    if not a.rehearse and not torch.cuda.is_available():
        ap.error("no GPU: use --rehearse on a CPU (with TRITON_INTERPRET=1 and DEBERTA_FAST_CUDA_SIM=1)")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                time.strftime("%Y-%m-%d") + "-ncu-kernels")
    os.makedirs(out, exist_ok=True)
    res = run(a.rehearse, out, progress=lambda m: print(m, file=sys.stderr, flush=True))
    write_report(out, "", "ncu_kernels.json", "ncu_kernels.md", res, table(res))
    return 1 if all(r.get("error") for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
