"""Host side of the CUDA extension, executed on CPU: ``csrc/dfa_bindings.cpp`` itself (the same source as
``deberta_fast._C``) built with ``-DDFA_HOST_TEST`` as a CPU torch extension (``-Wall -Wextra -Werror``;
CPU tensors stand in for CUDA ones, the launchers are the recording stubs of ``csrc/dfa_host_stubs.cpp``).
Checks the ``dfa::Params`` every entry point hands to the kernels and that every validation fires with its
message.  The build and one call of each entry point first run in a subprocess, so that a crash there (an
infinite recursion, a bad pointer) fails these tests instead of killing pytest.  The kernels themselves
run on a GPU (tests/test_cuda_backend.py, tests/test_cuda_varlen.py) or, on CPU, in the simulator
(tests/test_cuda_sim.py).

Run ``python tests/test_cuda_host.py`` to build (cached by torch under ``TORCH_EXTENSIONS_DIR``, rebuilt
when a source or flag changes) and smoke-call the extension by hand."""
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from csrc import build_config  # noqa: E402
from deberta_fast._cuda_ext import band_window  # noqa: E402
from deberta_fast.positions import relative_slot_table  # noqa: E402

CXX = shutil.which(os.environ.get("CXX", "c++"))
DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1}


def build(verbose=False):
    """The host-test extension (torch.utils.cpp_extension.load, ninja; cached until a source changes; a dead
    build's lock removed: _cuda_ext._load_extension).
    -O0: no tail calls, so an infinite recursion overflows the stack instead of looping forever."""
    from deberta_fast._cuda_ext import _load_extension

    return _load_extension(
        "deberta_fast_host_test", sources=build_config.host_test_sources(),
        extra_cflags=["-O0", "-DDFA_HOST_TEST", f"-std={build_config.cxx_std()}", *build_config.WARNING_FLAGS],
        extra_include_paths=[str(ROOT / "csrc")], verbose=verbose)


# ----------------------------------------------------------------------------- valid arguments
def _r(*shape, dtype=torch.float16, g=None):
    return torch.randn(*shape, generator=g).to(dtype)


def fwd_args(B=2, H=3, Lq=5, Lk=7, D=32, S2=8, dtype=torch.float16, p=0.0, rel=True, masks=True):
    """Padded fwd arguments, q/k/v in HF's [B, L, H, D] memory (non-contiguous [B, H, L, D] views)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (_r(B, L, H, D, dtype=dtype, g=g).transpose(1, 2) for L in (Lq, Lk, Lk))
    a = dict(q=q, k=k, v=v, pos_key=None, pos_query=None, table=None, key_mask=None, uniform=None, rng=None,
             scale=0.125, p_drop=p)
    if rel:  # pos_key shared by the batch [H, S2, D], pos_query per element [B, H, S2, D]
        a.update(pos_key=_r(H, S2, D, dtype=dtype, g=g), pos_query=_r(B, H, S2, D, dtype=dtype, g=g),
                 table=relative_slot_table(Lq, Lk, 4, 16, S2 // 2))
    if masks:
        a.update(key_mask=torch.rand(B, Lk, generator=g) > 0.3, uniform=torch.zeros(B, 1, Lq, dtype=torch.bool))
    if p > 0:
        a["rng"] = torch.tensor([123, 4], dtype=torch.int64)
    return a


def _bwd_extra(a, Lq, Lk, lse_shape):
    """dout / out / lse and the band window (deberta_fast._cuda_ext.band_window) of a fwd-style dict: the backward
    takes the forward's arguments (position rows, slot table) and these."""
    q = a["q"]
    b = dict(dout=torch.randn(q.shape).to(q.dtype), out=torch.randn(q.shape).to(q.dtype),
             lse=torch.randn(lse_shape), **a, dmin=0, W=0, perm=None, offs=None)
    if a["table"] is not None:
        s2 = (a["pos_key"] if a["pos_key"] is not None else a["pos_query"]).shape[-2]
        b["dmin"], b["W"], b["perm"], b["offs"] = band_window(a["table"], Lq, Lk, -3, 3, s2)
    return b


def bwd_args(B=2, H=3, Lq=5, Lk=7, **kw):
    return _bwd_extra(fwd_args(B, H, Lq, Lk, **kw), Lq, Lk, (B, H, Lq))


