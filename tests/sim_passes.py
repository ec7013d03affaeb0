"""The cuda backend's GPU tests (``tests/test_cuda_backend.py``, ``tests/test_cuda_varlen.py``, marked ``cuda_sim``)
in simulator subprocesses, for ``tests/test_cuda_sim.py``: a crash in a kernel fails that test instead of killing
pytest.  ``conftest.py`` starts the passes its collected tests need as soon as collection ends, so that they run
beside the rest of the suite (one process otherwise, on CI's 2 cores; the two passes took 352 s of the README test
command's 1136 s on the 2-core machine, 2026-12-06); the tests then wait for their summary line."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: pass name -> the test in tests/test_cuda_sim.py that reads it
TESTS = {"mma.sync": "test_cuda_backend_gpu_tests_in_simulator", "wgmma": "test_cuda_backend_wgmma_in_simulator"}
_running: dict = {}


def _command(name: str):
    if name == "mma.sync":  # (the wgmma-against-mma.sync equality test runs in the wgmma pass: it sets both itself)
        extra_env, args = {"DEBERTA_FAST_CUDA_WGMMA": "0"}, ("-k", "not wgmma_kernels_equal")
    else:
        sys.path.insert(0, str(ROOT))
        from benchmarks.gpu_session import WGMMA_TESTS

        extra_env, args = {"DEBERTA_FAST_CUDA_WGMMA": "1"}, ("-k", WGMMA_TESTS)
    env = dict(os.environ, DEBERTA_FAST_CUDA_SIM="1", PYTHONPATH=str(ROOT), **extra_env)
    cmd = [sys.executable, "-m", "pytest", "tests/test_cuda_backend.py", "tests/test_cuda_varlen.py", "-m", "cuda_sim",
           "-q", "-p", "no:cacheprovider", *args]
    return cmd, env


def start(name: str) -> None:
    """Start pass ``name`` (``TESTS``' keys) unless it runs already."""
    if name not in _running:
        cmd, env = _command(name)
        out = tempfile.TemporaryFile()
        _running[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT), out)


def result(name: str) -> tuple[int, str]:
    """``(exit status, output)`` of pass ``name``, started now if it was not."""
    start(name)
    proc, out = _running.pop(name)
    proc.wait()
    out.seek(0)
    text = out.read().decode(errors="replace")
    out.close()
    return proc.returncode, text


def stop_all() -> None:
    """Kill the passes no test waited for (a run cut short: ``-x``, an interrupt)."""
    for proc, out in _running.values():
        proc.kill()
        proc.wait()
        out.close()
    _running.clear()
