"""Triton forward (output and LSE) against the float64 reference; dispatch and refusals.
Runs under the Triton interpreter on CPU (tests/conftest.py)."""
import pytest
import torch

import deberta_fast
from deberta_fast import disentangled_attention
from deberta_fast.backends.triton_backend import TritonBackend
from deberta_fast.dispatch import BackendUnavailableError, build_call

from triton_cases import (BUCKETED, UNBUCKETED, V3, assert_close_fp32, assert_close_lowp, make_inputs,
                          reference_forward_lse, triton_forward_lse)

pytest.importorskip("triton")


def check_fp32(B, H, Lq, Lk, D, **kw):
    q, k, v, pk, pq, mask, akw = make_inputs(B, H, Lq, Lk, D, **kw)
    out, lse = triton_forward_lse(q, k, v, pk, pq, mask, akw)
    ref, ref_lse = reference_forward_lse(q, k, v, pk, pq, mask, akw, torch.float64)
    assert out.dtype == torch.float32 and out.shape == (B, H, Lq, D) and lse.shape == (B, H, Lq)
    assert_close_fp32(out, ref, what="out")
    assert_close_fp32(lse, ref_lse, what="lse")


@pytest.mark.parametrize("buckets", [BUCKETED, UNBUCKETED, V3], ids=["bucketed", "unbucketed", "v3"])
@pytest.mark.parametrize("terms", ["both", "c2p", "p2c", "none"])
def test_terms_and_buckets(terms, buckets):
    check_fp32(2, 2, 70, 45, 16, terms=terms, buckets=buckets, mask="key")


@pytest.mark.parametrize("mask", ["none", "key", "full"])
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (17, 17), (64, 64), (200, 200), (17, 64), (64, 17), (1, 33), (33, 1)])
def test_lengths_and_masks(Lq, Lk, mask):
    check_fp32(2, 2, Lq, Lk, 16, mask=mask)


@pytest.mark.parametrize("mask", ["full_b1", "full_h1", "full3d"])
def test_broadcast_full_masks(mask):
    check_fp32(2, 3, 40, 50, 16, mask=mask)


@pytest.mark.parametrize("terms", ["both", "c2p"])
def test_batched_pos_tensors(terms):
    check_fp32(2, 2, 50, 50, 16, terms=terms, pos_batched=True, mask="key")


@pytest.mark.parametrize("D", [16, 24, 32, 64])
def test_head_dims_fp32(D):
    check_fp32(1, 2, 40, 40, D, mask="key")


