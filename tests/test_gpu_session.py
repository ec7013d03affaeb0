"""The GPU session script (``python -m benchmarks.gpu_session``) on CPU: its rehearsal mode runs, it writes its
summary, and every stage has the commands a GPU run needs; the parity script's CPU rehearsal passes."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


needs_no_session = pytest.mark.skipif(os.environ.get("DEBERTA_FAST_IN_GPU_SESSION") == "1",
                                      reason="inside a GPU session: no nested session")


def _session(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("OUT", None)
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_session", "--rehearse", "--out", str(tmp_path), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@needs_no_session
def test_rehearsal_writes_env_logs_and_summary(tmp_path):
    p = _session(tmp_path, "--stages", "env,build", "--budget", "600")
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["env", "build"]
    assert all(s["status"] == "pass" for s in summary["stages"]), summary
    env = json.loads((tmp_path / "env.json").read_text())
    import torch

    assert env["torch"] and "compute_sanitizer" in env and env["cuda_available"] is torch.cuda.is_available()
    assert (tmp_path / "logs" / "env.log").exists()
    assert p.stdout.rstrip().endswith("|"), "the summary table is printed last"


@needs_no_session
def test_a_stage_without_time_is_skipped_not_failed(tmp_path):
    p = _session(tmp_path, "--stages", "parity", "--budget", "1")
    assert p.returncode == 0, p.stdout + p.stderr
    stage = json.loads((tmp_path / "summary.json").read_text())["stages"][0]
    assert stage["status"] == "incomplete" and stage["commands"][0]["reason"] == "no time left in the budget"


@needs_no_session
def test_unknown_stage_and_gpu_mode_without_gpu_are_refused(tmp_path):
    import torch

    p = _session(tmp_path, "--stages", "nope")
    assert p.returncode == 2 and "unknown stage 'nope'" in p.stderr
    if torch.cuda.is_available():
        return  # (with a GPU the GPU mode would run a whole session, this test suite included)
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_session", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--rehearse" in p.stderr


def test_gpu_plan_covers_every_deliverable(tmp_path):
    from benchmarks import gpu_session as gs

    labels = {s: [c[0] for c in gs.plan(s, str(tmp_path), False, sys.executable)] for s in gs.STAGES if s != "build"}
    assert labels["sanitize"] == [f"{t}-{b}" for b in ("cuda", "triton") for t in ("memcheck", "racecheck", "synccheck")]
    assert labels["bench-core"] == ["host", "core-bf16", "core-fp16", "core-wgmma", "core-tma"]
    assert labels["bench-model"] == ["model"]
    argv = dict((c[0], c[1]) for s in ("parity", "tests", "bench-core", "bench-model")
                for c in gs.plan(s, str(tmp_path), False, sys.executable))
    assert "--rehearse" not in argv["parity"]
    (label, diag, _), = gs.plan("diagnose", str(tmp_path), False, sys.executable)
    assert diag[1:3] == ["-m", "benchmarks.gpu_diagnose"] and "--rehearse" not in diag
    assert gs.STAGES.index("diagnose") == gs.STAGES.index("parity") + 1
    assert all(os.path.exists(os.path.join(ROOT, f)) for f in gs.GPU_TEST_FILES)
    assert argv["pytest"][3:3 + len(gs.GPU_TEST_FILES)] == gs.GPU_TEST_FILES
    (_, wg, wg_env), = [c for c in gs.plan("tests", str(tmp_path), False, sys.executable) if c[0] == "pytest-wgmma"]
    assert wg_env == {"DEBERTA_FAST_CUDA_WGMMA": "1"} and wg[wg.index("-k") + 1] == gs.WGMMA_TESTS
    (_, tma, tma_env), = [c for c in gs.plan("tests", str(tmp_path), False, sys.executable) if c[0] == "pytest-tma"]
    assert tma_env == {"DEBERTA_FAST_TRITON_TMA": "1"} and tma[3:3 + len(gs.TMA_TEST_FILES)] == gs.TMA_TEST_FILES
    assert all(os.path.exists(os.path.join(ROOT, f)) for f in gs.TMA_TEST_FILES)
    assert [c[0] for c in gs.plan("tests", str(tmp_path), False, sys.executable)][-1] == "pytest-tma"
    assert all("full" in argv[k] for k in ("host", "core-bf16", "core-fp16", "core-wgmma", "core-tma", "model"))
    assert argv["core-wgmma"][-2:] == ["-k", gs.WGMMA_CORE] and "cuda-wgmma" in argv["core-fp16"][-1]
    assert argv["core-tma"][-2:] == ["-k", gs.TMA_CORE]
    assert all("not triton-tma" in argv[k][-1] for k in ("core-bf16", "core-fp16"))
    sanitize = gs.plan("sanitize", str(tmp_path), False, sys.executable)
    assert all(extra == {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} for _, _, extra in sanitize)
    (_, ncu, _), = gs.plan("ncu", str(tmp_path), False, sys.executable)  # (only when named)
    assert "ncu" in gs.EXTRA_STAGES and ncu[1:3] == ["-m", "benchmarks.ncu_kernels"] and "--rehearse" not in ncu


def test_gpu_plan_headline_profile(tmp_path):
    """A short lease: the bench stages under the headline profile (bf16 only, slow baselines left out), the
    sanitizer tools asked for; the profile itself holds the issue goals' shapes."""
    from benchmarks import gpu_session as gs
    from benchmarks.profiles import headline_profile

    core = dict((c[0], c[1]) for c in gs.plan("bench-core", str(tmp_path), False, sys.executable, "headline"))
    assert list(core) == ["host", "core-bf16", "core-wgmma", "core-tma"]
    assert core["core-bf16"][-2:] == ["-k", gs.HEADLINE_CORE_SKIP] and "headline" in core["core-bf16"]
    (first, long, _), (rest, model, _) = gs.plan("bench-model", str(tmp_path), False, sys.executable, "headline")
    assert (first, rest) == ("model-train-8192", "model") and "headline" in model
    assert long[-1] == f"{gs.HEADLINE_MODEL_SKIP} and train and L8192"
    assert model[-1] == f"{gs.HEADLINE_MODEL_SKIP} and not (train and L8192)"
    san = gs.plan("sanitize", str(tmp_path), False, sys.executable, "headline", ("memcheck",))
    assert [c[0] for c in san] == ["memcheck-cuda", "memcheck-triton"]
    prof = headline_profile("cuda")
    assert [b.padded_len for b in prof.core_batches] == [512, 2048, 8192]
    assert all(b.tokens == 16384 for b in prof.core_batches) and prof.dtypes == (torch.bfloat16,)
    assert all(8192 in [b.padded_len for b in prof.model_batches[m]] for m in ("inference", "train"))


