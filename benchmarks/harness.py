"""Timing, peak memory and parity helpers shared by every benchmark.

Timing: pytest-benchmark's ``pedantic`` mode, one call per round.  On CUDA every
timed call ends with ``torch.cuda.synchronize()`` and the untimed ``setup`` of each
round flushes L2 (writes a 256 MiB buffer) and synchronises, so a round measures
one cold-L2 call end to end (kernel time plus Python/launch overhead, as a user
sees it).  Warm-up rounds are excluded; the report uses the median of the rounds.

Peak memory: on CUDA, ``max_memory_allocated`` during one extra call minus
``memory_allocated`` before it (the incremental peak: inputs, weights and, for a
backward, the saved forward graph are live before and not counted).  On CPU, the
process RSS high-water mark (``VmHWM``) during one call minus RSS before it, after
resetting the high-water mark through ``/proc/self/clear_refs`` (Linux); this
counts every allocation of the process, torch's included, at page granularity.
Where the reset is not permitted the value is reported as unknown.  So that freed
tensors really leave the process (and new ones really enter it), the CPU runs set
glibc's ``M_MMAP_THRESHOLD`` to 128 KiB (:func:`cpu_memory_accounting`): every larger
block is its own mapping, returned to the OS on free.
"""
from __future__ import annotations

import gc
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch


class Flusher:
    """Evicts caches between rounds by writing a buffer larger than the last-level cache."""

    def __init__(self, device: str, nbytes: int):
        self.device = device
        self.buf = torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=device)

    def __call__(self):
        self.buf.fill_(1.0)
        sync(self.device)


def gpu_only_reason(backend: str) -> str:
    """Why a kernel backend is not timed on a CPU run."""
    if backend == "triton":
        return ("deberta_fast backend='triton' runs GPU kernels and this is a CPU run (on CPU they run only under "
                "the Triton interpreter, a correctness tool, not a timing target; `python -m deberta_fast` checks them)")
    return f"deberta_fast backend={backend!r} runs GPU kernels (CUDA C++) and this is a CPU run"


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def cpu_memory_accounting() -> bool:
    """Fix glibc's mmap threshold at 128 KiB (it otherwise grows up to 32 MiB after frees,
    keeping freed tensors in the heap, invisible to RSS).  Returns False where not glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024))
    except Exception:
        return False


def _read_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak_bytes(device: str, setup: Callable[[], None], fn: Callable[[], object]) -> tuple[int | None, str]:
    """Incremental peak bytes of one ``fn()`` call (after ``setup()``) and how it was measured."""
    setup()
    gc.collect()
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated() - base
        del res
        return int(peak), "cuda max_memory_allocated - memory_allocated before"
    if not _reset_rss_peak():
        res = fn()
        del res
        return None, "unknown (cannot reset /proc/self VmHWM)"
    base = _read_status_kib("VmRSS")
    res = fn()
    hwm = _read_status_kib("VmHWM")
    del res
    if base is None or hwm is None:
        return None, "unknown (/proc/self/status unreadable)"
    return max(0, (hwm - base) * 1024), "cpu RSS high-water delta (VmHWM after clear_refs)"


def choose_rounds(profile, one_call_s: float) -> int:
    if one_call_s <= 0:
        return profile.max_rounds
    n = int(profile.time_budget_s / one_call_s)
    return max(profile.min_rounds, min(profile.max_rounds, n))


def run_benchmark(benchmark, profile, fn: Callable[[], object], setup: Callable[[], None] | None = None,
                  *, flops: float | None = None, extra: dict | None = None):
    """Warm up, time ``fn`` with pytest-benchmark, measure peak memory, fill ``extra_info``."""
    device = profile.device
    flusher = _flusher(profile)

    def round_setup():
        if setup is not None:
            setup()
        flusher()

    if device == "cuda":
        def timed():
            r = fn()
            torch.cuda.synchronize()
            return r
    else:
        timed = fn

    # untimed calls: compilation, autotuning, allocator warm-up; also sizes the round count
    t0 = time.perf_counter()
    round_setup()
    t1 = time.perf_counter()
    timed()
    first = time.perf_counter() - t1
    for _ in range(max(0, profile.warmup_rounds - 1)):
        round_setup()
        t1 = time.perf_counter()
        timed()
        first = min(first, time.perf_counter() - t1)
    rounds = choose_rounds(profile, first)
    peak, how = measure_peak_bytes(device, round_setup, timed)

    benchmark.pedantic(timed, setup=round_setup, rounds=rounds, iterations=1, warmup_rounds=0)
    info = benchmark.extra_info
    info.update(extra or {})
    info["peak_mem_bytes"] = peak
    info["peak_mem_method"] = how
    info["rounds"] = rounds
    info["warmup_s"] = round(time.perf_counter() - t0, 3)
    if flops is not None:
        info["flops"] = flops
        med = benchmark.stats.stats.median if benchmark.stats else None
        if med:
            info["tflops"] = flops / med / 1e12


_FLUSHERS: dict = {}


def _flusher(profile) -> Flusher:
    key = (profile.device, profile.flush_bytes)
    if key not in _FLUSHERS:
        _FLUSHERS[key] = Flusher(profile.device, profile.flush_bytes)
    return _FLUSHERS[key]


# ----------------------------------------------------------------------------- parity

#: absolute floors of the parity tolerance (errors are max|x - ref| / max(1, max|ref|))
TOL_FLOOR = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}
#: a candidate passes if its error is within this factor of HF eager's error in the same dtype
HF_FACTOR = 4.0


def rel_max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().double()
    ref = ref.detach().double().to(x.device)
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch {list(x.shape)} vs reference {list(ref.shape)}")
    if ref.numel() == 0:
        return 0.0
    err = (x - ref).abs().max().item()
    if not math.isfinite(err):
        return float("inf")
    return err / max(1.0, ref.abs().max().item())


def tolerance(dtype: torch.dtype, hf_err: float | None) -> float:
    floor = TOL_FLOOR.get(dtype, 1e-2)
    if hf_err is None or not math.isfinite(hf_err):
        return floor
    return max(floor, HF_FACTOR * hf_err)


def parity_info(err: float, dtype, hf_err: float | None, what: str, baseline: bool = False) -> dict:
    """``baseline``: HF eager itself, whose error in this dtype sets the others' tolerance (``tolerance``): reported
    as it is ("baseline"), WRONG only when not finite (HF's bf16 forward+backward at L = 8192 is 0.11 off the fp64
    reference, measured on an H200, 2026-12-04)."""
    tol = tolerance(dtype, hf_err)
    if baseline:
        status = "baseline" if math.isfinite(err) else "WRONG"
    else:
        status = "pass" if math.isfinite(err) and err <= tol else "WRONG"
    return {"parity": status, "max_err": err, "tol": None if baseline else tol,
            "hf_eager_err": hf_err, "parity_of": what}


def strict() -> bool:
    return os.environ.get("DEBERTA_FAST_BENCH_STRICT", "0") not in ("", "0")


#: WRONG results of this session (filled by the benchmarks, printed by conftest, written to the JSON)
WRONG: list = []


def record_wrong(nodeid: str, info: dict):
    WRONG.append({"test": nodeid, **{k: info.get(k) for k in ("max_err", "tol", "parity_of")}})


class JsonTarget(os.PathLike):
    """``--benchmark-json``'s value as both pytest-benchmark generations use it: a path that 5.2+ opens
    (``open(self.json, "wb")``), and a context manager giving a binary file that older versions write to
    (``with self.json as fh``; their option was an ``argparse.FileType``), such as the GPU image's."""

    def __init__(self, path):
        self.path = Path(path)
        self._fh = None

    def __fspath__(self):
        return str(self.path)

    def __str__(self):
        return str(self.path)

    def __enter__(self):
        self._fh = open(self.path, "wb")
        return self._fh

    def __exit__(self, *exc):
        self._fh.close()
        self._fh = None
        return False