@pytest.mark.parametrize("mask", ["none", "key"])
def test_long_sequence_saturated_v3(mask):
    """DeBERTa-v3 buckets at L=700: tiles beyond the band (|i-j| >= 506 or <= -512) take the saturated path.  With a
    key-padding mask the rows far enough from the keys are padded (uniform) rows, hence the unmasked case."""
    check_fp32(1, 1, 700, 700, 16, buckets=V3, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mask,D,Lq,Lk", [("none", 16, 100, 80), ("key", 32, 64, 64), ("full", 24, 33, 70)])
def test_low_precision(dtype, mask, D, Lq, Lk):
    q, k, v, pk, pq, m, kw = make_inputs(2, 2, Lq, Lk, D, mask=mask)
    ts = [t.to(dtype) if t is not None else None for t in (q, k, v, pk, pq)]
    out, lse = triton_forward_lse(*ts, m, kw)
    assert out.dtype == dtype
    ref, ref_lse = reference_forward_lse(*ts, m, kw, torch.float64)
    low, low_lse = reference_forward_lse(*ts, m, kw, dtype)
    assert_close_lowp(out, ref, low, what="out")
    assert_close_lowp(lse, ref_lse, low_lse, what="lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mask", ["none", "key"])
def test_row_max_growing_over_key_tiles(dtype, mask):
    """Scores that grow along the keys, by 0 to ~40 (log2 units) from one key tile to the next: the lazy rescale
    (the reference max moves only past a growth of 8) must keep every probability finite in fp16 (and in fp32,
    where the total growth passes 2**128) and give the reference's output and log-sum-exp."""
    B, H, L, D = 1, 2, 150, 16
    q, k, v, pk, pq, m, kw = make_inputs(B, H, L, L, D, mask=mask)
    ramp = torch.linspace(-1.0, 1.0, L) ** 3 * 60  # flat in the middle, steep at the ends
    k = k + ramp[:, None]  # q . k gains ramp * sum(q) ~ 45 ramp: up to ~400 in log2 units
    q = q.abs() + 1.0
    ts = [t.to(dtype) for t in (q, k, v, pk, pq)]
    out, lse = triton_forward_lse(*ts, m, kw)
    ref, ref_lse = reference_forward_lse(*ts, m, kw, torch.float64)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    if dtype == torch.float32:
        assert_close_fp32(out, ref, what="out")
        assert_close_fp32(lse, ref_lse, what="lse")
    else:
        low, low_lse = reference_forward_lse(*ts, m, kw, dtype)
        assert_close_lowp(out, ref, low, what="out")
        assert_close_lowp(lse, ref_lse, low_lse, what="lse")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mask", ["none", "key"])
def test_output_weights_sum_to_one(dtype, mask):
    """Columns of V constant over the keys (signed powers of two) come out exactly: the output's weights sum to 1.
    Without dropout the rows' sums are those of the probabilities as rounded for the ``P V`` product (a product
    with a tile of ones, rescaled with the output), over saturated and band tiles and a row maximum that grows from
    one key tile to the next; a wrong sum or a missed rescale moves the output off the constants."""
    B, H, L, D = 2, 2, 150, 16
    q, k, v, pk, pq, m, kw = make_inputs(B, H, L, L, D, mask=mask)
    k = k + (torch.linspace(-1.0, 1.0, L) ** 3 * 8)[:, None]  # the maxima grow along the keys
    c = torch.randint(-3, 4, (D,)).to(torch.float32).exp2() * (torch.randint(0, 2, (D,)) * 2 - 1)
    v = c.expand(B, H, L, D).contiguous()
    ts = [t.to(dtype) for t in (q, k, v, pk, pq)]
    out, lse = triton_forward_lse(*ts, m, kw)
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(out, c.to(dtype).expand_as(out), atol=0, rtol=0)


def test_dispatch_reports_triton():
    q, k, v, pk, pq, mask, kw = make_inputs(1, 2, 20, 20, 16, mask="key")
    out = disentangled_attention(q, k, v, pk, pq, attention_mask=mask, backend="triton", **kw)
    assert deberta_fast.last_backend() == "triton"
    ref = disentangled_attention(q, k, v, pk, pq, attention_mask=mask, backend="torch", **kw)
    assert_close_fp32(out, ref, what="out")
    disentangled_attention(q, k, v, pk, pq, attention_mask=mask, backend="auto", **kw)
    assert deberta_fast.last_backend() == "triton"


def _refusals(*ts, **kw):
    q, k, v, pk, pq = ts
    return TritonBackend().refusals(build_call(q, k, v, pk, pq, attention_mask=None, scale=None, dropout_p=0.0,
                                               position_buckets=4, max_relative_positions=8))


def test_refusals(monkeypatch):
    q, k, v, pk, pq, _, _ = make_inputs(1, 2, 8, 8, 16)
    assert _refusals(q, k, v, pk, pq) == []
    (msg,) = _refusals(*(t.double() for t in (q, k, v, pk, pq)))
    assert "float64" in msg and "backend='torch'" in msg
    big = make_inputs(1, 1, 4, 4, 260)[:5]
    (msg,) = _refusals(*big)
    assert "D=260" in msg and "256" in msg
    qt = torch.randn(1, 2, 16, 8).transpose(-1, -2)  # [1, 2, 8, 16] with last-dim stride 8
    (msg,) = _refusals(qt, k, v, pk, pq)
    assert "query" in msg and ".contiguous()" in msg
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, pk, pq = (t.cpu() for t in (q, k, v, pk, pq))  # CPU tensors without the interpreter
    (msg,) = _refusals(q, k, v, pk, pq)
    assert "needs CUDA tensors" in msg
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        disentangled_attention(q, k, v, pk, pq, position_buckets=4, max_relative_positions=8, backend="triton")
    disentangled_attention(q, k, v, pk, pq, position_buckets=4, max_relative_positions=8, backend="auto")
    assert deberta_fast.last_backend() == "torch"


def test_tables_too_large_for_int32_offsets_are_refused():
    """The kernels index a (b, h) block of the tables in int32: an unbucketed config whose tables span ~80k columns
    at L = 40000 is refused naming backend='torch'; DeBERTa-v3's buckets at the same length are served."""
    L = 40000
    q = torch.randn(1, 1, L, 8)
    wide = build_call(q, q, q, torch.randn(1, 2 * L, 8), None, attention_mask=None, scale=None, dropout_p=0.0,
                      position_buckets=-1, max_relative_positions=L)
    (msg,) = [m for m in TritonBackend().refusals(wide) if "int32" in m]
    assert "L=40000" in msg and "backend='torch'" in msg
    v3 = build_call(q, q, q, torch.randn(1, 512, 8), None, attention_mask=None, scale=None, dropout_p=0.0,
                    position_buckets=256, max_relative_positions=512)
    assert not [m for m in TritonBackend().refusals(v3) if "int32" in m]
    from deberta_fast._kernels.triton_attention_launch import int32_index_problem
    assert int32_index_problem(1000, 1000, 512, 1999) is None and int32_index_problem(2**20, 2**20, 2048, 1)


def test_rows_too_far_apart_for_int32_offsets_are_refused():
    """The loops' Q / K / V / dO tiles use int32 offsets within a (b, h) block: a row stride that would overflow them
    is refused with the reason (a stub: such a tensor needs 8 GB)."""
    from deberta_fast._kernels.triton_attention_launch import KMASK_PAD, row_offset_problem, rows_fit

    class Strided:
        def __init__(self, row, shape=(1, 64)):
            self.row, self.shape = row, shape

        def stride(self, dim):
            return self.row

    assert rows_fit(1024, 2**21 - KMASK_PAD - 1) and not rows_fit(1024, 2**21 - KMASK_PAD)
    ok, wide = Strided(64), Strided(2**20)
    assert row_offset_problem(ok, ok, ok, 4096, 4096) is None
    why = row_offset_problem(ok, ok, wide, 4096, 4096)
    assert "value" in why and "int32" in why and "backend='torch'" in why
    assert "query" in row_offset_problem(wide, ok, ok, 4096, 16, varlen=True)
    # packed [T, 1024 heads, D]: D = 40 runs on a copy padded to 48, whose row stride is what the kernels see
    d32, d40 = Strided(1024 * 32, (1024, 32)), Strided(1024 * 40, (1024, 40))
    assert rows_fit(1024 * 40, 49744) and not rows_fit(1024 * 48, 49744)
    assert row_offset_problem(d32, d32, d32, 49744, 49744, varlen=True) is None
    assert "query" in row_offset_problem(d40, d32, d32, 49744, 49744, varlen=True)


def test_custom_ops_opcheck():
    """Schema, fake (meta) implementation and torch.compile-friendliness of both custom ops."""
    q, k, v, pk, pq, mask, kw = make_inputs(1, 2, 9, 7, 16, mask="key")
    c = build_call(q, k, v, pk, pq, attention_mask=mask, scale=None, dropout_p=0.0, **kw)
    args = (q, k, v, pk, pq, c.key_mask, None, c.uniform_rows, 4, 8, c.span, c.scale, 0.0, None)
    torch.library.opcheck(torch.ops.deberta_fast.triton_fwd, args, test_utils=("test_schema", "test_faketensor"))
    out, stats = torch.ops.deberta_fast.triton_fwd(*args)
    bargs = (torch.randn_like(out), q, k, v, pk, pq, out, stats, c.key_mask, None, c.uniform_rows,
             4, 8, c.span, c.scale, 0.0, None)
    torch.library.opcheck(torch.ops.deberta_fast.triton_bwd, bargs, test_utils=("test_schema", "test_faketensor"))
    seed = torch.tensor([2**40 + 3])  # dropout: the seed an int64 [1] tensor on the inputs' device
    for op, a in ((torch.ops.deberta_fast.triton_fwd, args), (torch.ops.deberta_fast.triton_bwd, bargs)):
        torch.library.opcheck(op, (*a[:-2], 0.1, seed), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bad,words", [  # (the bad tensors made in the test, on the inputs' device)
    (lambda: dict(span=5000), "rows"),  # tables of 8 rows indexed up to 2 * span (the interpreter crashed on it)
    (lambda: dict(key_mask=torch.ones(2, 1, dtype=torch.bool)), "key_mask must be"),
    (lambda: dict(uniform_rows=torch.ones(1, 1, 1, dtype=torch.bool)), "uniform_rows must be"),
    (lambda: dict(uniform_rows=torch.ones(1, 1, 9)), "bool"),
    (lambda: dict(key_mask=None), "uniform_rows without"),
    (lambda: dict(full_mask=torch.ones(1, 2, 9, 6, dtype=torch.bool), key_mask=None), "full_mask must be"),
    (lambda: dict(pos_key=torch.randn(2, 8, 8)), "rows of 8"),
    (lambda: dict(v=torch.randn(1, 2, 7, 16, dtype=torch.float64)), "v is torch.float64"),
    (lambda: dict(k=torch.randn(1, 2, 7, 12)), "do not match"),
    (lambda: dict(dropout_p=1.0), "dropout_p"),
    (lambda: dict(stats=torch.zeros(2, 1, 2, 8)), "stats"),
])
def test_custom_ops_refuse_bad_arguments(bad, words):
    """A direct call of ``deberta_fast::triton_fwd`` / ``triton_bwd`` (the dispatcher validates its own calls): an
    error naming the argument, not an out-of-bounds read in the kernels."""
    q, k, v, pk, pq, mask, kw = make_inputs(1, 2, 9, 7, 16, mask="key")
    c = build_call(q, k, v, pk, pq, attention_mask=mask, scale=None, dropout_p=0.0, **kw)
    a = dict(q=q, k=k, v=v, pos_key=pk, pos_query=pq, key_mask=c.key_mask, full_mask=None,
             uniform_rows=c.uniform_rows, position_buckets=4, max_relative_positions=8, span=c.span, scale=c.scale,
             dropout_p=0.0, seed=None)
    out, stats = torch.ops.deberta_fast.triton_fwd(*a.values())
    b = dict(do=torch.randn_like(out), **{n: a[n] for n in ("q", "k", "v", "pos_key", "pos_query")}, out=out,
             stats=stats, **{n: a[n] for n in list(a)[5:]})
    bad = {n: x.to(q.device) if isinstance(x, torch.Tensor) else x for n, x in bad().items()}
    fwd_bad = {n: x for n, x in bad.items() if n in a}
    if fwd_bad:
        with pytest.raises(ValueError, match=words):
            torch.ops.deberta_fast.triton_fwd(*{**a, **fwd_bad}.values())
    with pytest.raises(ValueError, match=words):
        torch.ops.deberta_fast.triton_bwd(*{**b, **bad}.values())