def varlen_fwd_args(lens_q=(3, 0, 5), lens_k=(4, 2, 0), H=2, D=64, S2=8, dtype=torch.bfloat16, p=0.0, rel=True):
    g = torch.Generator().manual_seed(1)
    Tq, Tk = sum(lens_q), sum(lens_k)
    max_q, max_k = max(max(lens_q), 1), max(max(lens_k), 1)
    a = dict(q=_r(Tq, H, D, dtype=dtype, g=g), k=_r(Tk, H, D, dtype=dtype, g=g), v=_r(Tk, H, D, dtype=dtype, g=g),
             pos_key=None, pos_query=None, table=None,
             cu_seqlens_q=torch.tensor([0, *np.cumsum(lens_q)], dtype=torch.int32),
             cu_seqlens_k=torch.tensor([0, *np.cumsum(lens_k)], dtype=torch.int32),
             max_seqlen_q=max_q, max_seqlen_k=max_k, rng=None, scale=0.1, p_drop=p)
    if rel:
        a.update(pos_key=_r(H, S2, D, dtype=dtype, g=g), pos_query=_r(H, S2, D, dtype=dtype, g=g),
                 table=relative_slot_table(max_q, max_k, 4, 16, S2 // 2))
    if p > 0:
        a["rng"] = torch.tensor([7, 8], dtype=torch.int64)
    return a


def varlen_bwd_args(**kw):
    a = varlen_fwd_args(**kw)
    H, Tq, Tk = a["q"].shape[1], a["q"].shape[0], a["k"].shape[0]
    return _bwd_extra(a, a["max_seqlen_q"], a["max_seqlen_k"], (H, Tq))


ARGS = {"fwd": fwd_args, "bwd": bwd_args, "varlen_fwd": varlen_fwd_args, "varlen_bwd": varlen_bwd_args}


def smoke(ext):
    """Every entry point once, with and without dropout and relative terms (what a crash would hit first)."""
    for name, make in ARGS.items():
        for p in (0.0, 0.2):
            for rel in (False, True):
                getattr(ext, name)(**make(p=p, rel=rel))


# ----------------------------------------------------------------------------- fixture: crash-safe
@pytest.fixture(scope="module")
def ext():
    if CXX is None:
        pytest.skip("no host C++ compiler (c++ or $CXX) to build the host-test extension")
    r = subprocess.run([sys.executable, __file__], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        how = f"killed by {signal.Signals(-r.returncode).name}" if r.returncode < 0 else f"exit {r.returncode}"
        pytest.fail(f"host-test build or smoke calls of csrc/dfa_bindings.cpp failed ({how}):\n"
                    f"{r.stdout[-3000:]}\n{r.stderr[-8000:]}")
    mod = build()
    mod.host_reset()
    return mod


def launches(ext, fn, **args):
    ext.host_reset()
    res = fn(**args)
    return res, ext.host_launches()


def _expect_tensor(P, name, t, strides):
    assert P[name] == t.data_ptr(), name
    assert tuple(P[f"{name}_{s}"] for s in ("sb", "sh", "sr")) == strides, name


def _f32(x):
    return float(np.float32(x))


def _thresh(p):
    return min(math.floor(p * 2 ** 16 + 0.5), 2 ** 16 - 1)  # std::round: half away from zero


# ----------------------------------------------------------------------------- recorded Params
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_fwd_params(ext, dtype, D):
    a = fwd_args(D=D, dtype=dtype)
    (out, lse), [l] = launches(ext, ext.fwd, **a)
    assert l["kernel"] == "fwd" and l["dtype"] == DTYPE_CODE[dtype] and l["head_dim"] == D and l["stream"] == 0
    P = l["params"]
    q, k, v = a["q"], a["k"], a["v"]
    assert (P["B"], P["H"], P["Lq"], P["Lk"], P["S2"]) == (2, 3, 5, 7, 8)
    for name, t in (("q", q), ("k", k), ("v", v), ("o", out)):
        _expect_tensor(P, name, t, t.stride()[:3])
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (2, 3, 5) and lse.dtype == torch.float32 and P["lse"] == lse.data_ptr()
    pk, pq = a["pos_key"], a["pos_query"]
    assert (P["pos_k"], P["pos_q"], P["table"]) == (pk.data_ptr(), pq.data_ptr(), a["table"].data_ptr())
    assert (P["pk_sb"], P["pk_sh"], P["pk_sr"]) == (0, 8 * D, D)  # [H, S2, D]: shared by the batch
    assert (P["pq_sb"], P["pq_sh"], P["pq_sr"]) == (3 * 8 * D, 8 * D, D)
    assert (P["key_mask"], P["km_sb"]) == (a["key_mask"].data_ptr(), 7)
    assert (P["uniform"], P["un_sb"], P["un_sh"]) == (a["uniform"].data_ptr(), 5, 0)  # [B, 1, Lq]: no head stride
    assert P["scale"] == _f32(0.125) and P["scale_log2"] == _f32(0.125 * 1.4426950408889634)
    assert (P["dropout"], P["rng"], P["drop_thresh"], P["drop_scale"]) == (0, 0, 0, 0.0)
    for f in ("dout", "dq", "dk", "dv", "lse_c", "delta", "band_q", "sat_q", "band_k", "sat_k", "cu_q", "cu_k"):
        assert P[f] == 0, f  # forward: backward-only and varlen fields stay null
    assert (P["dmin"], P["W"], P["Tq"], P["Tk"]) == (0, 0, 0, 0)


def test_fwd_params_without_relative_terms_and_masks(ext):
    a = fwd_args(rel=False, masks=False)
    _, [l] = launches(ext, ext.fwd, **a)
    P = l["params"]
    assert (P["pos_k"], P["pos_q"], P["table"], P["S2"], P["key_mask"], P["uniform"]) == (0, 0, 0, 0, 0, 0)


def test_fwd_params_per_head_uniform_rows_and_c2p_only(ext):
    a = fwd_args()
    a.update(uniform=torch.zeros(2, 3, 5, dtype=torch.bool), pos_query=None,
             pos_key=a["pos_query"][:1])  # [1, H, S2, D]: batch stride 0
    _, [l] = launches(ext, ext.fwd, **a)
    P = l["params"]
    assert (P["un_sb"], P["un_sh"], P["pos_q"], P["S2"], P["pk_sb"]) == (15, 5, 0, 8, 0)


@pytest.mark.parametrize("p", [1e-12, 0.1, 0.25, 0.5, 0.9, 1 - 2 ** -33, 1 - 2 ** -40])
@pytest.mark.parametrize("entry", list(ARGS))
def test_dropout_params(ext, entry, p):
    a = ARGS[entry](p=p)
    _, recs = launches(ext, getattr(ext, entry), **a)
    P = next(r["params"] for r in recs if r["kernel"] in ("fwd", "bwd_dq"))
    assert P["dropout"] == 1 and P["rng"] == a["rng"].data_ptr()
    assert P["drop_thresh"] == _thresh(p)
    # kept elements scaled by the inverse of the keep rate the threshold realises (unbiased; not 1 / (1 - p))
    assert P["drop_scale"] == _f32(65536.0 / (65536.0 - _thresh(p)))


def test_bwd_params_and_band_launches(ext):
    a = bwd_args(Lq=5, Lk=7)
    a.update(band_lo=-3, band_hi=3)  # the band _bwd_extra's window was made for
    (dq, dk, dv, dc2p, dp2c), recs = launches(ext, ext.bwd, **a)
    # one score kernel at a time, each band reduced (and freed) before the next is allocated: never both at once
    assert [r["kernel"] for r in recs] == ["bwd_dq", "band_to_slots", "bwd_dkdv", "band_to_slots"]
    P, Pk = recs[0]["params"], recs[2]["params"]
    assert P["band_q"] != 0 and P["band_k"] == 0 and Pk["band_q"] == 0 and Pk["band_k"] != 0
    assert {f: v for f, v in P.items() if f not in ("band_q", "sat_q", "band_k", "sat_k")} == \
        {f: v for f, v in Pk.items() if f not in ("band_q", "sat_q", "band_k", "sat_k")}
    for name, t in (("q", a["q"]), ("k", a["k"]), ("v", a["v"]), ("dq", dq), ("dk", dk)):
        _expect_tensor(P, name, t, t.stride()[:3])
    assert P["dout"] == a["dout"].data_ptr() and (P["do_sb"], P["do_sh"], P["do_sr"]) == a["dout"].stride()[:3]
    assert P["dv"] == dv.data_ptr() and dv.stride() == dk.stride()  # dv shares dk's strides
    # the forward's output, which the dq kernel reads for delta = rowsum(dO * O) (its own buffer, no host op)
    _expect_tensor(P, "o", a["out"], a["out"].stride()[:3])
    assert P["lse_c"] == a["lse"].data_ptr() and P["lse"] == 0 and P["delta"] != 0
    assert (P["dmin"], P["W"]) == (a["dmin"], a["W"]) and P["W"] > 0
    assert dq.shape == a["q"].shape and dk.shape == dv.shape == a["k"].shape
    # the same position rows and slot table as the forward (no C2P / P2C tables)
    pk, pq = a["pos_key"], a["pos_query"]
    assert (P["pos_k"], P["pos_q"], P["table"], P["S2"]) == (pk.data_ptr(), pq.data_ptr(), a["table"].data_ptr(), 8)
    assert (P["pk_sb"], P["pk_sh"], P["pk_sr"]) == (0, 8 * 32, 32)
    assert (P["pq_sb"], P["pq_sh"], P["pq_sr"]) == (3 * 8 * 32, 8 * 32, 32)
    assert (P["band_lo"], P["band_hi"]) == (-3, 3)
    assert dc2p.shape == (2, 3, 5, 8) and dp2c.shape == (2, 3, 7, 8)  # the gradients of C2P / P2C-shaped tables
    bq, bk = recs[1], recs[3]
    assert (bq["by_key"], bk["by_key"]) == (False, True)
    for b, S in ((bq, P), (bk, Pk)):  # its score kernel's Params: where its band holds written entries
        assert {f: b["params"][f] for f in ("band_q", "band_k", "dmin", "W", "Lq", "Lk", "cu_q", "table")} == \
            {f: S[f] for f in ("band_q", "band_k", "dmin", "W", "Lq", "Lk", "cu_q", "table")}
    assert (bq["band"], bq["sat"], bq["out"]) == (P["band_q"], P["sat_q"], dc2p.data_ptr())
    assert (bk["band"], bk["sat"], bk["out"]) == (Pk["band_k"], Pk["sat_k"], dp2c.data_ptr())
    for b, rows in ((bq, 2 * 3 * 5), (bk, 2 * 3 * 7)):
        assert (b["rows"], b["W"], b["S2"], b["dtype"]) == (rows, a["W"], 8, 0)
        assert (b["perm"], b["offs"]) == (a["perm"].data_ptr(), a["offs"].data_ptr())
        # the saturated sums' slots: the table's at d = band_lo / band_hi (index d + Lk - 1)
        assert (b["table"], b["idx_lo"], b["idx_hi"]) == (a["table"].data_ptr(), -3 + 6, 3 + 6)
    a.update(band_lo=-100, band_hi=100)  # edges beyond the table: clamped to its ends
    _, recs = launches(ext, ext.bwd, **a)
    assert [(r["idx_lo"], r["idx_hi"]) for r in recs if r["kernel"] == "band_to_slots"] == [(0, 5 + 7 - 2)] * 2


@pytest.mark.parametrize("entry", ["fwd", "bwd", "varlen_fwd", "varlen_bwd"])
def test_saturated_terms_precomputed_on_request(ext, entry, monkeypatch):
    """``DEBERTA_FAST_CUDA_SAT_TERMS=1`` (or ``on``, ...): the saturated column terms launched first (the keys' for
    the forward and the dq kernel, the queries' for dK/dV), the score kernels' Params pointing at them; ``=0``
    (``false``), and by default at these lengths (no tile beyond the band): no such launch, the pointers nullptr."""
    a = ARGS[entry]()
    if entry == "bwd":
        a.update(band_lo=-3, band_hi=3)
    fwd = entry.endswith("fwd")
    for env in ("1", "0", "On", "false", None):  # (the package's flag spellings, any case)
        if env is None:
            monkeypatch.delenv("DEBERTA_FAST_CUDA_SAT_TERMS", raising=False)
        else:
            monkeypatch.setenv("DEBERTA_FAST_CUDA_SAT_TERMS", env)
        _, recs = launches(ext, getattr(ext, entry), **a)
        names = [r["kernel"] for r in recs]
        score = [r["params"] for r in recs if r["kernel"] in ("fwd", "bwd_dq", "bwd_dkdv")]
        assert len(score) == (1 if fwd else 2), names
        if env not in ("1", "On"):
            assert "sat_terms" not in names
            assert all(P["sat_terms_k"] == 0 == P["sat_terms_q"] for P in score)
            continue
        sat = [r for r in recs if r["kernel"] == "sat_terms"]
        assert names[:len(sat)] == ["sat_terms"] * len(sat), names
        assert [r["by_key"] for r in sat] == ([True] if fwd else [True, False])
        assert all(r["out"] != 0 and r["head_dim"] == a["q"].shape[-1] for r in sat)
        for P in score:
            assert P["sat_terms_k"] == sat[0]["out"]
            assert P["sat_terms_q"] == (0 if fwd else sat[1]["out"])


def test_saturated_terms_by_default_where_half_the_tiles_are_saturated(ext, monkeypatch):
    """Unset, the rule decides: launched when at least half of the 64 x 64 tiles lie beyond the band (a small band at
    L = 400: 30 of 49), not when fewer do (L = 300: 12 of 25)."""
    monkeypatch.delenv("DEBERTA_FAST_CUDA_SAT_TERMS", raising=False)
    for L, launched in ((400, True), (300, False)):
        a = fwd_args(Lq=L, Lk=L, masks=False)
        a.update(band_lo=-3, band_hi=3)
        assert (ext.saturated_fraction(L, L, -3, 3) >= 0.5) == launched
        _, recs = launches(ext, ext.fwd, **a)
        assert [r["kernel"] for r in recs] == (["sat_terms", "fwd"] if launched else ["fwd"])
        assert recs[-1]["params"]["sat_terms_k"] == (recs[0]["out"] if launched else 0)


def test_saturated_fraction_counts_the_tiles_beyond_the_band(ext):
    """The default rule's count (csrc/dfa_params.h, closed form per query tile) against every 64 x 64 tile tested as
    the kernels' tile_saturation tests it, over lengths and bands of either sign (DeBERTa-v3's, small and shifted)."""
    for lo, hi in [(-512, 506), (-32, 16), (-16, 3), (5, 9), (-300, -200), (-(1 << 30), 1 << 30)]:
        for Lq, Lk in [(1, 1), (64, 64), (65, 200), (270, 270), (512, 100), (1000, 2048)]:
            tiles = [(q0, k0) for q0 in range(0, Lq, 64) for k0 in range(0, Lk, 64)]
            sat = sum(q0 - (k0 + 63) >= hi or q0 + 63 - k0 <= lo for q0, k0 in tiles)
            assert ext.saturated_fraction(Lq, Lk, lo, hi) == pytest.approx(sat / len(tiles)), (lo, hi, Lq, Lk)


def test_band_window_is_cached_per_table():
    """Every layer's backward asks for the same window of the same cached table: computed once, recomputed after an
    in-place change of the table, dropped with the table, and equal to a fresh computation."""
    import gc

    from deberta_fast import _cuda_ext

    table = relative_slot_table(9, 11, 4, 8, span=4).to(torch.int32).clone()
    first = band_window(table, 9, 11, -3, 3, 8)
    assert band_window(table, 9, 11, -3, 3, 8) is first
    fresh = _cuda_ext._band_window(table, 9, 11, -3, 3, 8)
    assert first[:2] == fresh[:2] and all(torch.equal(a, b) for a, b in zip(first[2:], fresh[2:]))
    assert band_window(table, 9, 11, -2, 3, 8) is not first  # another band, another entry
    table[4] = table[5]  # in place: a new version of the table
    again = band_window(table, 9, 11, -3, 3, 8)
    assert again is not first and torch.equal(again[2], _cuda_ext._band_window(table, 9, 11, -3, 3, 8)[2])
    n = len(_cuda_ext._WINDOWS)
    del table, first, again, fresh
    gc.collect()
    assert len(_cuda_ext._WINDOWS) <= n - 3


def test_bwd_without_relative_terms_launches_no_band_reduction(ext):
    a = bwd_args(rel=False)
    (_, _, _, dc2p, dp2c), recs = launches(ext, ext.bwd, **a)
    assert [r["kernel"] for r in recs] == ["bwd_dq", "bwd_dkdv"] and dc2p.numel() == dp2c.numel() == 0
    for r in recs:
        P = r["params"]
        assert (P["band_q"], P["band_k"], P["S2"], P["W"]) == (0, 0, 0, 0)


def test_bwd_c2p_only_band(ext):
    a = bwd_args()
    a["pos_query"] = None
    (_, _, _, dc2p, dp2c), recs = launches(ext, ext.bwd, **a)
    assert [r["kernel"] for r in recs] == ["bwd_dq", "band_to_slots", "bwd_dkdv"] and dp2c.numel() == 0
    assert recs[0]["params"]["band_k"] == recs[2]["params"]["band_k"] == 0 and recs[1]["out"] == dc2p.data_ptr()
    assert recs[0]["params"]["pos_q"] == 0 and dc2p.shape == (2, 3, 5, 8)


def test_bwd_p2c_only_band(ext):
    a = bwd_args()
    a["pos_key"] = None
    (_, _, _, dc2p, dp2c), recs = launches(ext, ext.bwd, **a)
    assert [r["kernel"] for r in recs] == ["bwd_dq", "bwd_dkdv", "band_to_slots"] and dc2p.numel() == 0
    P = recs[1]["params"]
    assert (P["band_q"], P["pos_k"]) == (0, 0) and recs[2]["out"] == dp2c.data_ptr() and dp2c.shape == (2, 3, 7, 8)
    assert recs[0]["params"]["band_q"] == recs[0]["params"]["band_k"] == 0


def test_varlen_params(ext):
    a = varlen_fwd_args()
    (out, lse), [l] = launches(ext, ext.varlen_fwd, **a)
    P = l["params"]
    assert l["dtype"] == 1 and l["head_dim"] == 64
    assert (P["B"], P["H"], P["Lq"], P["Lk"], P["Tq"], P["Tk"], P["S2"]) == (3, 2, 5, 4, 8, 6, 8)
    assert (P["cu_q"], P["cu_k"]) == (a["cu_seqlens_q"].data_ptr(), a["cu_seqlens_k"].data_ptr())
    for name, t in (("q", a["q"]), ("k", a["k"]), ("v", a["v"]), ("o", out)):
        _expect_tensor(P, name, t, (0, t.stride(1), t.stride(0)))  # *_sb = 0: cu_seqlens select the sequence
    assert out.shape == (8, 2, 64) and lse.shape == (2, 8) and P["lse"] == lse.data_ptr()
    assert P["scale"] == _f32(0.1) and P["dropout"] == 0 and P["table"] == a["table"].data_ptr()


def test_varlen_bwd_params(ext):
    a = varlen_bwd_args()
    (dq, dk, _, dc2p, dp2c), recs = launches(ext, ext.varlen_bwd, **a)
    assert [r["kernel"] for r in recs] == ["bwd_dq", "band_to_slots", "bwd_dkdv", "band_to_slots"]
    P = recs[0]["params"]
    assert (P["cu_q"], P["Tq"], P["Tk"], P["B"]) == (a["cu_seqlens_q"].data_ptr(), 8, 6, 3)
    recs = [recs[0], recs[1], recs[3]]  # the score kernel, the two reductions
    _expect_tensor(P, "dq", dq, (0, dq.stride(1), dq.stride(0)))
    _expect_tensor(P, "dk", dk, (0, dk.stride(1), dk.stride(0)))
    assert (P["dout"], P["do_sb"], P["do_sr"]) == (a["dout"].data_ptr(), 0, a["dout"].stride(0))
    _expect_tensor(P, "o", a["out"], (0, a["out"].stride(1), a["out"].stride(0)))
    assert (recs[1]["rows"], recs[2]["rows"]) == (2 * 8, 2 * 6)  # band rows h*T + token
    assert (recs[1]["out"], recs[2]["out"]) == (dc2p.data_ptr(), dp2c.data_ptr())
    assert dc2p.shape == (2, 8, 8) and dp2c.shape == (2, 6, 8)  # [H, T, 2S]
    for r in recs[1:]:  # band_to_slots finds each row's sequence in cu_seqlens
        assert (r["params"]["cu_q"], r["params"]["cu_k"], r["params"]["Tq"], r["params"]["Tk"]) == \
            (a["cu_seqlens_q"].data_ptr(), a["cu_seqlens_k"].data_ptr(), 8, 6)
    assert (P["pos_k"], P["pos_q"], P["pk_sb"]) == (a["pos_key"].data_ptr(), a["pos_query"].data_ptr(), 0)


def test_varlen_without_tokens_launches_nothing(ext):
    a = varlen_fwd_args(lens_q=(0, 0), lens_k=(0, 0), rel=False)
    (out, lse), recs = launches(ext, ext.varlen_fwd, **a)
    assert recs == [] and out.shape == (0, 2, 64) and lse.shape == (2, 0)
    b = varlen_bwd_args(lens_q=(0, 0), lens_k=(0, 0), rel=False)
    _, recs = launches(ext, ext.varlen_bwd, **b)
    assert recs == []


def test_large_strides_reach_the_kernels_as_int64(ext):
    """Fault class 4: offsets b*stride / h*stride must not wrap.  Size-1 dims may carry any stride (no
    memory), so strides past 2^32 reach Params as given (int64 there and in every kernel product)."""
    L, D = 5, 32
    base = torch.randn(L * D).half()
    q = base.as_strided((1, 1, L, D), (2 ** 40, 2 ** 36 + 8, D, 1))
    a = fwd_args(B=1, H=1, Lq=L, Lk=L, rel=False, masks=False)
    a.update(q=q, k=q, v=q)
    _, [l] = launches(ext, ext.fwd, **a)
    assert (l["params"]["q_sb"], l["params"]["q_sh"]) == (2 ** 40, 2 ** 36 + 8)
    v = varlen_fwd_args(lens_q=(5,), lens_k=(5,), H=1, D=32, rel=False)
    t = base.as_strided((L, 1, D), (D, 2 ** 36, 1))
    v.update(q=t, k=t, v=t)
    _, [l] = launches(ext, ext.varlen_fwd, **v)
    assert l["params"]["q_sh"] == 2 ** 36


@pytest.mark.parametrize("kernel,entry,match", [
    ("fwd", "fwd", "cuda forward launch failed: stub error"),
    ("bwd_dq", "bwd", "cuda backward launch failed: stub error"),
    ("bwd_dkdv", "bwd", "cuda backward launch failed: stub error"),
    ("band_to_slots", "bwd", r"cuda backward \(c2p band\) failed: stub error"),
    ("fwd", "varlen_fwd", "cuda varlen forward launch failed: stub error"),
    ("bwd_dkdv", "varlen_bwd", "cuda varlen backward launch failed: stub error"),
])
def test_launch_errors_are_raised(ext, kernel, entry, match):
    ext.host_reset()
    ext.host_fail(kernel, "stub error")
    with pytest.raises(RuntimeError, match=match):
        getattr(ext, entry)(**ARGS[entry]())
    ext.host_reset()


# ----------------------------------------------------------------------------- validation
def _set(**kw):
    """A mutation of an argument dict: values, or functions of the dict."""
    return lambda a: a.update({k: v(a) if callable(v) else v for k, v in kw.items()})


def _no_rel(**kw):
    """`_set(**kw)`, and no relative term."""
    def mutate(a):
        a.update({k: None for k in ("pos_key", "pos_query", "table") if k in a})
        _set(**kw)(a)
    return mutate


def _qkv(fn):
    """A mutation replacing each of q, k, v by fn(it)."""
    return lambda a: a.update({n: fn(a[n]) for n in "qkv"})


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _misaligned(t):
    """Same shape and strides multiple of 8, base pointer 2 bytes off 16."""
    buf = torch.zeros(t.numel() + 8, dtype=t.dtype)
    return buf[1:1 + t.numel()].view(t.shape)


HALF = torch.float16
CU_32768 = torch.zeros(32769, dtype=torch.int32)  # 32768 sequences: N*H = 65536 with H = 2
BAD_PADDED = [
    ("float32", _qkv(lambda t: t.float()), "must be float16 or bfloat16"),
    ("q 3-D", _set(q=lambda a: a["q"][0]), "query must be 4-D"),
    ("k 3-D", _set(k=lambda a: a["k"][0]), "key must be 4-D"),
    ("head_dim 48", _qkv(lambda t: torch.zeros(*t.shape[:-1], 48, dtype=t.dtype)), "head_dim must be 32, 64 or 128"),
    ("Lq 0", _no_rel(q=lambda a: a["q"][:, :, :0]), "empty input"),
    ("B*H", _set(q=lambda a: a["q"][:1, :1].expand(65536, 1, 5, 32)), r"B\*H must be <= 65535"),
    ("too long", _set(q=lambda a: a["q"][:, :, :1].expand(2, 3, 2 ** 30, 32)), "sequence too long"),
    ("q on meta", _set(q=lambda a: _meta(a["q"])), "query must be a CUDA tensor"),
    ("k on meta", _set(k=lambda a: _meta(a["k"])), "key must be a CUDA tensor"),
    ("v dtype", _set(v=lambda a: a["v"].bfloat16()), "value has dtype"),
    ("v shape", _set(v=lambda a: a["v"][:, :, :-1]), "value has shape"),
    ("k batch", _set(k=lambda a: a["k"][:1]), "key has shape"),
    ("q last dim strided", _set(q=lambda a: torch.zeros(2, 3, 5, 64, dtype=HALF)[..., ::2]),
     "query must have a contiguous last dimension"),
    ("q misaligned", _set(q=lambda a: _misaligned(a["q"].contiguous())), "query rows must be 16-byte aligned"),
    ("v row stride", _set(v=lambda a: torch.zeros(2, 3, 7, 36, dtype=HALF)[..., :32]),
     "value rows must be 16-byte aligned"),
    ("table missing", _set(table=None), "relative terms need the slot table"),
    ("table int64", _set(table=lambda a: a["table"].long()), "slot table must be a contiguous int32"),
    ("table length", _set(table=lambda a: a["table"][:-1]), "slot table must be a contiguous int32"),
    ("table on meta", _set(table=lambda a: _meta(a["table"])), "slot table must be a contiguous int32"),
    ("key_mask uint8", _set(key_mask=lambda a: a["key_mask"].to(torch.uint8)), "key_mask must be a bool"),
    ("key_mask shape", _set(key_mask=torch.ones(2, 8, dtype=torch.bool)), "key_mask must be a bool"),
    ("key_mask strided", _set(key_mask=torch.ones(2, 14, dtype=torch.bool)[:, ::2]), "key_mask must be a bool"),
    ("uniform heads", _set(uniform=torch.zeros(2, 2, 5, dtype=torch.bool)), "uniform_rows must be a bool"),
    ("uniform dtype", _set(uniform=torch.zeros(2, 1, 5)), "uniform_rows must be a bool"),
    ("scale nan", _set(scale=math.nan), "scale must be finite"),
    ("scale inf", _set(scale=-math.inf), "scale must be finite"),
]
BAD_POS = [
    ("pos_key dtype", _set(pos_key=lambda a: a["pos_key"].bfloat16()), "pos_key must be a Half tensor"),
    ("pos_key on meta", _set(pos_key=lambda a: _meta(a["pos_key"])), "pos_key must be a Half tensor on cpu"),
    ("pos_key head dim", _set(pos_key=lambda a: a["pos_key"][..., :16]), r"pos_key must be \[H, 2\*span, D\]"),
    ("pos_query heads", _set(pos_query=lambda a: a["pos_query"][:, :2]), r"or \[B\|1, H, R, D\], got"),
    ("pos_query 2-D", _set(pos_query=lambda a: a["pos_query"][0, 0]), r"pos_query must be \[H, 2\*span, D\]"),
    ("rows differ", _set(pos_query=lambda a: a["pos_query"][:, :, :6]), "must have the same rows"),
    ("pos_key strided", _set(pos_key=lambda a: torch.zeros(3, 8, 64, dtype=HALF)[..., ::2]),
     "pos_key must have a contiguous last dimension"),
    ("pos_query misaligned", _set(pos_query=lambda a: _misaligned(a["pos_query"])), "16-byte aligned rows"),
    ("rows >= 2^31", _set(pos_key=lambda a: a["pos_key"][:, :1].expand(3, 2 ** 31, 32), pos_query=None),
     r"more than 2\^31 - 1 rows"),
    # two rows 2^31 elements apart (a lazily allocated 4 GB storage, never touched)
    ("rows 2^31 apart", _set(pos_key=lambda a: torch.empty(2 ** 31 + 32, dtype=HALF).as_strided((3, 2, 32),
                                                                                              (0, 2 ** 31, 1)),
                             pos_query=None), r"rows of one head span 2147483680 elements \(row stride 2147483648\)"),
]
BAD_BWD = [
    ("dout shape", _set(dout=lambda a: a["dout"][:, :, :-1]), "grad_out has shape"),
    ("dout misaligned", _set(dout=lambda a: _misaligned(a["dout"].contiguous())), "grad_out rows must be 16-byte"),
    ("out shape", _set(out=lambda a: a["out"][:, :, :-1]), "saved output must match the query"),
    ("out dtype", _set(out=lambda a: a["out"].float()), "saved output must match the query"),
    # the dq kernel reads its rows as 16-byte vectors (delta = rowsum(dO * O))
    ("out misaligned", _set(out=lambda a: _misaligned(a["out"].contiguous())), "saved output rows must be 16-byte"),
    ("out strided", _set(out=lambda a: torch.zeros(*a["out"].shape[:3], 2 * a["out"].shape[3],
                                                   dtype=a["out"].dtype)[..., ::2]),
     "saved output rows must be 16-byte aligned with a contiguous last dimension"),
    ("lse dtype", _set(lse=lambda a: a["lse"].half()), r"lse must be contiguous float32 \[B, H, Lq\]"),
    ("lse shape", _set(lse=lambda a: a["lse"][..., :-1]), r"lse must be contiguous float32 \[B, H, Lq\]"),
    ("lse strided", _set(lse=lambda a: a["lse"].transpose(0, 1).contiguous().transpose(0, 1)),
     r"lse must be contiguous float32"),
    ("dmin low", _set(dmin=-7), "band window"),
    ("dmin high", _set(dmin=2 ** 62), "band window"),
    ("W high", _set(dmin=-6, W=12), "band window"),
    # the window of band (-3, 3) reaches distances a narrower band saturates (whose tiles write no band entry)
    ("window beyond the band", _set(band_lo=-1, band_hi=1), r"must lie inside the saturation band \(band_lo"),
    ("W negative", _set(W=-1), "band window"),
    ("perm missing", _set(perm=None), "band perm must be int32"),
    ("perm int64", _set(perm=lambda a: a["perm"].long()), "band perm must be int32"),
    ("offs short", _set(offs=lambda a: a["offs"][:-1]), r"offs int32 \[2\*span\+1\] = \[9\]"),
    ("offs on meta", _set(offs=lambda a: _meta(a["offs"])), "band perm must be int32"),
]
BAD_VARLEN = [
    ("q 4-D", _set(q=lambda a: a["q"][None]), "varlen: query must be 3-D"),
    ("k 2-D", _set(k=lambda a: a["k"][0]), "varlen: key must be 3-D"),
    ("head_dim 48", _qkv(lambda t: torch.zeros(*t.shape[:-1], 48, dtype=t.dtype)), "head_dim must be 32, 64 or 128"),
    ("no heads", _qkv(lambda t: t[:, :0]), "no heads"),
    ("k on meta", _set(k=lambda a: _meta(a["k"])), "varlen: key must be a CUDA tensor"),
    ("v dtype", _set(v=lambda a: a["v"].half()), "varlen: value has dtype"),
    ("v tokens", _set(v=lambda a: a["v"][:-1]), r"varlen: value must be \[total_tokens=6"),
    ("q last dim strided", _set(q=lambda a: torch.zeros(8, 2, 128, dtype=torch.bfloat16)[..., ::2]),
     "query must have a contiguous last dimension"),
    ("q misaligned", _set(q=lambda a: _misaligned(a["q"])), "query rows must be 16-byte aligned"),
    ("cu_q one offset", _set(cu_seqlens_q=torch.zeros(1, dtype=torch.int32)), r"must hold N\+1 >= 2 offsets"),
    ("cu_q 2-D", _set(cu_seqlens_q=lambda a: a["cu_seqlens_q"][:, None]), "cu_seqlens_q must be a contiguous int32"),
    ("cu_k int64", _set(cu_seqlens_k=lambda a: a["cu_seqlens_k"].long()), "cu_seqlens_k must be a contiguous int32"),
    ("cu_k length", _set(cu_seqlens_k=lambda a: a["cu_seqlens_k"][:-1]), r"cu_seqlens_k .* \[N\+1\] = \[4\]"),
    ("cu_k strided", _set(cu_seqlens_k=torch.zeros(8, dtype=torch.int32)[::2]), "cu_seqlens_k must be a contiguous"),
    ("cu_q on meta", _set(cu_seqlens_q=lambda a: _meta(a["cu_seqlens_q"])), "cu_seqlens_q must be a contiguous"),
    ("N*H", _set(cu_seqlens_q=CU_32768, cu_seqlens_k=CU_32768),
     r"N\*H \(sequences x heads\) must be <= 65535"),
    ("max_q 0", _set(max_seqlen_q=0), "max_seqlen_q, max_seqlen_k must be >= 1"),
    ("max too long", _set(max_seqlen_q=2 ** 29, max_seqlen_k=2 ** 29), "max_seqlen_q, max_seqlen_k must be >= 1 with"),
    ("2^31 tokens", _no_rel(q=lambda a: a["q"][:1].expand(2 ** 31, 2, 64)),
     "total tokens must fit int32"),
    ("table length", _set(table=lambda a: a["table"][:-1]), "Lq\\+Lk-1 = 8"),
]
BAD_VARLEN_POS = [
    ("pos_key batched", _set(pos_key=lambda a: a["pos_key"][None]),
     r"pos_key must be \[H, 2\*span, D\] = \[2, R, 64\], got"),
    ("pos_query dtype", _set(pos_query=lambda a: a["pos_query"].half()), "pos_query must be a BFloat16 tensor"),
]
BAD_VARLEN_BWD = [
    ("dout tokens", _set(dout=lambda a: a["dout"][:-1]), r"grad_out must be \[total_tokens=8"),
    ("out shape", _set(out=lambda a: a["out"][:-1]), "saved output must match the query"),
    ("out misaligned", _set(out=lambda a: _misaligned(a["out"].contiguous())), "saved output rows must be 16-byte"),
    ("lse transposed", _set(lse=lambda a: a["lse"].t().contiguous()), r"lse must be contiguous float32 \[H, total_q\]"),
    ("W high", _set(dmin=-3, W=9), "band window"),
    ("window beyond the band", _set(band_hi=2), "must lie inside the saturation band"),
    ("offs missing", _set(offs=None), "band perm must be int32"),
]
BAD_DROPOUT = [
    *[(f"p={p}", _set(p_drop=p), r"dropout_p must be in \[0, 1\)") for p in (-0.1, 1.0, 1.5, math.nan, math.inf)],
    ("rng None", _set(rng=None), "dropout needs rng = int64 CUDA tensor .* got None"),
    ("rng int32", _set(rng=lambda a: a["rng"].int()), "dropout needs rng"),
    ("rng 3", _set(rng=torch.zeros(3, dtype=torch.int64)), "dropout needs rng"),
    ("rng strided", _set(rng=torch.zeros(4, dtype=torch.int64)[::2]), "dropout needs rng"),
    ("rng on meta", _set(rng=lambda a: _meta(a["rng"])), "dropout needs rng"),
]
CASES = ([("fwd", *c) for c in BAD_PADDED + BAD_POS] + [("bwd", *c) for c in BAD_PADDED + BAD_POS + BAD_BWD]
         + [("varlen_fwd", *c) for c in BAD_VARLEN + BAD_VARLEN_POS]
         + [("varlen_bwd", *c) for c in BAD_VARLEN + BAD_VARLEN_POS + BAD_VARLEN_BWD]
         + [(e, *c) for e in ARGS for c in BAD_DROPOUT])


@pytest.mark.parametrize("entry,case,mutate,match", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_inputs_raise_with_message(ext, entry, case, mutate, match):
    a = ARGS[entry](p=0.1)
    mutate(a)
    ext.host_reset()
    with pytest.raises(RuntimeError, match=match):
        getattr(ext, entry)(**a)
    assert ext.host_launches() == [], "a kernel was launched despite the failed check"


def test_valid_arguments_pass(ext):
    """The unmutated arguments of every entry point pass (so each bad case fails on its own defect)."""
    smoke(ext)


# ----------------------------------------------------------------------------- softmax row statistics
def test_rows_without_keys_get_lse_inf_and_zero_probabilities(ext):
    """Fault 9: dfa_softmax.h, the code the CUDA kernels run for the LSE epilogue (forward) and the
    base-2 LSE of the backward, executed here on the host.  A row with no key gets LSE = +inf (as the
    Triton kernels write) and any non-finite LSE a caller passes gives p = exp2(s - lse2) = 0, never NaN.
    The kernels' use of these helpers is checked on a GPU only (test_gpu_*_lse / empty-row tests)."""
    assert ext.row_lse(-math.inf, 0.0) == math.inf and ext.row_lse(3.0, 0.0) == math.inf
    assert ext.row_lse(2.0, 4.0) == pytest.approx((2.0 + 2.0) * math.log(2), rel=1e-6)
    for lse in (-math.inf, math.inf, math.nan):
        lse2 = ext.lse_log2(lse)
        assert lse2 == math.inf
        for s in (-math.inf, -1e30, 0.0, 1e30):
            assert np.exp2(np.float32(s) - np.float32(lse2)) == 0.0
    assert ext.lse_log2(1.5) == _f32(np.float32(1.5) * np.float32(1.4426950408889634))
    # a row with keys: sum_j exp2(s_j - lse2) == 1
    s = np.array([0.5, -3.0, 2.25, -np.inf], dtype=np.float32)
    m = float(s.max())
    lse2 = ext.lse_log2(ext.row_lse(m, float(np.exp2(s - m).sum())))
    assert float(np.exp2(s - np.float32(lse2)).sum()) == pytest.approx(1.0, rel=1e-6)


# ----------------------------------------------------------------------------- builds
@pytest.mark.skipif(not os.path.isdir("/proc/self/cwd"), reason="the dead-build check reads /proc (Linux)")
@pytest.mark.parametrize("lock", ["none", "dead", "fresh", "live"])
def test_a_dead_builds_lock_is_removed_under_the_guard(tmp_path, monkeypatch, lock):
    """torch's ``lock`` file, left in the build directory by a killed build, made every later build of the
    extension wait forever.  ``_load_extension`` holds an exclusive flock (released when its process dies) around
    torch's build and removes a ``lock`` over a minute old with no process running in the directory ("dead"), with
    a warning; one younger ("fresh") or with a process there ("live": a build by code that takes no flock) stays
    for torch to wait on.  torch's ``load`` is faked here."""
    import fcntl
    import time
    import warnings

    from deberta_fast import _cuda_ext
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir = tmp_path / "some_ext"
    build_dir.mkdir()
    if lock != "none":
        (build_dir / "lock").touch()
        if lock != "fresh":
            old = time.time() - 120
            os.utime(build_dir / "lock", (old, old))
    seen = {}

    def fake_load(name, build_directory, **kwargs):
        with open(build_dir / ".deberta_fast_build.flock") as other:  # another process's view of the guard
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.update(name=name, build_directory=build_directory, lock=(build_dir / "lock").exists(), **kwargs)
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    builder = subprocess.Popen(["sleep", "60"], cwd=build_dir) if lock == "live" else None
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert _cuda_ext._load_extension("some_ext", sources=["a.cpp"]) == "module"
    finally:
        if builder is not None:
            builder.kill()
            builder.wait()
    kept = lock in ("fresh", "live")
    assert seen == dict(name="some_ext", build_directory=str(build_dir), lock=kept, sources=["a.cpp"])
    msgs = [str(x.message) for x in w if "was killed" in str(x.message)]
    assert len(msgs) == (lock == "dead") and all(str(build_dir / "lock") in m for m in msgs)
    with open(build_dir / ".deberta_fast_build.flock") as again:  # released after the build
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)


if __name__ == "__main__":
    smoke(build(verbose=os.environ.get("VERBOSE", "0") == "1"))
    print("host-test extension: built and every entry point called")
