"""The Triton forward without tables (``REL_SOURCE = "skew"``, the GPU A/B of ``benchmarks.breakdown``): band tiles
from window products skewed through a per-program scratch, saturated tiles from in-kernel per-row / per-key terms.
Output and log-sum-exp against the float64 reference (every term, bucket config, mask kind, Lq != Lk, 4-D position
tables, packed calls, head groups), the same dropout keep-mask as the tables path, and the backward (which keeps its
tables) from the skew forward's statistics.  Interpreter on CPU (tests/conftest.py)."""
import pytest
import torch

from deberta_fast import disentangled_attention, disentangled_attention_varlen

from triton_cases import (BUCKETED, UNBUCKETED, V3, assert_close_fp32, assert_close_lowp, grads, make_inputs,
                          max_err, reference_fn, reference_forward_lse, triton_fn, triton_forward_lse)

pytest.importorskip("triton")
launch = pytest.importorskip("deberta_fast._kernels.triton_attention_launch")


@pytest.fixture
def skew(monkeypatch):
    """``REL_SOURCE = "skew"``; yields the list of each launch's ``SKEW`` flag."""
    monkeypatch.setattr(launch, "REL_SOURCE", "skew")
    used = []
    real = launch._rel_args

    def counting(*a):
        res = real(*a)
        used.append(res[4])
        return res
    monkeypatch.setattr(launch, "_rel_args", counting)
    return used


@pytest.mark.parametrize("terms", ["both", "c2p", "p2c"])
@pytest.mark.parametrize("buckets,mask,Lq,Lk", [
    (BUCKETED, "key", 45, 70), (V3, "none", 70, 45), (UNBUCKETED, "full", 33, 33), (BUCKETED, "full_h1", 17, 100)])
def test_forward_fp32(skew, terms, buckets, mask, Lq, Lk):
    q, k, v, pk, pq, m, kw = make_inputs(2, 3, Lq, Lk, 16, terms=terms, buckets=buckets, mask=mask)
    out, lse = triton_forward_lse(q, k, v, pk, pq, m, kw)
    ref, ref_lse = reference_forward_lse(q, k, v, pk, pq, m, kw, torch.float64)
    assert skew and all(skew), "the skew path did not run"
    assert_close_fp32(out, ref, what="out")
    assert_close_fp32(lse, ref_lse, what="lse")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_forward_low_precision_batched_pos(skew, dtype):
    q, k, v, pk, pq, m, kw = make_inputs(2, 2, 64, 40, 32, buckets=BUCKETED, pos_batched=True, mask="key")
    ts = [t.to(dtype) for t in (q, k, v, pk, pq)]
    out = disentangled_attention(*ts, attention_mask=m, backend="triton", **kw)
    ref = reference_fn(m, kw)(*[t.double() for t in (q, k, v, pk, pq)])
    low = reference_fn(m, kw)(*ts)
    assert all(skew)
    assert_close_lowp(out, ref, low, what="out")


def test_dropout_keep_mask_is_the_tables_paths(monkeypatch, skew):
    """Same seed, same keep-mask: the two paths differ by rounding only (a different mask differs by O(1))."""
    q, k, v, pk, pq, m, kw = make_inputs(2, 2, 50, 50, 16, buckets=BUCKETED, mask="key")
    outs = []
    for src in ("tables", "skew"):
        monkeypatch.setattr(launch, "REL_SOURCE", src)
        torch.manual_seed(3)
        outs.append(disentangled_attention(q, k, v, pk, pq, attention_mask=m, backend="triton", dropout_p=0.3, **kw))
    assert max_err(outs[0], outs[1]) <= 1e-5 * outs[0].abs().max().item()


def test_backward_from_the_skew_forward(skew):
    q, k, v, pk, pq, m, kw = make_inputs(1, 2, 45, 70, 16, buckets=BUCKETED, mask="key")
    ts, do = (q, k, v, pk, pq), torch.randn(1, 2, 45, 16)
    got = grads(triton_fn(m, kw), ts, torch.float32, do)
    ref = grads(reference_fn(m, kw), ts, torch.float64, do)
    for g, r in zip(got, ref):
        assert_close_fp32(g, r, tol=2e-5)


def test_packed_and_head_groups(monkeypatch, skew):
    H, D = 3, 16
    lens = [23, 1, 40, 9]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    T = sum(lens)
    q, k, v = torch.randn(T, H, D), torch.randn(T, H, D), torch.randn(T, H, D)
    pk, pq = torch.randn(H, 16, D), torch.randn(H, 16, D)
    kw = dict(position_buckets=BUCKETED[0], max_relative_positions=BUCKETED[1])
    monkeypatch.setattr(launch, "TABLE_BUDGET", 1)  # a launch per head
    out = disentangled_attention_varlen(q, k, v, pk, pq, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=40,
                                        max_seqlen_k=40, backend="triton", **kw)
    assert len(skew) == H and all(skew)
    for n in range(len(lens)):
        s = slice(cu[n].item(), cu[n + 1].item())
        one = [t[s].transpose(0, 1)[None] for t in (q, k, v)]
        ref = disentangled_attention(*one, pk, pq, backend="torch", **kw)[0].transpose(0, 1)
        assert_close_fp32(out[s], ref, what=f"sequence {n}")

