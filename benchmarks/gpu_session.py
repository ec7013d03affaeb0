"""One command for a lent GPU: build, validate, sanitize, profile; logs and results kept, summary last.

    python -m benchmarks.gpu_session                       # every stage, within --budget seconds
    python -m benchmarks.gpu_session --stages bench-core   # a later call goes on where time ran out
    python -m benchmarks.gpu_session --rehearse            # CPU rehearsal: the same steps at CPU sizes
    python -m benchmarks.gpu_session --profile headline --caps parity=120,bench-core=130 --sanitizers memcheck
                                                           # a short lease: the goals' shapes, stage caps

Stages (in this order; each in a subprocess with its own log, stopped at the budget's end):

  env          env.json: GPU, driver, CUDA, torch / triton / transformers / peers, nvcc, compute-sanitizer
  build        the CUDA extension in place (``setup.py build_ext --inplace``, this GPU's arch only), unless
               a carried ``deberta_fast/_C*.so`` built against the same torch already loads
  parity       ``benchmarks.gpu_parity``: triton and cuda vs the fp64 reference at L = 512, 2048, 8192
  diagnose     ``benchmarks.gpu_diagnose``: the Triton backward's run sums and content gradients against their fp64
               values, per bucket config and backward launch config (where the 2026-12-04 failures come from)
  tests        the kernel test files with the GPU tests enabled (``GPU_TEST_FILES``; the rest of the suite is
               CPU logic that CI runs), junit XML kept; on 4 pytest-xdist workers when xdist is installed (the
               image has it: the stage is bound by Triton's compiles, which run on the CPUs)
  sanitize     ``compute-sanitizer`` memcheck, racecheck, synccheck over ``benchmarks.sanitize_cases`` (both backends)
  bench-core   ``pytest benchmarks/bench_host.py``, then ``benchmarks/bench_core.py --profile full`` for bf16, then
               fp16 (each its own results folder): host overhead; the attention op against HF eager, SDPA, flex
  bench-model  ``pytest benchmarks/bench_model.py --profile full``: whole models, with the peers
  tests-all    (only when named) the whole test suite on the GPU machine
  tune         (only when named) ``benchmarks.tune_configs``: forward, dq and dK/dV timed under every candidate
               launch config, padded at L = 512 / 2048 / 8192 and packed, every inference forward first, with
               each config's difference from the shipped config's result; picks ``launch_config``'s values
  breakdown    (only when named) ``benchmarks.breakdown``: the op with and without each relative term, the Triton
               tables alone and prebuilt, the cuda backend, plain SDPA (where the time goes), L = 128 ... 8192
  profile-model (only when named) ``benchmarks.profile_model``: a v3-base MNLI-like training step under the
               profiler, HF eager against the patched model (step time, device busy time, launches, top operators)
  ncu          (only when named) ``benchmarks.ncu_kernels``: Nsight Compute's counters of the cuda / triton
               forwards and the cuda backward (issue slots, tensor pipe, the copies' L1 tag lookups, stalls)

Output folder: ``--out``, else ``$OUT`` (the device tool's folder that comes back), else
``benchmarks/results/<date>-<device>-session/``: ``logs/<stage>.log``, ``summary.json``, ``summary.md`` and
each stage's results.  Peer wheels carried in ``.whl/`` are installed first into ``<out>/../site`` (no index).
Exit status 1 when a stage failed (a stage skipped for lack of time or of a tool is not a failure: the
summary says which and why).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the cuda GPU tests run again with the kernels' wgmma variants (tests/test_cuda_sim.py's too): every dtype / head dim
#: / relative term, band and saturated tiles, masks, HF padding, uniform rows, rows without keys, dropout, packed
#: sequences, the backward's determinism and head groups, the precomputed saturated terms (packed, and padded at
#: D = 64: the simulator's wgmma pass is slow)
WGMMA_TESTS = ("variants or hf_padding or dropout_exact or dropout_decisions or rows_without or uniform or "
               "band_follows or sequence_without or deterministic or head_groups or wgmma or "
               "(precomputed and not d128)")
STAGES = ["env", "build", "parity", "diagnose", "tests", "sanitize", "bench-core", "bench-model"]
#: only when asked for: the whole suite; the launch-config timing; where the op's / a training step's time goes
EXTRA_STAGES = ["tests-all", "tune", "breakdown", "profile-model", "ncu"]
SANITIZER_TOOLS = ["memcheck", "racecheck", "synccheck"]
#: seconds each stage may take at most, all its commands together (the budget's end stops it earlier); a
#: command starts only with at least MIN_START seconds left
CAPS = {"env": 60, "build": 420, "parity": 300, "diagnose": 120, "tests": 480, "tests-all": 580, "sanitize": 480,
        "bench-core": 540, "bench-model": 540, "tune": 480, "breakdown": 240,
        "profile-model": 180, "ncu": 300}
MIN_START = 30
RESERVE = 25  # seconds kept: a timed-out command gets SIGINT and GRACE seconds to write its reports, then the summary
GRACE = 15
#: the test files that exercise the kernels (the rest of the suite is CPU logic, run by CI)
GPU_TEST_FILES = ["tests/test_triton_forward.py", "tests/test_triton_backward.py", "tests/test_triton_varlen.py",
                  "tests/test_triton_exactness.py", "tests/test_cuda_backend.py", "tests/test_cuda_varlen.py",
                  "tests/test_training.py", "tests/test_compile.py", "tests/test_compile_model.py",
                  "tests/test_cuda_graphs.py"]
#: the Triton forward's TMA loads (DEBERTA_FAST_TRITON_TMA=1, never run on a GPU before), in a command of their own
#: after the others (a device fault or a hang cannot take the shipped kernels' results with it): their tests against
#: the pointer loads, then the forward / packed tests against the float64 reference with the switch on
TMA_TEST_FILES = ["tests/test_triton_tma.py", "tests/test_triton_forward.py", "tests/test_triton_varlen.py"]


def _env_script(out: str) -> str:
    return f"""
