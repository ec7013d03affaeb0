"""The forward's ``DEBERTA_FAST_TRITON_TMA=1`` experiment: ``Q`` and the saturated loop's ``K`` / ``V`` tiles read
through tensor descriptors (TMA on sm_90) give the pointer loads' result, on the sm_90 launch configs, padded and
packed; calls it cannot serve (misaligned pointers or strides, float32, sm_8x) take the pointer loads.  Under the
interpreter the two read the same values, so output and statistics are bitwise equal; on a GPU within fp16 rounding
(the compiled kernels may schedule differently)."""
import pytest
import torch

from deberta_fast import disentangled_attention_varlen
from triton_cases import BUCKETED, V3, make_inputs, make_mask, triton_forward_lse

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9,
                                reason="the TMA loads are an sm_90 path (on a GPU the tests need Hopper)")


@pytest.fixture
def launch():
    from deberta_fast._kernels import triton_attention_launch as launch

    return launch


@pytest.fixture
def sm90_configs(monkeypatch, launch):
    """The sm_90 16-bit launch configs (64-row tiles, 128-key saturated tiles; TMA is an sm_90 path) under the
    interpreter too."""
    def gpu_config(pass_, q_len, k_len, head_dim, fp32_ieee=False, **kw):
        varlen = kw.get("varlen", False)
        full, aligned = kw.get("full_mask", False) and not varlen, not varlen and q_len % 16 == 0 and k_len % 16 == 0
        return launch._gpu_config(pass_, max(16, launch._next_pow2(head_dim)), max(q_len, k_len) <= 64, False, False,
                                  90, varlen, kw.get("dropout", False), full, aligned)

    monkeypatch.setattr(launch, "launch_config", gpu_config)


def _same(a, b, what):
    if a.is_cuda:
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3, msg=what)
    else:
        assert torch.equal(a, b), f"{what}: TMA and pointer loads differ ({(a.float() - b.float()).abs().max()})"


def _both(launch, fn):
    """``fn()`` with the experiment off, then on: ``(result_off, result_on)``, each run's TMA use asserted."""
    with launch.use_tma(False):
        off = fn()
        assert not launch.last_forward_tma()
    with launch.use_tma(True):
        on = fn()
        used = launch.last_forward_tma()
    return off, on, used


