"""The shipped Triton kernels compile to PTX and cubin for sm_80 and sm_90, no GPU needed, exactly
as the launcher launches them, Triton's launch-time specialization included.

Runs ``python -m deberta_fast._compile_check`` in a subprocess without ``TRITON_INTERPRET``: it calls
the real launchers (``attention_forward``/``_backward`` and their ``_varlen`` forms) with CPU tensors,
records each ``kernel[grid](...)`` instead of launching it, derives the signature, constexprs and
divisibility/alignment attributes with Triton's own launch machinery, and compiles that (see the
module's docstring).  It checks that every variant reaches a cubin, that every launch config is
covered, and that the fp16/bf16 kernels of aligned launches use 16-byte vector loads / ``cp.async``
while a negative control compiled without the specialization does not.

* default: a representative subset (about 20 kernels; cold about 2-4 minutes on 2 cores, warm
  about 15 s: the kernels come from Triton's cache, ``~/.triton/cache`` or ``TRITON_CACHE_DIR``);
* ``DEBERTA_FAST_FULL_COMPILE=1``: the full matrix (every launch config x dtype x target, the
  constexpr flag matrix, packed sequences, alignment variants), for CI's extra stage.

No time limit.  Progress (one line per kernel, with its time, registers and spills) goes to stderr
and the register/spill table to stdout: ``pytest -s`` shows both as they come.
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = os.environ.get("DEBERTA_FAST_FULL_COMPILE", "0") not in ("", "0")


def test_launched_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "compile_check.json")
        cmd = [sys.executable, "-m", "deberta_fast._compile_check", "--json", out] + (["--full"] if FULL else [])
        rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
        assert os.path.exists(out), (f"`{' '.join(cmd[1:])}` exited with {rc} before writing its results "
                                     f"(its stderr above says why)")
        with open(out) as f:
            result = json.load(f)
    problems = result["problems"]
    assert not problems, (f"{len(problems)} problem(s) in {len(result['jobs'])} compiled kernels:\n"
                          + "\n".join(p[:400] for p in problems[:5]))
    assert rc == 0, f"compile check exited with {rc}"
    assert result["full"] == FULL


def test_spill_check_allows_only_the_measured_forward():
    """``_compile_check.spills``: a spilling launch is a problem unless it is the allow-listed measured sm_90 forward
    config, the negative control or the skew experiment; an unread ptxas log is a problem too (no silent pass)."""
    from types import SimpleNamespace

    from deberta_fast import _compile_check as cc

    def job(kernel, cc_, bm, bn, warps, stages, **sc):
        params = [SimpleNamespace(name=n) for n in ("Q", "BLOCK_M", "BLOCK_N")]
        fn = SimpleNamespace(__name__=kernel, params=params)
        return cc.Job("k", fn, cc_, {}, {(1,): bm, (2,): bn}, {}, SimpleNamespace(num_warps=warps, num_stages=stages),
                      ["label"], cc.Scenario("fwd", **sc), ())

    res = lambda n: {"ok": True, "res": {"spill_stores": n}}  # noqa: E731
    measured = job("disentangled_fwd_kernel", 90, 64, 64, 4, 2)
    assert cc.spills([measured], [res(8)]) == []
    assert len(cc.spills([job("disentangled_fwd_kernel", 80, 64, 64, 4, 2)], [res(8)])) == 1  # other target
    assert len(cc.spills([job("disentangled_fwd_kernel", 90, 64, 32, 4, 2)], [res(4)])) == 1  # other tile
    assert len(cc.spills([job("disentangled_bwd_dq_kernel", 90, 64, 64, 4, 2)], [res(4)])) == 1  # other kernel
    assert cc.spills([job("disentangled_bwd_dq_kernel", 90, 64, 32, 4, 1)], [res(0)]) == []
    assert cc.spills([job("disentangled_fwd_kernel", 90, 64, 64, 8, 2, rel="skew")], [res(40)]) == []
    assert cc.spills([job("disentangled_fwd_kernel", 80, 64, 32, 4, 3, specialize=False)], [res(32)]) == []
    assert "unknown" in cc.spills([job("disentangled_bwd_dq_kernel", 90, 64, 32, 4, 1)], [res(None)])[0]
    assert cc.spills([measured], [{"ok": False, "error": "x"}]) == []  # (a failed compile is check()'s problem)


def test_config_coverage_follows_the_targets(monkeypatch):
    """``--targets 90`` (CI's stage under the GPU image's triton 3.6.0) checks the coverage of the sm_90 launch configs
    only: a subset of both targets' configs, every one probed on sm_90 (the GPU configs: not the interpreter's one)."""
    from deberta_fast import _compile_check as cc

    monkeypatch.setenv("TRITON_INTERPRET", "0")

    both, sm90 = cc.launch_config_keys(), cc.launch_config_keys((90,))
    assert set(sm90) < set(both) and all(p.arch == 90 for p in sm90.values())


def test_a_config_keyed_on_the_compiler_version(monkeypatch):
    """The sm_90 float32 D = 128 dq spills on 2 stages under triton 3.7 and on 1 under 3.6 (the full tier's variant,
    NOTES): ``launch_config`` picks its stages by ``_TRITON_VERSION``, read once at import."""
    from deberta_fast._kernels import triton_attention_launch as launch

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    stages = {}
    for version in ((3, 6), (3, 7), (4, 0)):
        monkeypatch.setattr(launch, "_TRITON_VERSION", version)
        launch._gpu_config.cache_clear()
        stages[version] = launch.launch_config("bwd", 512, 512, 128, True, arch=90).dq.num_stages
        assert launch.launch_config("bwd", 512, 512, 64, True, arch=90).dq.num_stages == 2  # other head dims: one
    launch._gpu_config.cache_clear()
    assert stages == {(3, 6): 2, (3, 7): 1, (4, 0): 1}
