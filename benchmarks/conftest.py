"""pytest-benchmark configuration of the deberta_fast benchmark suite.

    pytest benchmarks/ [--profile quick|full|auto] [--benchmark-json=out.json] [--no-results]

At the end of a session the results are written to ``benchmarks/results/<date>-<device>-<profile>/``
(``results.json``, ``env.json``, ``table.md`` with parity and ratios, plots when matplotlib is
installed; by :mod:`benchmarks.report`; ``-2``, ``-3`` ... are appended instead of overwriting) and
the terminal summary lists each candidate's parity and × HF eager.  Opt out with ``--no-results`` or
``DEBERTA_FAST_BENCH_SAVE=0`` (CI smoke runs); ``--results-dir DIR`` (or
``DEBERTA_FAST_BENCH_RESULTS``) writes elsewhere.

Profiles: see benchmarks/profiles.py.  Skips (with their reasons), the profile, the pytest
arguments and the software/hardware versions are written into the JSON under ``"deberta_fast"``.
"""
from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

# never benchmark the Triton interpreter (tests/conftest.py sets it for CPU *tests*)
if os.environ.get("TRITON_INTERPRET") == "1":
    os.environ["TRITON_INTERPRET"] = "0"

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import pytest_benchmark  # noqa: E402,F401
except ImportError as _e:  # name the fix, not pytest's "unrecognized arguments: --benchmark-sort"
    raise pytest.UsageError(
        f"pytest benchmarks/ needs the pytest-benchmark plugin, which is not importable ({_e}): "
        "pip install -e '.[bench]' (pytest-benchmark, matplotlib for the plots)") from None

from benchmarks import profiles as _profiles  # noqa: E402
from benchmarks.envinfo import environment  # noqa: E402
from benchmarks.harness import WRONG as _WRONG  # noqa: E402
from benchmarks.harness import JsonTarget  # noqa: E402

_SKIPS: list = []


_RESULTS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def pytest_addoption(parser):
    parser.addoption("--profile", action="store", default=None,
                     help="benchmark profile: quick (CPU smoke), full (GPU) or auto "
                          "(default; env DEBERTA_FAST_BENCH_PROFILE)")
    parser.addoption("--no-results", action="store_true", default=False,
                     help="do not write benchmarks/results/<date>-<device>-<profile>/ at the end "
                          "(same as DEBERTA_FAST_BENCH_SAVE=0)")
    parser.addoption("--results-dir", action="store", default=None,
                     help="root folder of the results (default benchmarks/results; env DEBERTA_FAST_BENCH_RESULTS)")


def _save_enabled(config) -> bool:
    if config.getoption("--no-results"):
        return False
    return os.environ.get("DEBERTA_FAST_BENCH_SAVE", "1").strip().lower() not in ("0", "false", "no", "off", "")


def _results_root(config) -> str:
    return (config.getoption("--results-dir") or os.environ.get("DEBERTA_FAST_BENCH_RESULTS")
            or _RESULTS_ROOT)


def _setup_saving(config, prof):
    """Point pytest-benchmark's JSON at ``<results root>/<date>-<device>-<profile>[-n]/results.json``
    (unless --benchmark-json names a file); pytest_sessionfinish adds the table and plots, or removes
    the folder again when nothing was measured."""
    config._df_save = _save_enabled(config)
    config._df_outdir = None
    config._df_results = None
    if not config._df_save or config.getoption("benchmark_json", None):
        return
    from benchmarks.envinfo import device_slug

    base = os.path.join(_results_root(config),
                        f"{datetime.date.today().isoformat()}-{device_slug(environment())}-{prof.name}")
    outdir, n = base, 1
    while os.path.exists(outdir):  # never overwrite earlier results
        n += 1
        outdir = f"{base}-{n}"
    os.makedirs(outdir)
    config._df_outdir = outdir
    path = JsonTarget(Path(outdir) / "results.json")
    # before pytest-benchmark reads the option (its session is made in its own pytest_configure) ...
    config.option.benchmark_json = path
    # ... or after, whichever comes first
    bs = getattr(config, "_benchmarksession", None)
    if bs is not None and not bs.json:
        bs.json = path


def pytest_configure(config):
    prof = _profiles.select_profile(config.getoption("--profile"))
    config._df_profile = prof
    _setup_saving(config, prof)
    if prof.device == "cpu":
        from benchmarks.harness import cpu_memory_accounting

        cpu_memory_accounting()
    config._df_load = [_loadavg()]
    config.addinivalue_line("markers", "core: attention-core benchmarks")
    config.addinivalue_line("markers", "model: full-model benchmarks")
    config.addinivalue_line("markers", "host: per-call host overhead (kernel launches stubbed)")


def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def pytest_report_header(config):
    p = config._df_profile
    env = environment()
    return [f"deberta_fast benchmarks: profile={p.name} device={env['device']} torch={env['torch']} "
            f"triton={env.get('triton')} transformers={env.get('transformers')}"]


