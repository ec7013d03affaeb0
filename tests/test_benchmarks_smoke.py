"""Smoke tests of the benchmark harness (benchmarks/): its oracles, baselines, FLOP counts,
profiles and report.  No timing and no speed targets here (those live in benchmarks/)."""
import os
import json

import pytest
import torch

from benchmarks import core, flops, harness, profiles, report
from benchmarks.profiles import Batch


def _small_inputs(dtype=torch.float64):
    batch = Batch("t", (24, 17, 9), 24)
    return core.make_inputs(batch, heads=2, head_dim=8, dtype=dtype, device="cpu", seed=3)


def _valid(t, mask):
    return t * mask[:, None, :, None].to(t.dtype)


def test_row_oracle_matches_reference():
    inp = _small_inputs()
    ref, _ = core.reference_fp64(inp, grads=False)
    for b in range(inp.query.shape[0]):
        rows = torch.arange(inp.batch.lengths[b])
        got = core.reference_rows_fp64(inp, b, rows, chunk=5)
        torch.testing.assert_close(got, ref[b][:, rows], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["hf-eager", "sdpa+bias", "deberta_fast-torch"])
def test_core_candidates_match_reference(name):
    inp = _small_inputs()
    cand = next(c for c in core.candidates() if c.name == name)
    assert cand.skip_reason(inp, "fwdbwd") is None
    ref, ref_grads = core.reference_fp64(inp, grads=True)
    p = cand.prepare(inp, True)
    out = p.fn()
    out.backward(p.dout)
    torch.testing.assert_close(_valid(p.out_to_canon(out), inp.mask), _valid(ref, inp.mask), rtol=1e-9, atol=1e-9)
    g = p.grads()
    for n in core.GRAD_NAMES:
        torch.testing.assert_close(g[n], ref_grads[n], rtol=1e-8, atol=1e-8)


def test_peers_and_gpu_backends_skip_with_reason_on_cpu():
    inp = _small_inputs(torch.float32)
    for c in core.candidates():
        if c.kind == "peer" or c.name in ("deberta_fast-triton", "deberta_fast-cuda"):
            reason = c.skip_reason(inp, "fwd")
            assert isinstance(reason, str) and len(reason) > 20


def test_oracle_slices_fit_budget():
    inp = core.make_inputs(Batch("s", (8,), 8), 2, 4, torch.float32, "cpu")
    assert core.oracle_slices(inp) == (slice(0, 1), slice(0, 2))
    shaped = lambda B, H, L: type("F", (), {"query": torch.empty(B, H, L, 0)})()  # noqa: E731
    assert core.oracle_slices(shaped(1, 12, 65536)) is None  # no [L, L] fp64 tensor fits: row oracle
    b, h = core.oracle_slices(shaped(2, 12, 8192))
    assert (b.stop - b.start) * (h.stop - h.start) * 8192 ** 2 <= core.ORACLE_ELEMS


def test_flops_formulas():
    # one sequence, L=128, H=12, D=64, span=256, both relative terms
    f = flops.attention_fwd_flops([128], 12, 64, 256)
    assert f == 4 * 12 * 128 * 128 * 64 + 2 * 2 * 12 * 128 * 512 * 64
    assert flops.attention_flops("bwd", [128], 12, 64, 256) == 2.5 * f
    assert flops.attention_flops("fwdbwd", [128], 12, 64, 256) == 3.5 * f
    # padding is not counted
    assert flops.attention_fwd_flops([100, 28], 1, 8, 4) < flops.attention_fwd_flops([128, 128], 1, 8, 4)
    inf = flops.model_flops("inference", [64], layers=2, hidden=768, heads=12, intermediate=3072, span=256)
    assert flops.model_flops("train", [64], layers=2, hidden=768, heads=12, intermediate=3072, span=256) == 3 * inf


def test_mnli_lengths_are_seeded_and_bounded():
    a = profiles.mnli_lengths(1000, 128, seed=1)
    assert a == profiles.mnli_lengths(1000, 128, seed=1)
    assert min(a) >= 8 and max(a) <= 128
    assert 30 < sum(a) / len(a) < 55
    b = profiles.mnli_batch(16, 128)
    assert b.padded_len % 8 == 0 or b.padded_len == 128
    assert b.mask().sum().item() == b.tokens