def median_ms_timer(rehearse: bool) -> Callable[[Callable[[], object]], float]:
    """``bench(fn) -> ms``: on a GPU the median of ``triton.testing.do_bench`` (warm-up 10 ms, 50 ms of reps); in a
    CPU rehearsal (interpreter) one call after a warm-up call, which times the code path, not the kernels."""
    if rehearse:
        def bench(fn):
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return bench
    from triton.testing import do_bench
    return lambda fn: float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def report_cli(argv, module: str, doc: str, run, table, stem: str, rehearse_help: str,
               interpreter: bool = True) -> dict | None:
    """The command line of a GPU report script (``--out``, ``--rehearse``): ``run(rehearse, progress)`` -> results,
    written as ``<stem>.json`` and ``table(results)`` as ``<stem>.md`` (default folder
    ``benchmarks/results/<date>-<stem>``).  ``interpreter``: a CPU rehearsal runs Triton kernels (needs
    ``TRITON_INTERPRET=1``).  Returns the results, or None when this machine cannot run it (said why)."""
    import argparse

    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help=f"default benchmarks/results/<date>-{stem}")
    ap.add_argument("--rehearse", action="store_true", help=rehearse_help)
    a = ap.parse_args(argv)
    if interpreter:
        if gpu_or_interpreter(a.rehearse, module) is None:
            return None
    elif not a.rehearse and not torch.cuda.is_available():
        ap.error("no GPU: use --rehearse on a CPU")
    res = run(a.rehearse, progress=lambda m: print(m, file=sys.stderr, flush=True))
    from benchmarks.static import write_report

    write_report(a.out, time.strftime("%Y-%m-%d") + "-" + stem.replace("_", "-"), f"{stem}.json", f"{stem}.md", res,
                 table(res))
    return res


def gpu_or_interpreter(rehearse: bool, prog: str) -> bool | None:
    """The GPU scripts' device rule: True on a GPU (unless ``rehearse``), False for a CPU rehearsal under the Triton
    interpreter, None (after saying how to run it) on a CPU without the interpreter."""
    if torch.cuda.is_available() and not rehearse:
        return True
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    print(f"{prog}: no GPU: run it with TRITON_INTERPRET=1 and --rehearse (CPU sizes)", file=sys.stderr)
    return None