import json, subprocess, shutil, torch
from benchmarks.envinfo import environment
env = dict(environment())
def cmd(*a):
    try:
        return subprocess.run(a, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:
        return f"unavailable: {{type(e).__name__}}: {{e}}"
env["nvidia_smi"] = cmd("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                        "--format=csv,noheader") if shutil.which("nvidia-smi") else "not found"
env["nvcc"] = (cmd("nvcc", "--version").splitlines() or ["?"])[-1] if shutil.which("nvcc") else "not found"
env["compute_sanitizer"] = (cmd("compute-sanitizer", "--version").splitlines() or ["?"])[-1] \\
    if shutil.which("compute-sanitizer") else "not found"
env["cuda_available"] = torch.cuda.is_available()
print(json.dumps(env, indent=1))
json.dump(env, open({os.path.join(out, "env.json")!r}, "w"), indent=1)
"""


#: candidates a ``headline`` bench-core leaves out: flex's torch.compile takes minutes per shape, and the torch
#: backend is the reference path (it materialises [B, H, L, L])
HEADLINE_CORE_SKIP = "not flex and not deberta_fast-torch and not cuda-wgmma and not triton-tma"
#: the cuda kernels' wgmma variants and the Triton forward's TMA loads (never run on a GPU before): parts of their own,
#: last, so that a fault of theirs cannot take the other candidates' rows with it
WGMMA_CORE = "cuda-wgmma and bfloat16"
TMA_CORE = "triton-tma and bfloat16"
HEADLINE_MODEL_SKIP = "not deberta_fast-torch and not disentangled-flash-torch"
#: the headline bench-model's rows run first, in a part of their own: the training step at L = 8192 (ours and the peers')
HEADLINE_MODEL_FIRST = "train and L8192"


def plan(stage: str, out: str, rehearse: bool, py: str, profile: str = "full",
         sanitizers: tuple = tuple(SANITIZER_TOOLS),
         seconds: float | None = None) -> list[tuple[str, list[str], dict]]:
    """(label, argv, extra env) of each command of a stage; ``seconds``: the time the stage has (its cap or the
    budget's end), which a command that paces itself (tune) is told."""
    if stage == "env":
        return [("env", [py, "-c", _env_script(out)], {})]
    if stage == "build":
        arch = ("import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else (8, 0); "
                "print(f'{c[0]}{c[1]}' + ('a' if c[0] == 9 else ''))")
        archs = subprocess.run([py, "-c", arch], capture_output=True, text=True, cwd=ROOT,
                               timeout=120).stdout.strip() or "80"
        check = ("from deberta_fast import _cuda_ext; r = _cuda_ext.unavailable_reason(); "
                 "print('cuda backend:', r or 'available'); raise SystemExit(1 if r else 0)")
        env = {"DEBERTA_FAST_BUILD_CUDA": "0" if rehearse else "1", "DEBERTA_FAST_CUDA_ARCHS": archs,
               "MAX_JOBS": str(os.cpu_count() or 4)}
        if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
            env["CUDA_HOME"] = "/usr/local/cuda"  # (torch may guess /usr/local from nvcc's symlink: no headers there)
        if not rehearse and subprocess.run([py, "-c", check], cwd=ROOT, capture_output=True,
                                           timeout=120).returncode == 0:
            # a deberta_fast/_C*.so carried along (built elsewhere against the same torch) loads: keep it
            return [("check-prebuilt", [py, "-c", check], {})]
        cmds = [("build_ext", [py, "setup.py", "-q", "build_ext", "--inplace"], env)]
        if not rehearse:
            cmds.append(("check", [py, "-c", check], {}))
        return cmds
    if stage == "diagnose":
        return [("diagnose", [py, "-m", "benchmarks.gpu_diagnose", "--out", os.path.join(out, "diagnose")]
                 + (["--rehearse"] if rehearse else []), {})]
    if stage == "parity":
        return [("parity", [py, "-m", "benchmarks.gpu_parity", "--out", os.path.join(out, "parity")]
                 + (["--rehearse"] if rehearse else []), {})]
    if stage == "tune":
        budget = round(max(30.0, (CAPS["tune"] if seconds is None else seconds) - 45))
        return [("tune", [py, "-m", "benchmarks.tune_configs", "--out", os.path.join(out, "tune"), "--budget",
                          str(budget)] + (["--rehearse"] if rehearse else []), {})]
    if stage in ("breakdown", "profile-model", "ncu"):
        module = {"ncu": "ncu_kernels"}.get(stage, stage.replace("-", "_"))
        return [(stage, [py, "-m", f"benchmarks.{module}", "--out", os.path.join(out, module)]
                 + (["--rehearse"] if rehearse else []), {})]
    if stage == "tests-all":
        return [("pytest-all", [py, "-m", "pytest", "tests", "-p", "no:cacheprovider", "-rfEs",
                                f"--junitxml={os.path.join(out, 'tests-all.xml')}"], {})]
    if stage == "tests":
        sel = ["tests/test_functional_api.py", "tests/test_cuda_backend.py", "-k", "not slow"] if rehearse \
            else GPU_TEST_FILES
        workers = [] if rehearse or importlib.util.find_spec("xdist") is None else ["-n", "4", "--dist", "loadfile"]
        cmds = [("pytest", [py, "-m", "pytest", *sel, *workers, "-p", "no:cacheprovider", "-rfEs",
                            f"--junitxml={os.path.join(out, 'tests.xml')}"], {})]
        if not rehearse:  # the cuda kernels' wgmma variants (sm_90a; elsewhere the tests check the mma.sync ones ran)
            cmds.append(("pytest-wgmma", [py, "-m", "pytest", "tests/test_cuda_backend.py", "tests/test_cuda_varlen.py",
                                          "-k", WGMMA_TESTS, *workers, "-p", "no:cacheprovider", "-rfEs",
                                          f"--junitxml={os.path.join(out, 'tests-wgmma.xml')}"],
                         {"DEBERTA_FAST_CUDA_WGMMA": "1"}))
            cmds.append(("pytest-tma", [py, "-m", "pytest", *TMA_TEST_FILES, *workers, "-p", "no:cacheprovider", "-rfEs",
                                        f"--junitxml={os.path.join(out, 'tests-tma.xml')}"],
                         {"DEBERTA_FAST_TRITON_TMA": "1"}))
        return cmds
    if stage == "sanitize":
        cmds = []
        for backend in ("cuda", "triton"):
            case = [py, "-m", "benchmarks.sanitize_cases", "--backend", backend]
            if rehearse:  # no sanitizer on a CPU: the workload itself, under the interpreter
                if backend == "triton":
                    cmds.append((f"cases-{backend}", case + ["--rehearse"], {}))
                continue
            for tool in sanitizers:
                # no caching allocator: an out-of-bounds access inside a pooled block would go unseen
                cmds.append((f"{tool}-{backend}", ["compute-sanitizer", "--tool", tool, "--error-exitcode", "3",
                                                   "--print-limit", "50", *case],
                             {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}))
        return cmds
    if stage in ("bench-core", "bench-model"):
        common = ["-q", "-p", "no:cacheprovider", "--profile", "quick" if rehearse else profile,
                  "--results-dir", os.path.join(out, "results")]
        if stage == "bench-model":
            file = "benchmarks/bench_model.py"
            if rehearse:
                parts = [("model", file, "inference and v3-base")]
            elif profile == "headline":  # issue 12's fwd+bwd goal rows first: the cap cut them in the second lease
                parts = [("model-train-8192", file, f"{HEADLINE_MODEL_SKIP} and {HEADLINE_MODEL_FIRST}"),
                         ("model", file, f"{HEADLINE_MODEL_SKIP} and not ({HEADLINE_MODEL_FIRST})")]
            else:
                parts = [("model", file, None)]
        else:  # each part saves its own results folder: what ran before a timeout is kept
            parts = [("host", "benchmarks/bench_host.py", None),
                     ("core-bf16", "benchmarks/bench_core.py",
                      "fwd" if rehearse else "bfloat16 and not cuda-wgmma and not triton-tma")]
            if profile == "headline" and not rehearse:  # bf16 only; the slow baselines left out
                parts[1] = ("core-bf16", "benchmarks/bench_core.py", HEADLINE_CORE_SKIP)
            elif not rehearse:
                parts.append(("core-fp16", "benchmarks/bench_core.py",
                              "float16 and not bfloat16 and not cuda-wgmma and not triton-tma"))
            if not rehearse:
                parts += [("core-wgmma", "benchmarks/bench_core.py", WGMMA_CORE),
                          ("core-tma", "benchmarks/bench_core.py", TMA_CORE)]
        return [(label, [py, "-m", "pytest", file, *common, *(["-k", sel] if sel else [])], {})
                for label, file, sel in parts]
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


def _sanitizer_problem(py: str, timeout: float) -> str | None:
    """Why compute-sanitizer cannot watch this machine's GPU (gVisor refuses the device), or None."""
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        return "compute-sanitizer is not on the PATH"
    try:
        p = subprocess.run([exe, "--tool", "memcheck", "--error-exitcode", "3", py, "-c",
                            "import torch; torch.ones(8, device='cuda').sum().item()"],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"compute-sanitizer's probe did not finish within {timeout:.0f} s"
    if p.returncode != 0:
        return f"compute-sanitizer's probe failed (status {p.returncode}): {(p.stdout + p.stderr).strip()[-300:]}"
    return None


def _install_wheels(out: str) -> tuple[str | None, str]:
    """Installs carried wheels (.whl/*.whl) with no index into a folder put on PYTHONPATH."""
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if not wheels:
        return None, "no wheels carried in .whl/"
    site = tempfile.mkdtemp(prefix="deberta_fast_site_")
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", site, *wheels], capture_output=True, text=True)
    names = ", ".join(os.path.basename(w).split("-")[0] for w in wheels)
    if p.returncode != 0:
        return None, f"installing the carried wheels failed: {p.stderr.strip()[-300:]}"
    return site, f"installed {names} into {site}"


def _run(argv, env, log, timeout) -> object:
    """Runs ``argv`` in its own process group with stdout/stderr to ``log``; at the timeout the whole group
    gets SIGINT (pytest then still writes its junit XML, benchmark results and summary), and SIGKILL after
    GRACE seconds.  Whatever is left of the group when the command ends (pytest-xdist workers, a sanitizer's
    target) is killed: it would load the CPUs and the GPU under the next stage's timings (suspected, not shown, in
    the second 2026-12-04 session: its MNLI-like rows, after a cut test stage, had 25-40 % IQRs).  Returns the
    exit status or "timeout"."""
    with open(log, "a") as f:
        p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGINT, GRACE), (signal.SIGKILL, 5)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return "timeout"
        finally:
            _kill_group(p.pid)


def _kill_group(pgid: int) -> None:
    """SIGKILL to what is left of a process group (nothing when it is gone)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_stage(stage, out, rehearse, py, env, deadline, profile="full", sanitizers=tuple(SANITIZER_TOOLS),
              caps=None) -> dict:
    t0 = time.time()
    stage_end = min(deadline - RESERVE, t0 + (caps or CAPS)[stage])
    res = {"stage": stage, "commands": []}
    if stage == "sanitize" and not rehearse:
        left = stage_end - time.time()
        why = _sanitizer_problem(py, min(120.0, left)) if left >= MIN_START else "no time left in the budget"
        if why:
            res.update(status="skipped", reason=why, seconds=round(time.time() - t0, 1))
            return res
    log_dir = os.path.join(out, "logs")
    status = "pass"
    for label, argv, extra in plan(stage, out, rehearse, py, profile, sanitizers, stage_end - time.time()):
        left = stage_end - time.time()
        if left < MIN_START:
            res["commands"].append({"label": label, "status": "skipped", "reason": "no time left in the budget"})
            status = "incomplete" if status == "pass" else status
            continue
        log = os.path.join(log_dir, f"{stage}-{label}.log" if label != stage else f"{stage}.log")
        c0 = time.time()
        with open(log, "w") as f:
            f.write(f"$ {' '.join(argv)}\n# extra env: {extra}; timeout {left:.0f} s\n")
        rc = _run(argv, {**env, **extra}, log, left)
        with open(log, errors="replace") as f:
            tail = f.read()[-1500:]
        ok = rc == 0
        if stage.startswith("tests") and rc == 5:
            ok = False  # nothing collected is a failure, never a pass
        cmd = {"label": label, "rc": rc, "seconds": round(time.time() - c0, 1), "log": os.path.relpath(log, out),
               "tail": tail.strip().splitlines()[-1:]}
        cmd["status"] = "pass" if ok else ("timeout" if rc == "timeout" else "FAIL")
        res["commands"].append(cmd)
        if not ok:
            status = "FAIL" if rc != "timeout" else "timeout"
        print(f"[{stage}] {label}: {cmd['status']} ({cmd['seconds']} s) {cmd['tail'][0] if cmd['tail'] else ''}",
              flush=True)
    res.update(status=status, seconds=round(time.time() - t0, 1))
    return res


def summary_md(summary: dict) -> str:
    lines = [f"# GPU session {summary['date']} on {summary['device']}", "",
             f"budget {summary['budget_s']} s, used {summary['seconds']} s; rehearsal: {summary['rehearse']}; "
             f"{summary['wheels']}", "", "| stage | status | seconds | commands |", "|---|---|---|---|"]
    for r in summary["stages"]:
        cmds = "; ".join(f"{c['label']}: {c['status']}" + (f" ({c.get('reason')})" if c.get("reason") else "")
                         for c in r["commands"]) or r.get("reason", "")
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']} | {cmds} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_session", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from: {', '.join(STAGES)}")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all stages (default 540)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rehearse", action="store_true", help="CPU rehearsal (interpreter, CPU sizes, no sanitizer)")
    ap.add_argument("--profile", default="full", choices=["full", "headline"],
                    help="benchmark profile of the bench stages on a GPU (default full)")
    ap.add_argument("--caps", default="", help="stage=seconds,... : overrides of the stages' time caps")
    ap.add_argument("--sanitizers", default=",".join(SANITIZER_TOOLS),
                    help=f"compute-sanitizer tools, comma-separated (default {','.join(SANITIZER_TOOLS)})")
    args = ap.parse_args(argv)
    caps = dict(CAPS)
    for item in filter(None, (c.strip() for c in args.caps.split(","))):
        name, _, secs = item.partition("=")
        if name not in caps or not secs.replace(".", "", 1).isdigit():
            ap.error(f"--caps: {item!r} is not stage=seconds with a stage from {', '.join(caps)}")
        caps[name] = float(secs)
    sanitizers = tuple(t.strip() for t in args.sanitizers.split(",") if t.strip())
    for t in sanitizers:
        if t not in SANITIZER_TOOLS:
            ap.error(f"--sanitizers: unknown tool {t!r}; tools: {', '.join(SANITIZER_TOOLS)}")
    t0 = time.time()
    deadline = t0 + args.budget
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not stages:
        ap.error(f"no stage given; stages: {', '.join(STAGES)}")
    for s in stages:
        if s not in STAGES + EXTRA_STAGES:
            ap.error(f"unknown stage {s!r}; stages: {', '.join(STAGES + EXTRA_STAGES)}")
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.rehearse:
        ap.error("no CUDA device here: run with --rehearse for the CPU rehearsal")
    device = torch.cuda.get_device_name() if gpu else "cpu"
    date = time.strftime("%Y-%m-%d")
    out = args.out or os.environ.get("OUT") or os.path.join(
        ROOT, "benchmarks", "results", f"{date}-{device.lower().replace(' ', '-')}-session")
    out = os.path.abspath(out)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    site, wheels = _install_wheels(out)
    if site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, ROOT, env.get("PYTHONPATH")]))
    else:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    if args.rehearse:
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("DEBERTA_FAST_BENCH_PROFILE", "quick")
    print(f"gpu_session: {device}; stages {', '.join(stages)}; budget {args.budget:.0f} s; out {out}; {wheels}",
          flush=True)
    env["DEBERTA_FAST_IN_GPU_SESSION"] = "1"  # (tests that would start a nested session skip)
    results = []
    for s in stages:  # the summary is rewritten after every stage: an overrun keeps what was done
        try:
            results.append(run_stage(s, out, args.rehearse, sys.executable, env, deadline, args.profile,
                                     sanitizers, caps))
        except Exception as e:  # noqa: BLE001 - a fault of the driver must not lose the other stages
            results.append({"stage": s, "status": "FAIL", "reason": f"driver error: {type(e).__name__}: {e}",
                            "commands": [], "seconds": 0.0})
        summary = {"date": date, "device": device, "rehearse": args.rehearse, "budget_s": args.budget,
                   "seconds": round(time.time() - t0, 1), "wheels": wheels, "stages": results}
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        md = summary_md(summary)
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(md)
    print("\n" + md)
    return 1 if any(r["status"] in ("FAIL", "timeout") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