def test_gpu_session_rejects_bad_caps_and_tools(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    for args, word in ((["--caps", "parity=x"], "--caps"), (["--caps", "nope=3"], "--caps"),
                       (["--sanitizers", "initcheck"], "--sanitizers")):
        p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_session", "--rehearse", "--out", str(tmp_path),
                            *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and word in p.stderr, (args, p.stderr[-300:])


@needs_no_session
def test_a_timed_out_command_gets_sigint_first(tmp_path):
    """pytest, interrupted, still writes its reports: the session sends SIGINT to the command's process group,
    and SIGKILL only after a grace period."""
    from benchmarks import gpu_session as gs

    log = tmp_path / "log"
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGINT, lambda *a: (print('got SIGINT', flush=True), sys.exit(7)))\n"
              "time.sleep(60)\n")
    t0 = __import__("time").time()
    rc = gs._run([sys.executable, "-c", script], dict(os.environ), str(log), timeout=2)
    assert rc == "timeout" and "got SIGINT" in log.read_text() and __import__("time").time() - t0 < 30


@needs_no_session
def test_a_commands_leftover_processes_are_killed(tmp_path):
    """A child the command leaves behind (a pytest-xdist worker, a sanitizer's target) does not outlive it."""
    from benchmarks import gpu_session as gs

    pid_file = tmp_path / "child"
    script = ("import subprocess, sys\n"
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(c.pid))\n")
    assert gs._run([sys.executable, "-c", script], dict(os.environ), str(tmp_path / "log"), timeout=60) == 0
    child = int(pid_file.read_text())
    for _ in range(100):  # SIGKILL is delivered asynchronously; the orphan is reaped by init
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                break
        __import__("time").sleep(0.05)
    else:
        raise AssertionError("the command's child survived it")