def test_strided_inputs_without_copies():
    """HF layout: q/k/v are [B,L,H,D] tensors viewed as [B,H,L,D] (last dim contiguous)."""
    q, k, v, pk, pq, mask, kw = make_inputs(2, 3, 30, 30, 16, mask="key")
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qs.is_contiguous()
    out, lse = triton_forward_lse(qs, ks, vs, pk, pq, mask, kw)
    ref, ref_lse = reference_forward_lse(q, k, v, pk, pq, mask, kw, torch.float64)
    assert_close_fp32(out, ref, what="out")
    assert_close_fp32(lse, ref_lse, what="lse")


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_table_gemm_float32_tables(dev, dtype):
    """The C2P / P2C tables are float32 ``x @ pos^T`` in every layout (on CUDA fp16/bf16: tensor-core
    GEMM with float32 output, equal to the float32 GEMM up to summation order)."""
    from deberta_fast._kernels.triton_attention_launch import _table_gemm

    for x, pos in ((torch.randn(2, 3, 37, 24), torch.randn(3, 41, 24)),          # [B,H,L,D] x [H,R,D]
                   (torch.randn(2, 3, 37, 24), torch.randn(2, 3, 41, 24)),       # batched pos
                   (torch.randn(1, 3, 37, 24), torch.randn(3, 41, 24)),          # batch 1: one 3-D bmm
                   (torch.randn(37, 3, 24).transpose(0, 1), torch.randn(3, 41, 24))):  # packed [H,T,D] view
        x, pos = x.to(dev, dtype), pos.to(dev, dtype)
        want = x.double() @ pos.double().transpose(-1, -2)
        for keep_batch in (True, False):  # False: a batch-1 result as [H, L, R] (the kernels read it by pointer)
            got = _table_gemm(x, pos, keep_batch)
            shape = want.shape[1:] if not keep_batch and x.dim() == 4 and x.shape[0] == 1 else want.shape
            assert got.dtype == torch.float32 and got.shape == shape and got.is_contiguous()
            assert (got.double() - want.reshape(shape)).abs().max().item() <= 1e-5 * want.abs().max().item()