@pytest.fixture(scope="session")
def profile(request):
    return request.config._df_profile


def _dt(d):
    return str(d).replace("torch.", "")


def pytest_generate_tests(metafunc):
    prof = metafunc.config._df_profile
    if "core_case" in metafunc.fixturenames:
        from benchmarks.core import candidates

        cases, ids = [], []
        for dtype in prof.dtypes:
            for batch in prof.core_batches:
                for mode in prof.core_modes:
                    for cand in candidates():
                        cases.append((mode, dtype, batch, cand))
                        ids.append(f"{mode}-{_dt(dtype)}-{batch.name}-{cand.name}")
        metafunc.parametrize("core_case", cases, ids=ids)
    if "model_case" in metafunc.fixturenames:
        from benchmarks.model import candidates

        cases, ids = [], []
        for mode in ("inference", "train"):
            dtypes = prof.dtypes if mode == "inference" or prof.device == "cpu" else (torch.bfloat16,)
            for dtype in dtypes:
                for shape in prof.model_shapes:
                    for batch in prof.model_batches[mode]:
                        for cand in candidates():
                            cases.append((mode, dtype, shape, batch, cand))
                            ids.append(f"{mode}-{_dt(dtype)}-{shape.name}-{batch.name}-{cand.name}")
        metafunc.parametrize("model_case", cases, ids=ids)


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if reason.startswith("Skipped: "):
            reason = reason[len("Skipped: "):]
        _SKIPS.append({"test": report.nodeid, "reason": reason})


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["deberta_fast_env"] = environment()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    p = config._df_profile
    output_json["deberta_fast"] = {
        "profile": p.name,
        "device": p.device,
        "env": environment(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "skipped": list(_SKIPS),
        "wrong": list(_WRONG),
        # 1-minute load average at start and end: a busy machine makes CPU timings noisy
        "loadavg_1min": config._df_load + [_loadavg()],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "pytest_args": [str(a) for a in config.invocation_params.args],
    }


def pytest_sessionfinish(session, exitstatus):
    """Runs after pytest-benchmark wrote its JSON (in its hookwrapper): table.md, env.json and plots
    next to it (benchmarks.report)."""
    config = session.config
    if not getattr(config, "_df_save", False):
        return
    outdir = config._df_outdir
    path = os.path.join(outdir, "results.json") if outdir else config.getoption("benchmark_json", None)
    bs = getattr(config, "_benchmarksession", None)
    measured = bs is not None and bool(bs.benchmarks) and path is not None and os.path.exists(path) \
        and os.path.getsize(path) > 0
    if not measured:
        return  # pytest_unconfigure removes the empty folder
    try:
        from benchmarks import report

        if outdir:
            args = [str(path), "--out", os.path.dirname(outdir), "--name", os.path.basename(outdir)]
        else:
            args = [str(path), "--out", _results_root(config), "--unique"]
        config._df_results = report.main(args)
    except Exception as e:  # noqa: BLE001 - never lose the terminal summary over the report
        config._df_results = f"ERROR: the report failed ({type(e).__name__}: {e}); the JSON is at {path}"


def pytest_unconfigure(config):
    outdir = getattr(config, "_df_outdir", None)
    if outdir and os.path.isdir(outdir) and not os.listdir(outdir):
        os.rmdir(outdir)  # nothing was measured (--collect-only, --help, all skipped, interrupted)


def _session_rows(config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return []
    from benchmarks import report

    return report.rows_of({"benchmarks": [b.as_dict(include_data=False) for b in bs.benchmarks if b]})


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = _session_rows(config)
    if rows:
        from benchmarks import report

        terminalreporter.section("deberta_fast benchmarks: parity vs fp64 and × HF eager "
                                 "(HF eager median / this median; > 1: faster)")
        for line in report.summary_lines(rows):
            terminalreporter.write_line(line)
    if getattr(config, "_df_save", False):
        if config._df_results:
            res = config._df_results
            if not res.startswith("ERROR"):
                res = os.path.relpath(res) + "/ (results.json, env.json, table.md, plots if matplotlib is installed)"
            terminalreporter.write_line(f"results: {res}")
    elif rows:
        terminalreporter.write_line("results not saved (--no-results or DEBERTA_FAST_BENCH_SAVE=0)")
    if _WRONG:
        terminalreporter.section("deberta_fast benchmarks: WRONG results (failed parity)")
        for w in _WRONG:
            terminalreporter.write_line(f"WRONG {w['test']}: max_err={w['max_err']:.3g} > tol={w['tol']:.3g}")
    reasons: dict = {}
    for s in _SKIPS:
        reasons.setdefault(s["reason"], 0)
        reasons[s["reason"]] += 1
    if reasons:
        terminalreporter.section("deberta_fast benchmarks: skipped candidates")
        for r, n in sorted(reasons.items(), key=lambda x: -x[1]):
            terminalreporter.write_line(f"{n:4d} x {r}")