def test_profile_selection(monkeypatch):
    monkeypatch.setenv("DEBERTA_FAST_BENCH_PROFILE", "quick")
    assert profiles.select_profile().name == "quick"
    assert profiles.select_profile("quick").name == "quick"
    with pytest.raises(ValueError):
        profiles.select_profile("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            profiles.select_profile("full")
        monkeypatch.delenv("DEBERTA_FAST_BENCH_PROFILE")
        assert profiles.select_profile().name == "quick"


def test_parity_tolerance():
    assert harness.parity_info(1e-5, torch.float32, None, "x")["parity"] == "pass"
    assert harness.parity_info(1e-2, torch.float32, None, "x")["parity"] == "WRONG"
    assert harness.parity_info(float("nan"), torch.float32, None, "x")["parity"] == "WRONG"
    # within HF_FACTOR x HF eager's own error in that dtype
    assert harness.parity_info(0.1, torch.bfloat16, 0.03, "x")["parity"] == "pass"
    # HF eager is the baseline: its own error (however large) is reported, never judged; NaN still fails
    base = harness.parity_info(0.11, torch.bfloat16, None, "x", baseline=True)
    assert base["parity"] == "baseline" and base["tol"] is None
    assert harness.parity_info(float("nan"), torch.bfloat16, None, "x", baseline=True)["parity"] == "WRONG"
    from benchmarks import report
    assert report._parity_cell(base) == "baseline (1.1e-01)" and report._ok({**base, "median": 1.0})
    assert harness.rel_max_err(torch.tensor([2.0, 4.0]), torch.tensor([2.0, 4.4])) == pytest.approx(0.4 / 4.4)


def _bench(name, cand, kind, median, parity="pass", err=1e-7, **kw):
    ei = {"suite": "core", "candidate": cand, "kind": kind, "mode": "fwd", "dtype": "float32", "batch": "dense-B1-L128",
          "B": 1, "L": 128, "tokens": 128, "parity": parity, "max_err": err, "tol": 2e-4, "tflops": 1.0,
          "peak_mem_bytes": 1 << 20, "peak_mem_method": "test"}
    ei.update(kw)
    return {"group": "core fwd float32 dense-B1-L128", "name": name, "stats": {"median": median, "iqr": 0.0, "rounds": 3},
            "extra_info": ei}


def test_report_marks_wrong_and_ratios(tmp_path):
    data = {"benchmarks": [
        _bench("a", "hf-eager", "baseline", 0.004),
        _bench("b", "deberta_fast-torch", "deberta_fast", 0.001),
        _bench("c", "deberta_fast-triton", "deberta_fast", 0.0001, parity="WRONG", err=0.5),
        _bench("d", "disentangled-flash", "peer", 0.002),
    ], "deberta_fast": {"profile": "quick", "env": {"device": "CPU test", "torch": torch.__version__},
                        "date": "2026-01-01T00:00:00",
                        "skipped": [{"test": "x[flex]", "reason": "flex: no backward on CPU"}]}}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    outdir = report.main([str(path), "--out", str(tmp_path / "res")])
    table = (tmp_path / "res").joinpath(outdir.split("/")[-1], "table.md").read_text()
    line = next(l for l in table.splitlines() if l.startswith("| deberta_fast-torch"))
    assert "| 4.00 |" in line and "| 2.00 |" in line  # vs HF eager, vs the peer
    wrong = next(l for l in table.splitlines() if l.startswith("| deberta_fast-triton"))
    assert "WRONG" in wrong and "40.00" not in wrong
    assert "flex: no backward on CPU" in table
    assert (tmp_path / "res" / outdir.split("/")[-1] / "results.json").exists()


def test_json_target_serves_both_pytest_benchmark_generations(tmp_path):
    """5.2+ opens the path; older versions (the GPU image's) write to ``with self.json as fh``."""
    from benchmarks.harness import JsonTarget

    t = JsonTarget(tmp_path / "r.json")
    with open(t, mode="wb") as fh:
        fh.write(b"new")
    assert (tmp_path / "r.json").read_bytes() == b"new" and str(t) == str(tmp_path / "r.json")
    with t as fh:
        fh.write(b"old")
    assert (tmp_path / "r.json").read_bytes() == b"old" and os.fspath(t) == str(tmp_path / "r.json")
