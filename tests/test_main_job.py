"""The README's main job, ``python -m deberta_fast --quick``, on this machine: it checks the Triton kernels
(under the interpreter on CPU), compares with HF's own attention module, says what it measured (batch,
threads, tolerance, ratio direction, spread, total time), names each unavailable backend's reason once, and
exits 0 when everything agrees with the fp64 reference.  One run (~30-60 s on 2 CPU cores) serves all asserts."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    out_json = tmp_path_factory.mktemp("main_job") / "report.json"
    # as a user runs it: tests/conftest.py sets TRITON_INTERPRET=1 for the kernel tests, a user does not
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "deberta_fast", "--quick", "--json", str(out_json)],
                         capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    report = json.loads(out_json.read_text()) if out_json.exists() else None
    return res, report


def test_exit_status_and_parity(main_job):
    res, report = main_job
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    assert report is not None
    assert all(r["parity"] == "pass" for r in report["hf_comparison"]["rows"])
    assert "all served candidates agree with the fp64 reference" in res.stdout


def test_says_what_was_checked(main_job):
    res, report = main_job
    out = res.stdout
    assert "torch threads" in out and str(torch.get_num_threads()) in out
    assert "tolerance" in out
    assert "x HF eager = HF eager median / this median; > 1 means faster" in out
    assert "DisentangledSelfAttention" in out or "transformers DebertaV2Encoder" in out  # HF's own module
    assert "IQR" in out and "min-max" in out
    assert re.search(r"total wall time \d+(\.\d+)? s", out)
    rows = report["hf_comparison"]["rows"]
    assert {r["candidate"].split(" (")[0] for r in rows} >= {"HF eager"}
    for r in rows:
        assert r["rounds"] >= 10 and r["B"] >= 1 and r["L"] >= 1 and r["H"] >= 1 and r["D"] >= 1
        assert r["q1_s"] <= r["median_s"] <= r["q3_s"]
    # a header row that names dtype, batch, length, heads and head dim
    assert re.search(r"dtype\s+B\s+L\s+H\s+D\s+candidate", out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layout of the report")
def test_cpu_checks_the_kernels_under_the_interpreter(main_job):
    res, report = main_job
    out = res.stdout
    assert "Triton interpreter" in out and "estimate ~" in out and re.search(r"took \d+(\.\d+)? s", out)
    kc = report["kernel_check"]
    if kc["not_run"]:
        pytest.skip(f"kernel check not run here: {kc['not_run']}")
    assert kc["rows"] and all(r["status"] == "pass" and r["served_by"] == r["backend"] for r in kc["rows"])
    assert {"dq", "dk", "dv", "dpos_key", "dpos_query"} <= set(kc["rows"][0]["errors"])
    # the CUDA kernels in their CPU simulator, where it can be built (CUDA headers, a host compiler)
    from deberta_fast.__main__ import _simulator_problem

    sim_rows = [r for r in kc["rows"] if r["backend"] == "cuda"]
    if _simulator_problem() is None:
        assert "CPU simulator" in out and {r["dtype"] for r in sim_rows} == {"bfloat16", "float16"}
    else:
        assert not sim_rows and "not run" in out
    # the torch backend is the reference path, and is called so; the kernels are never timed on CPU
    cands = [r["candidate"] for r in report["hf_comparison"]["rows"]]
    assert any("reference path" in c for c in cands)
    assert not any("triton" in c or "cuda" in c for c in cands)


def test_each_backend_reason_once(main_job):
    res, report = main_job
    out = res.stdout
    for name, b in report["backends"].items():
        if b["state"] == "unavailable":
            assert out.count(b["text"]) == 1, f"the reason of backend {name} appears {out.count(b['text'])} times"
    if not torch.cuda.is_available():
        # the cause shared by the GPU backends (no CUDA device) is said once, not per backend
        cause = [l for l in out.splitlines() if "no CUDA device" in l]
        assert len(cause) == 1, cause
        # the CUDA extension's long build hint is not what a CPU machine needs to read
        assert out.count("DEBERTA_FAST_CUDA_ARCHS") == 0


# ----------------------------------------------------------------------------- error messages (deberta_fast._env)

_NO_NUMPY = '''
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            raise ModuleNotFoundError("No module named 'numpy'", name="numpy")
sys.meta_path.insert(0, _Block())
'''


def test_interpreter_without_numpy_names_numpy(tmp_path):
    """TRITON_INTERPRET=1 without numpy: `import triton` fails inside triton's interpreter; the message must
    say numpy, not 'pip install triton'."""
    pytest.importorskip("triton")
    (tmp_path / "sitecustomize.py").write_text(_NO_NUMPY)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(tmp_path), PYTHONWARNINGS="ignore")
    code = "from deberta_fast._env import triton_problem; print('MSG:', triton_problem())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    msg = next((l for l in res.stdout.splitlines() if l.startswith("MSG:")), None)
    assert msg is not None, res.stdout + res.stderr[-2000:]
    assert "numpy" in msg and "pip install numpy" in msg and "pip install triton" not in msg, msg


def test_error_explanations(monkeypatch):
    from deberta_fast import _env

    no_numpy = ModuleNotFoundError("No module named 'numpy'", name="numpy")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "pip install numpy" in _env.explain_triton_import_error(no_numpy)
    no_triton = ModuleNotFoundError("No module named 'triton'", name="triton")
    assert _env.explain_triton_import_error(no_triton).startswith("triton is not installed")
    broken = ImportError("libcuda.so: cannot open shared object file")
    assert "libcuda.so" in _env.explain_triton_import_error(broken, "kernels")
    assert _env.explain_import_error(no_numpy, "transformers", "pip install transformers").endswith("pip install numpy")
    assert "download.pytorch.org/whl/cpu" in _env.cpu_torch_hint()
    if not torch.cuda.is_available():
        assert "no CUDA device" in _env.cuda_device_problem()
