"""pytest-benchmark configuration of the deberta_fast benchmark suite.

    pytest benchmarks/ [--profile quick|full|auto] [--benchmark-json=out.json]
    python -m benchmarks.report out.json --out benchmarks/results/

Profiles: see benchmarks/profiles.py.  Skips (with their reasons), the profile and
the software/hardware versions are written into the JSON under ``"deberta_fast"``.
"""
from __future__ import annotations

import datetime
import os
import sys

# never benchmark the Triton interpreter (tests/conftest.py sets it for CPU *tests*)
if os.environ.get("TRITON_INTERPRET") == "1":
    os.environ["TRITON_INTERPRET"] = "0"

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks import profiles as _profiles  # noqa: E402
from benchmarks.envinfo import environment  # noqa: E402
from benchmarks.harness import WRONG as _WRONG  # noqa: E402

_SKIPS: list = []


def pytest_addoption(parser):
    parser.addoption("--profile", action="store", default=None,
                     help="benchmark profile: quick (CPU smoke), full (GPU) or auto "
                          "(default; env DEBERTA_FAST_BENCH_PROFILE)")


def pytest_configure(config):
    prof = _profiles.select_profile(config.getoption("--profile"))
    config._df_profile = prof
    if prof.device == "cpu":
        from benchmarks.harness import cpu_memory_accounting

        cpu_memory_accounting()
    config._df_load = [_loadavg()]
    config.addinivalue_line("markers", "core: attention-core benchmarks")
    config.addinivalue_line("markers", "model: full-model benchmarks")


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
    }


def pytest_terminal_summary(terminalreporter, exitstatus, config):
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