CASES = {  # (B, H, Lq, Lk, D, terms, buckets, mask, dtype, dropout)
    "v3-key-mask": (2, 2, 150, 150, 64, "both", V3, "key", torch.float16, 0.0),
    "bucketed-ragged": (1, 2, 301, 301, 64, "both", BUCKETED, "key", torch.bfloat16, 0.0),
    "head-dim-24": (2, 1, 97, 97, 24, "both", BUCKETED, "key", torch.float16, 0.0),
    "head-dim-48": (1, 2, 160, 160, 48, "both", BUCKETED, "key", torch.float16, 0.0),  # (BLOCK_D = 64 > D)
    "cross-lengths": (1, 2, 70, 261, 32, "both", BUCKETED, "none", torch.float16, 0.0),
    "full-mask": (2, 2, 77, 77, 64, "both", BUCKETED, "full", torch.float16, 0.0),
    "c2p-dropout": (1, 2, 140, 140, 64, "c2p", BUCKETED, "key", torch.bfloat16, 0.2),
    "p2c": (1, 1, 200, 200, 128, "p2c", BUCKETED, "none", torch.float16, 0.0),
    "no-relative-terms": (1, 2, 90, 90, 64, "none", BUCKETED, "key", torch.float16, 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tma_forward_equals_pointer_loads(sm90_configs, launch, case):
    B, H, Lq, Lk, D, terms, buckets, mask, dtype, p = CASES[case]
    q, k, v, pk, pq, _, kw = make_inputs(B, H, Lq, Lk, D, terms=terms, buckets=buckets)
    m = make_mask(mask, B, H, Lq, Lk)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    pk, pq = (None if t is None else t.to(dtype) for t in (pk, pq))
    off, on, used = _both(launch, lambda: triton_forward_lse(q, k, v, pk, pq, m, kw, dropout_p=p, seed=7))
    assert used, "the experiment did not read through tensor descriptors"
    for name, a, b in zip(("out", "lse"), on, off):
        assert not torch.isnan(a.float()).any() or name == "lse"
        _same(a, b, name)


def test_tma_head_groups(sm90_configs, launch, monkeypatch):
    """Heads in groups (views at a head offset: each group's base 16-byte aligned through the head stride)."""
    monkeypatch.setattr(launch, "TABLE_BUDGET", 100)
    q, k, v, pk, pq, _, kw = make_inputs(2, 3, 130, 130, 64, buckets=BUCKETED)
    q, k, v, pk, pq = (t.half() for t in (q, k, v, pk, pq))
    off, on, used = _both(launch, lambda: triton_forward_lse(q, k, v, pk, pq, None, kw))
    assert used
    for name, a, b in zip(("out", "lse"), on, off):
        _same(a, b, name)


def test_tma_packed(sm90_configs, launch):
    """Packed sequences (each its own descriptor, rows past its end read as 0), one empty and one without keys."""
    lens_q, lens_k = [150, 0, 61, 1, 97], [150, 3, 0, 40, 97]
    cq = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    ck = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    H, D = 2, 64
    q = torch.randn(sum(lens_q), H, D, dtype=torch.float16)
    k, v = (torch.randn(sum(lens_k), H, D, dtype=torch.float16) for _ in range(2))
    pk, pq = (torch.randn(H, 16, D, dtype=torch.float16) for _ in range(2))

    def run():
        return disentangled_attention_varlen(q, k, v, pk, pq, cq, ck, max(lens_q), max(lens_k), position_buckets=4,
                                             max_relative_positions=8, backend="triton", check_offsets=False)

    off, on, used = _both(launch, run)
    assert used
    _same(on, off, "out")


def test_tma_refusals_take_the_pointer_loads(launch):
    """Where TMA cannot read the inputs the forward launches the pointer loads, with the same result."""
    q, k, v, pk, pq, _, kw = make_inputs(1, 2, 80, 80, 64, buckets=BUCKETED)
    q, k, v, pk, pq = (t.half() for t in (q, k, v, pk, pq))
    # a pointer 2 bytes past an aligned one (strides fine): refused per call, the plan's pointer-load arguments
    qs = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape).copy_(q)
    # a row stride of 68 elements (136 bytes): refused by the plan
    ks = torch.empty(*k.shape[:-1], 68, dtype=k.dtype)[..., :64].copy_(k)
    for args in ((qs, k, v), (q, ks, v)):
        off, on, used = _both(launch, lambda: triton_forward_lse(*args, pk, pq, None, kw))
        assert not used
        _same(on[0], off[0], "out")
    assert launch.tma_problem(q, ks, v, 90) == "k's strides (10880, 5440, 68, 1) are not multiples of 16 bytes"
    assert launch.tma_problem(q, k, v, 80) == "sm_80: the TMA loads are built and checked for sm_90 only"
    assert launch.tma_problem(q, k, v, 100) == "sm_100: the TMA loads are built and checked for sm_90 only"
    assert launch.tma_problem(q.float(), k.float(), v.float(), 90) == "torch.float32 inputs (16-bit only)"
    assert launch.tma_problem(q, k, v, 90) is None


def test_tma_plan_cache_serves_misaligned_pointers_the_pointer_loads(launch):
    """With the launcher's own configs (plans cached): an aligned call caches a TMA plan; a call of the same signature
    whose pointer is misaligned takes the plan's pointer-load arguments, the next aligned one TMA again."""
    assert not launch._configs_replaced()
    q, k, v, pk, pq, _, kw = make_inputs(1, 2, 70, 70, 32, buckets=BUCKETED)
    q, k, v, pk, pq = (t.half() for t in (q, k, v, pk, pq))
    qs = torch.empty(q.numel() + 8, dtype=q.dtype)[1:1 + q.numel()].view(q.shape).copy_(q)  # same strides, +2 bytes
    with launch.use_tma(False):
        ref = triton_forward_lse(q, k, v, pk, pq, None, kw)
    with launch.use_tma(True):
        for x, tma in ((q, True), (qs, False), (q, True)):
            out = triton_forward_lse(x, k, v, pk, pq, None, kw)
            assert launch.last_forward_tma() is tma and len(launch._FWD_PLANS) == 2  # (and the ref's, without)
            _same(out[0], ref[0], "out")


def test_tma_scratch_allocator_restores_the_callers(launch):
    """The launches' descriptor scratch comes from torch's allocator and the caller's Triton allocator is back
    after each launch (re-entered per head group); CPU tensors need none."""
    from triton.runtime import _allocation

    assert launch._descriptor_scratch(torch.device("cpu")) is launch._NO_SCRATCH

    def mine(size, alignment, stream):
        raise AssertionError("not called")

    token = _allocation._allocator.set(mine)
    try:
        scratch = launch._DescriptorScratch(torch.device("cuda", 0))
        for _ in range(2):
            with scratch:
                alloc = _allocation._allocator.get()
                assert alloc is not mine and alloc.func is launch._scratch
            assert _allocation._allocator.get() is mine
    finally:
        _allocation._allocator.reset(token)