def test_parity_table_lists_every_error():
    from benchmarks.gpu_parity import table

    row = dict(backend="triton", dtype="bfloat16", B=1, H=12, L=2048, D=64, status="pass", fwd_s=0.1, bwd_s=0.2,
               errors={n: 1e-3 for n in ("out", "dq", "dk", "dv", "dpos_key", "dpos_query")},
               tolerances={n: 4e-3 for n in ("out", "dq", "dk", "dv", "dpos_key", "dpos_query")})
    md = table([row, dict(backend="cuda", dtype="float16", B=1, H=12, L=2048, D=64, status="refused",
                          reason="the CUDA extension is not built")])
    assert md.count("1.0e-03") == 6 and "0.25 (out)" in md and "not built" in md


@pytest.mark.slow
def test_parity_rehearsal_passes(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_parity", "--rehearse", "--out", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads((tmp_path / "parity.json").read_text())["rows"]
    assert rows and all(r["status"] == "pass" for r in rows)


def test_sanitize_workload_walks_every_variant_and_reports_refusals(capsys):
    """The sanitizer workload's loops on CPU: the cuda backend cannot take CPU tensors, so every variant (padded
    and packed) must come back refused with its reason, none silently dropped or failed."""
    from benchmarks import sanitize_cases

    assert sanitize_cases.main(["--backend", "cuda", "--rehearse"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith(("padded", "varlen"))]
    assert len(lines) >= 10 and all(": refused: " in ln for ln in lines), out[-2000:]
    assert any(ln.startswith("varlen") for ln in lines)
    assert "0 ran" in out and "0 failed" in out
    # the widest coverage first (a cut sanitizer run): v3 band tiles, tiny buckets' saturated tiles, packed calls
    at = {key: [n for n, ln in enumerate(lines) if key in ln] for key in ("(256, 512)", "(4, 8)", "varlen")}
    assert max(at["(256, 512)"]) < min(at["(4, 8)"]) < min(at["varlen"]), lines


def _walk_variants(requested, **flags):
    """The sanitizer workload's variants (one shape, two masks, two dropout rates) with stand-ins recording
    ``(requested(), kind, args)`` per run: ``(names, seen)``."""
    from benchmarks import sanitize_cases

    seen = []
    padded = lambda *a: seen.append((requested(), "padded", a)) or "ok"  # noqa: E731
    packed = lambda *a: seen.append((requested(), "packed", a)) or "ok"  # noqa: E731
    variants = sanitize_cases._variants([(2, 37, 37)], ["none", "key"], [0.0, 0.1], False, padded, packed, [3, 4],
                                        **flags)
    for _, run in variants:
        run()
    return [n for n, _ in variants], seen


def test_sanitize_workload_has_the_wgmma_variants():
    """On an sm_90 device the cuda workload adds the kernels' wgmma variants (padded with both bucket kinds and each
    dropout rate, packed), after the v3 band tiles; they run with the switch on and restore it."""
    import os

    from deberta_fast import _cuda_ext

    before = os.environ.get(_cuda_ext.WGMMA_ENV)
    names, seen = _walk_variants(_cuda_ext.wgmma_requested, wgmma=True)
    wg = [n for n in names if n.startswith("wgmma")]
    assert len(wg) == 6 and names.index(wg[0]) > names.index(next(n for n in names if "(256, 512)" in n))
    assert sum(on for on, _, _ in seen) == 6 and os.environ.get(_cuda_ext.WGMMA_ENV) == before


def test_sanitize_workload_has_the_tma_variants():
    """The triton workload (its experiments' flag) adds the forward's TMA variants (padded with both bucket kinds and
    each dropout rate, Lq != Lk, packed with keys of the queries' lengths and of others), run with the switch on,
    which they restore."""
    import os

    pytest.importorskip("triton")
    from deberta_fast._kernels import triton_attention_launch as launch

    before = os.environ.get(launch.TMA_ENV)
    names, seen = _walk_variants(launch.tma_requested, skew=True)
    assert len([n for n in names if n.startswith("tma")]) == 10
    assert sum(on for on, _, _ in seen) == 10 and os.environ.get(launch.TMA_ENV) == before
    assert {a[2] and tuple(a[2]) for on, kind, a in seen if on and kind == "packed"} == {None, (5, 70, 2, 33)}


def test_sanitizer_probe_says_why_it_cannot_run(monkeypatch):
    from benchmarks import gpu_session as gs

    monkeypatch.setattr(gs.shutil, "which", lambda name: None)
    assert gs._sanitizer_problem(sys.executable, 5.0) == "compute-sanitizer is not on the PATH"


def test_tune_stage_is_extra_and_has_its_budget(tmp_path):
    from benchmarks import gpu_session as gs

    assert "tune" in gs.EXTRA_STAGES and "tune" not in gs.STAGES
    (label, argv, _), = gs.plan("tune", str(tmp_path), False, sys.executable)
    assert argv[2:3] == ["benchmarks.tune_configs"] and "--rehearse" not in argv
    assert float(argv[argv.index("--budget") + 1]) < gs.CAPS["tune"]


def _rehearse(module: str, out, *args, **extra_env) -> subprocess.CompletedProcess:
    """``python -m benchmarks.<module> --rehearse --out <out>`` under the Triton interpreter; asserts exit 0."""
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1", **extra_env)
    p = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--rehearse", "--out", str(out), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-800:] + p.stderr[-2000:]
    return p


@pytest.mark.slow
def test_tune_rehearsal_runs_every_row_kind(tmp_path):
    """The launch-config timing on CPU (interpreter, tiny sizes): every row kind, a result per config, the
    non-shipped configs' results equal to the shipped config's."""
    _rehearse("tune_configs", tmp_path)
    rows = json.loads((tmp_path / "tune.json").read_text())["rows"]
    assert {r["what"] for r in rows} == {"fwd", "fwd+dropout", "dq", "dkdv", "dkdv (no dropout)"}
    assert {r["case"] for r in rows} == {"padded", "packed"}
    assert [(r["case"], r["what"]) for r in rows[-2:]] == [("padded", "dkdv (no dropout)")] * 2  # last in the budget
    assert all("ms" in r for r in rows)
    assert [r["what"] for r in rows[:4]] == ["fwd"] * 4  # every case's inference forward first
    assert all(r["config"].startswith("shipped 32/32/1/1") for r in rows if r["config"].startswith("shipped"))
    diffs = [r["max_diff_vs_shipped"] for r in rows if not r["config"].startswith("shipped")]
    assert diffs and all(d <= 1e-4 for d in diffs)
    assert "| dkdv |" in (tmp_path / "tune.md").read_text()


def _simulator_builds() -> bool:
    """Whether the CUDA simulator builds here (the cuda rows of a rehearsal run in it then)."""
    from deberta_fast import _cuda_ext

    try:
        _cuda_ext.simulator()
        return True
    except RuntimeError:
        return False


@pytest.mark.slow  # (86 - 118 s in the README test command on the 2-core machine, 2026-12-07)
def test_breakdown_rehearsal(tmp_path):
    """The op breakdown on CPU (interpreter, tiny sizes, fp16): a time for every variant (the cuda rows in the CUDA
    simulator where it builds, else refused with a reason), the prebuilt-tables forwards (slot and distance tables)
    and the forward with an all-ones key mask bitwise equal to the plain ones."""
    sim = _simulator_builds()
    _rehearse("breakdown", tmp_path, **({"DEBERTA_FAST_CUDA_SIM": "1"} if sim else {}))
    rows = json.loads((tmp_path / "breakdown.json").read_text())["rows"]
    assert all("ms" in r for r in rows if sim or not r["variant"].startswith("cuda")), rows
    assert all("ms" in r or "error" in r for r in rows)
    assert {(r["pass_"], r["variant"]) for r in rows} >= {("fwd", "sdpa"), ("fwd", "triton both"),
                                                         ("fwd", "triton tables"), ("fwd+bwd", "triton both"),
                                                         ("fwd+bwd", "triton both, 16-bit tables"),
                                                         ("fwd", "triton both, distance tables"),
                                                         ("fwd", "triton both, distance tables prebuilt"),
                                                         ("fwd", "triton both, distance tables, 16-bit"),
                                                         ("fwd+bwd", "triton both, distance tables"),
                                                         ("fwd+bwd", "triton both, distance tables, 16-bit"),
                                                         ("fwd+bwd", "triton both, relative share on host"),
                                                         ("fwd+bwd", "triton both, dropout 0.1"),
                                                         ("fwd+bwd", "triton both, dropout 0.1, Philox in dK/dV"),
                                                         ("fwd+bwd", "triton both, TMA")}
    if sim:  # the wgmma forward's A/B of its overlap (DEBERTA_FAST_CUDA_WGMMA=1 / serial) runs in the simulator, and
        # the A/B of the saturated terms (DEBERTA_FAST_CUDA_SAT_TERMS)
        sat = {"cuda both, saturated terms precomputed", "cuda both, saturated terms per tile"}
        assert {"cuda both, wgmma", "cuda both, wgmma serial", *sat} <= {r["variant"] for r in rows
                                                                         if r["pass_"] == "fwd" and "ms" in r}, rows
        assert sat <= {r["variant"] for r in rows if r["pass_"] == "fwd+bwd" and "ms" in r}, rows
    assert {r["variant"]: r["same_output"] for r in rows if "same_output" in r} == {
        "triton both, tables prebuilt": True, "triton both, key mask (all ones)": True,
        "triton both, distance tables prebuilt": True, "triton both, TMA": True,
        "triton both, key mask (all ones), TMA": True}
    md = (tmp_path / "breakdown.md").read_text()
    assert "| fwd | triton none |" in md
    # the forward + backward of triton / cuda "both" split per operator under the profiler (host time on CPU)
    splits = json.loads((tmp_path / "breakdown.json").read_text())["kernels"]
    assert [(r["L"], r["variant"]) for r in splits] == [(40, "triton both"), (40, "cuda both")]
    assert all(r["top_host"] and r["wall_ms"] > 0 for r in splits if sim or r["variant"] == "triton both"), splits
    assert "## L=40, triton both, forward + backward: host (self CPU) time" in md
    from benchmarks.breakdown import table
    md = table({"rehearse": False, "dtype": "torch.bfloat16", "buckets": [256, 512], "rows": [
        dict(L=512, pass_="fwd", variant="sdpa", ms=0.1, peak_mib=12.0),
        dict(L=512, pass_="fwd", variant="triton both", ms=0.5, peak_mib=794.0),
        dict(L=512, pass_="fwd", variant="triton both, tables prebuilt", ms=0.4, same_output=False)]})
    assert "| fwd | triton both | 0.5 (5.0x), 794 MiB |" in md and "DIFFERENT OUTPUT" in md


def test_profile_model_rehearsal(tmp_path):
    """The training-step profile on CPU (2-layer model, torch backend): a step time per candidate and the host
    operators; no device columns without a device."""
    _rehearse("profile_model", tmp_path)
    res = json.loads((tmp_path / "profile_model.json").read_text())
    assert [r["candidate"] for r in res["rows"]] == ["hf-eager", "deberta_fast-torch"]
    assert all(r["wall_ms"] > 0 and r["top_host"] and r["device_busy_ms"] is None for r in res["rows"])
    md = (tmp_path / "profile_model.md").read_text()
    assert "| hf-eager |" in md and "top operators by host" in md


def test_gpu_diagnose_rehearsal_and_its_check(tmp_path):
    """The diagnosis runs on CPU under the interpreter (every piece exact there), and its comparison flags a wrong
    piece with the worst locations."""
    from benchmarks.gpu_diagnose import compare

    _rehearse("gpu_diagnose", tmp_path, "--cases", "tiny-17")
    rows = json.load(open(tmp_path / "diagnose.json"))["rows"]
    assert len(rows) == 3 and all(r["ok"] for r in rows)
    assert {"csum", "psum", "dq_content", "dk_content", "dq"} <= set(rows[0]["pieces"])
    want = {"csum": torch.randn(1, 2, 5, 4, dtype=torch.float64)}
    bad = {"csum": want["csum"].float().clone()}
    bad["csum"][0, 1, 3, 2] += 0.5
    res = compare(bad, want)["csum"]
    assert not res["ok"] and res["worst"][0]["at"] == [0, 1, 3, 2]
    assert compare({"csum": want["csum"].float()}, want)["csum"]["ok"]


def test_ncu_raw_page_parsed_per_kernel():
    """``benchmarks.ncu_kernels`` reads ncu's raw page (a header of metric names, a row of units, a row per kernel;
    numbers with thousands separators): METRICS' values per kernel, a missing one None, the largest stalls first."""
    from benchmarks import ncu_kernels as nk

    raw = ('==PROF== Disconnected\n'
           '"ID","Kernel Name","gpu__time_duration.sum","launch__registers_per_thread",'
           '"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",'
           '"smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio",'
           '"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"\n'
           '"","","usecond","register/thread","ratio","ratio","ratio"\n'
           '"0","void dfa::dfa_fwd_kernel<__half, 64, false, false>(dfa::Params)","1,234.5","139","0.5","1.25","0.75"\n'
           '"1","band_to_slots","7.5","32","n/a","0.1","0.2"\n')
    ks = nk.parse_raw_csv(raw)
    assert [k["kernel"][:19] for k in ks] == ["void dfa::dfa_fwd_k", "band_to_slots"]
    rows = nk.summarize(ks)
    assert rows[0]["time_us"] == 1234.5 and rows[0]["registers"] == 139.0 and rows[0]["issue_active_pct"] is None
    assert rows[0]["top_stalls"] == [("math_pipe_throttle", 1.25), ("wait", 0.75), ("barrier", 0.5)]
    assert rows[1]["top_stalls"] == [("wait", 0.2), ("math_pipe_throttle", 0.1)]  # "n/a" is not a number
    md = nk.table({"date": "d", "env": {"device": "GPU"}, "rows": [
        {"workload": "cuda-fwd-2048", "kernels": rows}, {"workload": "triton-fwd-8192", "error": "ncu not found"}]})
    assert "| cuda-fwd-2048 | void dfa::dfa_fwd_kernel" in md and "| 1234 | 139 |" in md
    assert "| triton-fwd-8192 | ncu not found |" in md
    assert nk.parse_raw_csv("no report\n") == []


@pytest.mark.slow
def test_ncu_kernels_rehearsal(tmp_path):
    """The counters' workloads on CPU: each runs its op at a tiny size (cuda in the simulator where it builds), no
    ncu; a row per workload."""
    from benchmarks.ncu_kernels import WORKLOADS
    sim = _simulator_builds()
    _rehearse("ncu_kernels", tmp_path, **({"DEBERTA_FAST_CUDA_SIM": "1"} if sim else {}))
    rows = json.loads((tmp_path / "ncu_kernels.json").read_text())["rows"]
    assert [r["workload"] for r in rows] == list(WORKLOADS)
    assert all("error" not in r for r in rows if sim or r["backend"] != "cuda"), rows