# ------------------------------------------------------------------ eager fast path around the custom ops

def test_eager_calls_skip_the_custom_op_dispatch_but_tracers_see_the_op():
    """In eager mode with plain tensors the autograd functions call the ops' implementations directly (the op's
    dispatch is host time for nothing); a torch function / dispatch mode (FakeTensor, export, compile) or a tensor
    subclass goes through the custom op."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode

    from deberta_fast.backends.triton_backend import _direct

    t = torch.randn(2, 3)
    assert _direct(t, None, t)
    assert not _direct(t, torch.nn.Parameter(torch.randn(2)))
    with TorchFunctionMode():
        assert not _direct(t)
    with FakeTensorMode():
        assert not _direct(t)
    # torch.set_default_device's mode only picks constructors' device (the GPU test runs use it): direct
    prev = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        assert _direct(t, None, t)
        with TorchFunctionMode():
            assert not _direct(t)
    finally:
        torch.set_default_device(None if prev.type == "cpu" else prev)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_eager_fast_path_equals_the_custom_op(monkeypatch, packed):
    """Forward and all five gradients, with dropout, bitwise equal through the direct path and the custom op."""
    from deberta_fast import disentangled_attention_varlen
    from deberta_fast.backends import triton_backend

    q, k, v, pk, pq, mask, kw = make_inputs(2, 2, 23, 23, 16, mask="key")
    do = torch.randn(2, 2, 23, 16)

    def run():
        ts = [t.clone().requires_grad_() for t in (q, k, v, pk, pq)]
        torch.manual_seed(7)
        if packed:
            a, b, c = (t.transpose(1, 2).reshape(46, 2, 16) for t in ts[:3])
            cu = torch.tensor([0, 23, 46], dtype=torch.int32)
            out = disentangled_attention_varlen(a, b, c, ts[3], ts[4], cu, cu, 23, 23, dropout_p=0.25,
                                                backend="triton", **kw)
            out = out.reshape(2, 23, 2, 16).transpose(1, 2)
        else:
            out = disentangled_attention(*ts, attention_mask=mask, dropout_p=0.25, backend="triton", **kw)
        return [out] + list(torch.autograd.grad(out, ts, do))

    calls = []
    real = triton_backend._direct
    monkeypatch.setattr(triton_backend, "_direct", lambda *t: calls.append(real(*t)) or calls[-1])
    fast = run()
    assert calls == [True, True]
    monkeypatch.setattr(triton_backend, "_direct", lambda *t: False)
    slow = run()
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_host_integer_helpers_match_triton():
    """The launcher's plain ``_next_pow2`` / ``_cdiv`` (triton's are constexpr functions, ~6 us per call)."""
    import triton

    from deberta_fast._kernels.triton_attention_launch import _cdiv, _next_pow2

    assert all(_next_pow2(n) == triton.next_power_of_2(n) for n in range(1, 4100))
    assert all(_cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 300) for b in range(1, 70))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_inference_skips_the_autograd_function(monkeypatch, packed):
    """Nothing requires grad (or grad mode is off): the launcher runs without the autograd function (its
    ``apply`` is host time on every inference call), with the same output; with grad it is used."""
    from deberta_fast import disentangled_attention_varlen
    from deberta_fast.backends import triton_backend

    q, k, v, pk, pq, mask, kw = make_inputs(1, 2, 19, 19, 16, mask="key")
    cu = torch.tensor([0, 19], dtype=torch.int32)

    def run(*ts):
        if packed:
            return disentangled_attention_varlen(*(t[0].transpose(0, 1) for t in ts[:3]), *ts[3:], cu, cu, 19, 19,
                                                 backend="triton", **kw)
        return disentangled_attention(*ts, attention_mask=mask, backend="triton", **kw)

    applied = []
    for fn in (triton_backend.TritonAttentionFunction, triton_backend.TritonVarlenFunction):
        monkeypatch.setattr(fn, "apply", classmethod(lambda cls, *a, _real=fn.apply: applied.append(1) or _real(*a)))
    plain = run(q, k, v, pk, pq)
    with torch.no_grad():
        no_grad = run(*(t.clone().requires_grad_() for t in (q, k, v, pk, pq)))
    assert applied == [] and plain.grad_fn is None and no_grad.grad_fn is None
    graded = run(q.clone().requires_grad_(), k, v, pk, pq)
    assert applied == [1] and graded.grad_fn is not None
    assert torch.equal(plain, no_grad) and torch.equal(plain, graded.detach())
