"""The ``"cuda"`` backend: host-side logic on CPU, kernels against the fp64 reference on GPU."""
import itertools
import math

import numpy as np
import pytest
import torch

import deberta_fast
from deberta_fast import _cuda_ext, disentangled_attention, disentangled_attention_reference
from deberta_fast._linalg import add_product_
from deberta_fast.backends import BACKENDS
from deberta_fast.dispatch import BackendUnavailableError, build_call
from deberta_fast.positions import (attention_span, relative_slot_table, slot_band, table_band,
                                   trimmed_slot_table)
from cuda_checks import assert_bwd_kernel, assert_fwd_kernel
from grad_check import assert_grads_close
from philox_ref import drop_threshold, keep_mask, keep_scale, philox4x32_10

HAS_CUDA = torch.cuda.is_available()
BUILT = _cuda_ext.load() is not None
# DEBERTA_FAST_CUDA_SIM=1: the kernel tests below run on CPU tensors in the CPU simulator (tests/test_cuda_sim.py)
SIM = _cuda_ext.simulating()
DEV = "cpu" if SIM else "cuda"
not_sim = pytest.mark.skipif(SIM, reason="not a simulator test (CPU refusals, torch.compile, GPU memory)")


def make_inputs(B=2, H=3, Lq=37, Lk=37, D=64, span=8, dtype=torch.float32, device="cpu", pk=True, pq=True,
                shared_pos=True):
    g = torch.Generator().manual_seed(1)

    def r(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    q, k, v = r(B, H, Lq, D), r(B, H, Lk, D), r(B, H, Lk, D)
    ps = (H, 2 * span, D) if shared_pos else (B, H, 2 * span, D)
    return q, k, v, (r(*ps) if pk else None), (r(*ps) if pq else None)


def call_of(q, k, v, pk, pq, mask=None, buckets=4, max_rel=16, dropout_p=0.0):
    return build_call(q, k, v, pk, pq, position_buckets=buckets, max_relative_positions=max_rel,
                      attention_mask=mask, scale=None, dropout_p=dropout_p)


@not_sim
# ----------------------------------------------------------------------------- CPU: refusals
@pytest.mark.skipif(BUILT, reason="the extension is built here")
def test_unavailable_without_build_explains_how_to_build():
    why = BACKENDS["cuda"].unavailable()
    assert why is not None
    assert "deberta_fast._C is not built" in why
    assert "pip install --no-build-isolation ." in why and "DEBERTA_FAST_JIT=1" in why


@not_sim
@pytest.mark.skipif(BUILT, reason="the extension is built here")
def test_dispatch_names_the_build_hint():
    q, k, v, pk, pq = make_inputs(dtype=torch.float16)
    with pytest.raises(BackendUnavailableError) as e:
        disentangled_attention(q, k, v, pk, pq, position_buckets=4, max_relative_positions=16, backend="cuda")
    msg = str(e.value)
    assert "backend='cuda' cannot serve this call" in msg and "pip install --no-build-isolation" in msg
    # auto still serves the call (falls back), and the cuda refusal does not break it
    out = disentangled_attention(q.float(), k.float(), v.float(), pk.float(), pq.float(), position_buckets=4,
                                 max_relative_positions=16, backend="auto")
    assert out.shape == q.shape


@not_sim
@pytest.mark.skipif(BUILT, reason="the extension is built here")
def test_ops_raise_clearly_without_build():
    q, k, v, _, _ = make_inputs(dtype=torch.float16)
    with pytest.raises(RuntimeError, match="not built"):
        _cuda_ext.ops().cuda_attn_fwd(q, k, v, None, None, None, None, None, None, 0.1, 0.0, 0, 0)


@not_sim
def test_refusals_list_every_reason():
    be = BACKENDS["cuda"]
    q, k, v, pk, pq = make_inputs(dtype=torch.float32, D=48)
    mask = torch.ones(2, 37, 37, dtype=torch.bool)
    why = " | ".join(be.refusals(call_of(q, k, v, pk, pq, mask=mask)))
    assert "needs CUDA tensors" in why
    assert "torch.float32 is not supported" in why and "bfloat16" in why
    assert "head_dim 48 is not compiled" in why
    assert "3-D/4-D attention masks are not supported" in why


@not_sim
def test_refusals_cpu_half_only_device():
    be = BACKENDS["cuda"]
    q, k, v, pk, pq = make_inputs(dtype=torch.bfloat16, Lq=20, Lk=33)
    km = torch.ones(2, 33, dtype=torch.bool)
    km[0, 5:] = False
    why = be.refusals(call_of(q, k, v, pk, pq, mask=km, dropout_p=0.1))
    assert len(why) == 1 and "needs CUDA tensors" in why[0], why


def test_summary_and_registration():
    assert "cuda" in BACKENDS and BACKENDS["cuda"].name == "cuda"
    assert "fp16/bf16" in BACKENDS["cuda"].summary


def test_aligned_copies_only_when_needed():
    x = torch.randn(2, 4, 10, 64, dtype=torch.float16)
    assert _cuda_ext.aligned(x) is x
    xt = torch.randn(2, 10, 4, 64, dtype=torch.float16).transpose(1, 2)  # HF layout: last dim contiguous
    assert _cuda_ext.aligned(xt) is xt
    odd = torch.randn(2, 4, 10, 65, dtype=torch.float16)[..., 1:]
    y = _cuda_ext.aligned(odd)
    assert y is not odd and y.is_contiguous() and torch.equal(y, odd)
    # contiguous but 2 bytes off 16 (contiguous() would return it as it is), and an empty gradient's zero strides
    off = torch.randn(2 * 4 * 10 * 64 + 1, dtype=torch.float16)[1:].view(2, 4, 10, 64)
    y = _cuda_ext.aligned(off)
    assert off.is_contiguous() and y.storage_offset() == 0 and torch.equal(y, off)
    empty = torch.zeros(0, 2, 32, dtype=torch.float16).expand(0, 2, 32)
    empty = torch.as_strided(empty, (0, 2, 32), (0, 0, 0))
    assert _cuda_ext.aligned(empty).stride() == (64, 32, 1)


def test_rel_grads_accumulate_in_place_where_they_can():
    """``add_product_`` (both backends' ``dq += dC2P pos_key``): in place into the fresh gradient for 3-D operands
    (packed, head-major views of [T, H, D]) and a batch of one, a product and an add otherwise; the same values."""
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cases = [(r(7, 3, 16).transpose(0, 1), r(3, 7, 10), r(3, 10, 16), True),  # packed: dq [T, H, D] viewed [H, T, D]
             (r(1, 3, 7, 16), r(1, 3, 7, 10), r(3, 10, 16), True),
             (r(1, 3, 7, 16), r(1, 3, 7, 10), r(1, 3, 10, 16), True),
             (r(2, 3, 7, 16), r(2, 3, 7, 10), r(3, 10, 16), False),
             (r(2, 3, 7, 16), r(2, 3, 7, 10), r(2, 3, 10, 16), False)]
    for x, a, b, in_place in cases:
        want = x + torch.matmul(a, b)
        base = x.clone()
        got = add_product_(x, a, b)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
        assert (got.data_ptr() == x.data_ptr()) == in_place and (in_place or torch.equal(x, base))


def test_fake_kernels_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = _cuda_ext.ops()
    with FakeTensorMode():
        q = torch.empty(2, 3, 5, 64, dtype=torch.float16)
        k = torch.empty(2, 3, 7, 64, dtype=torch.float16)
        pos_key = torch.empty(3, 16, 64, dtype=torch.float16)
        out, lse = ops.cuda_attn_fwd(q, k, k, pos_key, None, None, None, None, None, 0.1, 0.0, -8, 8)
        assert out.shape == (2, 3, 5, 64) and lse.shape == (2, 3, 5) and lse.dtype == torch.float32
        dq, dk, dv, dc2p, dp2c = ops.cuda_attn_bwd(q, q, k, k, q, lse, pos_key, None, None, None, None, None, 0.1,
                                                   0.0, 0, 1, None, None)
        assert dq.shape == q.shape and dk.shape == k.shape and dc2p.shape == (2, 3, 5, 16) and dp2c.numel() == 0
        _, _, _, dc2p, dp2c = ops.cuda_attn_bwd(q, q, k, k, q, lse, None, pos_key[None], None, None, None, None, 0.1,
                                                0.0, 0, 1, None, None)
        assert dc2p.numel() == 0 and dp2c.shape == (2, 3, 7, 16)


# ----------------------------------------------------------------------------- CPU: band algebra
def _band_emulation(ds, table, Lq, Lk, band, s2, by_key):
    """What the backward kernels + band_to_slots compute, in torch: dC2P (or dP2C) from dS."""
    dmin, w, perm, offs = _cuda_ext.band_window(table, Lq, Lk, band.lo, band.hi, s2)
    assert -(Lk - 1) <= dmin and dmin + w <= Lq
    i = torch.arange(Lq)[:, None]
    j = torch.arange(Lk)[None, :]
    d = (i - j - dmin).expand(Lq, Lk)
    rows = Lk if by_key else Lq
    bandbuf = torch.zeros(*ds.shape[:-2], rows, max(w, 1), dtype=ds.dtype)
    sat = torch.zeros(*ds.shape[:-2], rows, 2, dtype=ds.dtype)
    for ii in range(Lq):
        for jj in range(Lk):
            r = jj if by_key else ii
            dd = int(d[ii, jj])
            if dd < 0:
                sat[..., r, 0] += ds[..., ii, jj]
            elif dd >= w:
                sat[..., r, 1] += ds[..., ii, jj]
            else:
                bandbuf[..., r, dd] += ds[..., ii, jj]
    out = torch.zeros(*ds.shape[:-2], rows, s2, dtype=ds.dtype)
    for s in range(s2):
        for kk in range(int(offs[s]), int(offs[s + 1])):
            out[..., s] += bandbuf[..., int(perm[kk])]
    out[..., 0] += sat[..., 0]
    out[..., s2 - 1] += sat[..., 1]
    return out


# Non-monotone bucket functions (2 <= max_rel <= buckets/2 + 1, sequences longer than buckets/2 + 1): a slot
# is used by several separate runs of distances; band_to_slots sums each slot's distances wherever they lie.
NON_MONOTONE = [(40, 40, 16, 4, None), (33, 50, 8, 2, None), (131, 130, 256, 128, None), (12, 30, 16, 4, None)]


@pytest.mark.parametrize("trim", [False, True], ids=["full", "trimmed"])
@pytest.mark.parametrize("Lq,Lk,buckets,max_rel,span", [
    (9, 9, 4, 16, None), (7, 13, 4, 16, None), (13, 6, -1, 5, 5), (12, 12, 8, 6, None), (5, 21, 256, 512, None),
    (4, 4, -1, 2, 2), *NON_MONOTONE,
])
def test_band_window_reproduces_gather_gradient(Lq, Lk, buckets, max_rel, span, trim):
    """trimmed: the table the backend passes (rows lo..hi of the relative tables, trimmed_slot_table)."""
    span = span or attention_span(buckets, max_rel)
    band = slot_band(buckets, max_rel, span)
    if trim:
        table, lo, hi = trimmed_slot_table(Lq, Lk, buckets, max_rel, span)
        s2 = hi - lo + 1
    else:
        table, s2 = relative_slot_table(Lq, Lk, buckets, max_rel, span), 2 * span
    ds = torch.randn(2, Lq, Lk, dtype=torch.float64)
    idx = table.long()[torch.arange(Lq)[:, None] - torch.arange(Lk)[None, :] + Lk - 1]
    # c2p: rows = queries; gradient of gather(C2P, -1, idx) is scatter_add of ds
    want_q = torch.zeros(2, Lq, s2, dtype=torch.float64).scatter_add_(-1, idx.expand(2, Lq, Lk), ds)
    got_q = _band_emulation(ds, table, Lq, Lk, band, s2, by_key=False)
    torch.testing.assert_close(got_q, want_q)
    want_k = torch.zeros(2, Lk, s2, dtype=torch.float64).scatter_add_(-1, idx.t().expand(2, Lk, Lq),
                                                                      ds.transpose(-1, -2))
    got_k = _band_emulation(ds, table, Lq, Lk, band, s2, by_key=True)
    torch.testing.assert_close(got_k, want_k)


def test_band_window_contract_over_bucket_configs():
    """What makes the band exact for any slot function: distances below the window have slot 0, above it
    slot s2-1 (the two saturated sums), and perm/offs list every window distance once under its own slot.
    Swept over bucket configs, monotone or not, full and trimmed tables (the backend's)."""
    checked = 0
    for buckets in (-1, 2, 3, 4, 8, 16, 256, 512):
        for max_rel in (-1, 1, 2, 3, 4, 5, 16, 128, 512):
            span = attention_span(buckets, max_rel)
            if span < 1:
                continue
            try:
                fn_band = slot_band(buckets, max_rel, span)
            except ValueError:  # a config HF's bucket function leaves undefined (positions.check_bucket_config)
                continue
            for Lq, Lk in ((1, 1), (3, 300), (260, 261)):
                full = relative_slot_table(Lq, Lk, buckets, max_rel, span)
                trimmed, lo, hi = trimmed_slot_table(Lq, Lk, buckets, max_rel, span)
                # the function's band, and the table's own (the backend's: positions.table_band)
                bands = (fn_band, table_band(Lq, Lk, buckets, max_rel, span))
                for (table, s2), band in itertools.product(((full, 2 * span), (trimmed, hi - lo + 1)), bands):
                    dmin, w, perm, offs = _cuda_ext.band_window(table, Lq, Lk, band.lo, band.hi, s2)
                    where = f"buckets={buckets} max_rel={max_rel} Lq={Lq} Lk={Lk} s2={s2}"
                    assert -(Lk - 1) <= dmin and 0 <= w and dmin + w <= Lq, where
                    slots = table.long()
                    i0 = dmin + Lk - 1
                    assert bool((slots[:i0] == 0).all()) and bool((slots[i0 + w:] == s2 - 1).all()), where
                    assert int(offs[0]) == 0 and int(offs[-1]) == w and bool((offs[1:] >= offs[:-1]).all()), where
                    if w:
                        p = perm.long()
                        assert torch.equal(p.sort().values, torch.arange(w)), where
                        owner = torch.repeat_interleave(torch.arange(s2), (offs[1:] - offs[:-1]).long())
                        assert torch.equal(slots[i0:i0 + w][p], owner), where
                    checked += 1
    assert checked > 300


# ----------------------------------------------------------------------------- Philox (shared by GPU tests)
def test_philox_known_answers():
    # Random123 kat_vectors, philox4x32 10 rounds
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in kat:
        got = tuple(int(x[0]) for x in philox4x32_10([np.array([c]) for c in ctr], key))
        assert got == want, [hex(x) for x in got]


def test_keep_mask_statistics_cpu():
    keep = keep_mask(1234567, 0, 2, 2, 64, 64, 0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.02


# ----------------------------------------------------------------------------- GPU
gpu = pytest.mark.cuda_sim if SIM else pytest.mark.gpu
needs_ext = pytest.mark.skipif(not (SIM or (HAS_CUDA and BUILT)), reason="needs a CUDA device and the built extension")


def _reference_with_keep(q, k, v, pk, pq, buckets, max_rel, mask, keep, p):
    """fp64 reference with an explicit dropout keep mask."""
    args = [t.double() if t is not None else None for t in (q, k, v, pk, pq)]
    _, probs = disentangled_attention_reference(*args, position_buckets=buckets, max_relative_positions=max_rel,
                                                attention_mask=mask, return_probs=True,
                                                scale=deberta_fast.reference.default_scale(
                                                    q.shape[-1], (pk is not None) + (pq is not None)))
    if keep is not None:
        probs = probs * keep.to(probs.device, probs.dtype) * keep_scale(p)
    return probs @ args[2]


def _run_variant(dtype, D, Lq, Lk, terms, buckets, max_rel, masked, shared_pos=True, valid=None):
    """``valid``: HF padding instead of ``masked``'s pattern, the number of real tokens per batch row."""
    dev = DEV
    span = attention_span(buckets, max_rel)
    q, k, v, pk, pq = make_inputs(2, 3, Lq, Lk, D, span, dtype, dev, "c2p" in terms, "p2c" in terms, shared_pos)
    mask = None
    if masked:
        mask = torch.ones(2, Lk, dtype=torch.bool, device=dev)
        mask[0, Lk // 2:] = False
        mask[1, :3] = False
    if valid is not None:
        mask = torch.arange(Lk, device=dev)[None, :] < torch.tensor(valid, device=dev)[:, None]
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pq) if t is not None]
    out = disentangled_attention(q, k, v, pk, pq, position_buckets=buckets, max_relative_positions=max_rel,
                                 attention_mask=mask, backend="cuda")
    assert deberta_fast.last_backend() == "cuda"
    assert_fwd_kernel()
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, go)
    assert_bwd_kernel()
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    rq, rk, rv = next(it), next(it), next(it)
    rpk = next(it) if pk is not None else None
    rpq = next(it) if pq is not None else None
    ref = disentangled_attention_reference(rq, rk, rv, rpk, rpq, position_buckets=buckets,
                                           max_relative_positions=max_rel, attention_mask=mask)
    rgrads = torch.autograd.grad(ref, ref_leaves, go.double())
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    assert_grads_close(grads, rgrads, ("q", "k", "v", "pos_key", "pos_query"), 3 * tol)


@gpu
@needs_ext
def test_gpu_diagnose_checks_the_cuda_backend():
    """``benchmarks.gpu_diagnose``'s cuda rows: bf16 output and gradients against the fp64 pieces, within CUDA_TOL;
    a head dim the kernels lack is refused (recorded there, not a failure)."""
    from benchmarks import gpu_diagnose as G

    for case in G.CASES:
        if case[0] in ("tiny-D64", "tiny-17"):
            ts, kw = G._inputs(case, torch.device(DEV))
            if case[5] == 16:
                with pytest.raises(BackendUnavailableError, match="head_dim 16"):
                    G.cuda_pieces(ts, kw)
                continue
            res = G.compare(G.cuda_pieces(ts, kw), G.expected(ts, kw), G.CUDA_TOL)
            assert set(res) == {"out", "dq", "dk", "dv", "dpos_key", "dpos_query"}
            assert all(p["ok"] for p in res.values()), res


@gpu
@needs_ext
def test_gpu_band_follows_the_device_table(perturb_slot_table):
    """The saturation band the kernels get is read off the slot table they read (positions.table_band), not
    recomputed from the bucket function on the CPU: here the table has slot 1 at every odd d <= -21, where the
    function gives 0, so no key tile beyond d = -8 may be taken as saturated."""
    perturb_slot_table(4, 8, 100, list(range(-99, -20, 2)), 1)
    assert table_band(100, 100, 4, 8, 4).lo < slot_band(4, 8, 4).lo == -8
    _run_variant(torch.float16, 64, 100, 100, "c2p+p2c", 4, 8, masked=True)


@gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("terms", ["", "c2p", "p2c", "c2p+p2c"])
def test_gpu_variants(dtype, D, terms):
    _run_variant(dtype, D, 77, 77, terms, 256, 512, masked=False)


@gpu
@needs_ext
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 65), (50, 131), (131, 50), (129, 129), (200, 64), (127, 63)])
@pytest.mark.parametrize("buckets,max_rel", [(256, 512), (-1, 24), (8, 32)])
@pytest.mark.parametrize("masked", [False, True])
def test_gpu_lengths_masks_buckets(Lq, Lk, buckets, max_rel, masked):
    _run_variant(torch.bfloat16, 64, Lq, Lk, "c2p+p2c", buckets, max_rel, masked, shared_pos=(Lq % 2 == 0))


@gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("buckets,max_rel", [(256, 512), (8, 32)])
def test_gpu_hf_padding_clean_and_masked_tiles(dtype, buckets, max_rel):
    """HF's suffix padding at L = 200: key tiles with and without a masked key, warps of real, padded (uniform) and
    mixed rows, so the kernels' per-tile votes choose both paths within one call."""
    _run_variant(dtype, 64, 200, 200, "c2p+p2c", buckets, max_rel, masked=False, valid=[70, 150])


def _direct(q, k, v, pk, pq, buckets, max_rel, mask, p, seed, offset=0):
    call = call_of(q, k, v, pk, pq, mask=mask, buckets=buckets, max_rel=max_rel, dropout_p=p)
    lo, hi = (call.band().lo, call.band().hi) if call.has_rel else (0, 0)
    rng = torch.tensor([seed, offset], dtype=torch.int64, device=q.device)
    uni = call.uniform_rows.contiguous() if call.uniform_rows is not None else None
    km = call.key_mask.contiguous() if call.key_mask is not None else None
    res = _cuda_ext.ops().cuda_attn_fwd(q, k, v, pk, pq, call.slot_table() if call.has_rel else None, km, uni,
                                        rng, call.scale, p, lo, hi)
    assert_fwd_kernel()
    return res


@gpu
@needs_ext
@pytest.mark.parametrize("Lq,Lk,valid", [(64, 64, None), (45, 93, None), (64, 64, (40, 64))])
def test_gpu_dropout_exact_mask_forward_and_backward(Lq, Lk, valid):
    """``valid``: an HF padding mask (the real tokens per batch row): masked keys and HF's uniform rows, whose
    output and dV take dropout's ``1 / (1 - p)`` like any other row."""
    p, seed = 0.2, 0x1234_5678_9ABC
    # span 4 = attention_span(4, 16): the raw reference reads the span off the tables' rows
    q, k, v, pk, pq = make_inputs(2, 3, Lq, Lk, 64, 4, torch.float16, DEV)
    mask = None if valid is None else torch.arange(Lk, device=DEV)[None, :] < torch.tensor(valid, device=DEV)[:, None]
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pq)]
    out, lse = _direct(q, k, v, pk, pq, 4, 16, mask, p, seed)
    keep = keep_mask(seed, 0, 2, 3, Lq, Lk, p)
    rl = [t.detach().double().requires_grad_() for t in leaves]
    ref = _reference_with_keep(*rl, 4, 16, mask, keep, p)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, go)
    rgrads = torch.autograd.grad(ref, rl, go.double())
    for g, rg in zip(grads, rgrads):
        assert (g.double() - rg).abs().max().item() <= 6e-2 * (rg.abs().max().item() + 1e-6)


def _one_hot(B, H, L, D, dtype):
    """``[B, H, L, D]`` rows ``e_0 .. e_{L-1}`` (``L <= D``)."""
    return torch.eye(L, D, dtype=dtype, device=DEV).expand(B, H, L, D).contiguous()


@gpu
@needs_ext
@pytest.mark.parametrize("D,Lq,Lk,valid,buckets,dtype", [(128, 128, 128, None, 4, torch.float16),
                                                         (128, 45, 93, None, 4, torch.bfloat16),
                                                         (128, 100, 37, None, 256, torch.float16),
                                                         (128, 128, 128, (70, 128), 4, torch.float16),
                                                         (64, 64, 57, None, 4, torch.float16)])
def test_gpu_dropout_decisions_of_each_kernel(D, Lq, Lk, valid, buckets, dtype):
    """Every keep decision of the three kernels recovered element by element, not through a tolerance on sums of
    them, and naming the kernel.  D >= Lq, Lk (D = 64: the forward's 64-key tiles; 128: its 32-key ones):
    - forward: with one-hot ``V`` (key ``j`` = ``e_j``) the output is ``P~ = P keep s`` itself (s: the keep scale);
    - dK/dV: with ``dO`` = one-hot rows, ``dV = P~^T``;
    - dq and dK/dV's dS: with one-hot ``Q`` and ``K`` and zero position rows, ``dq[i, j] = scale dS[i, j]`` and
      ``dk[j, i] = scale dS[i, j]``; with ``dO = +-1``, a flipped decision moves ``dS[i, j] = P (dO_ij keep s -
      delta_i)`` by ``P s``, against 16-bit rounding of ``P (s + |delta_i|)``.
    The position rows are zero so that the gradients stay one element each; the kernels still take their band and
    saturated tiles (``buckets`` 4: both; 256: band only), which depend on positions, not on values.  ``valid``: HF
    padding (masked keys, whose P is 0, and uniform rows, dropped like any other)."""
    B, H, p, seed = 2, 2, 0.3, 0x5EED_0000_1234
    span = attention_span(buckets, 2 * buckets)
    q, k, v = _one_hot(B, H, Lq, D, dtype), _one_hot(B, H, Lk, D, dtype), _one_hot(B, H, Lk, D, dtype)
    pk, pq = (torch.zeros(H, 2 * span, D, dtype=dtype, device=DEV) for _ in range(2))
    mask = None if valid is None else torch.arange(Lk, device=DEV)[None, :] < torch.tensor(valid, device=DEV)[:, None]
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pq)]
    out, _ = _direct(q, k, v, pk, pq, buckets, 2 * buckets, mask, p, seed)
    keep = keep_mask(seed, 0, B, H, Lq, Lk, p).to(DEV)
    rl = [t.detach().double().requires_grad_() for t in leaves]
    ref = _reference_with_keep(*rl, buckets, 2 * buckets, mask, keep, p)
    probs = _reference_with_keep(*rl, buckets, 2 * buckets, mask, None, p)[..., :Lk].detach()  # V one-hot: P
    live = probs > 0  # a masked key has no decision to see

    def decided(got, what):  # got / (P s) is 0 (dropped) or 1 (kept) wherever P > 0
        ratio = torch.where(live, got.double() / (probs * keep_scale(p)), 0.0)
        assert torch.equal(ratio > 0.5, keep & live), f"{what}: keep decisions differ"
        assert (ratio - (keep & live).double()).abs().max().item() < 1e-2, what

    decided(out[..., :Lk], "forward")
    assert out[..., Lk:].eq(0).all()
    dv = torch.autograd.grad(out, leaves[2], _one_hot(B, H, Lq, D, dtype), retain_graph=True)[0]
    decided(dv[..., :Lq].transpose(-1, -2), "dK/dV kernel (dV)")
    go = (torch.randint(0, 2, out.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1).to(DEV, dtype)
    dq, dk = torch.autograd.grad(out, leaves[:2], go)
    rdq, rdk = torch.autograd.grad(ref, rl[:2], go.double())
    flip = deberta_fast.reference.default_scale(D, 2) * keep_scale(p) * probs  # |dq or dk| moved by one flip
    for got, want, what in ((dq[..., :Lk], rdq[..., :Lk], "dq kernel"),
                            (dk[..., :Lq].transpose(-1, -2), rdk[..., :Lq].transpose(-1, -2), "dK/dV kernel (dk)")):
        rel = torch.where(live, (got.double() - want).abs() / flip, 0.0)
        assert rel.max().item() < 0.1, f"{what}: an element {rel.max().item():.3g} of a flipped decision off"


@gpu
@needs_ext
@pytest.mark.parametrize("B,H", [(0, 3), (2, 0)])
@pytest.mark.parametrize("backend", ["cuda", "auto"])
def test_gpu_empty_batch_or_heads(B, H, backend):
    """B = 0 or H = 0: nothing to compute; the cuda backend (``auto``'s first choice for 16-bit inputs) returns the
    empty output and gradients, as the torch and triton backends do, instead of the extension's refusal."""
    q, k, v, pk, pq = make_inputs(B, H, 10, 12, 64, 4, torch.bfloat16, DEV)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pq)]
    out = disentangled_attention(q, k, v, pk, pq, position_buckets=4, max_relative_positions=16, dropout_p=0.1,
                                 backend=backend)
    assert deberta_fast.last_backend() == "cuda" and out.shape == q.shape and out.dtype == q.dtype
    grads = torch.autograd.grad(out.float().sum(), leaves, allow_unused=True)
    for t, g in zip(leaves, grads):
        assert g is None or (g.shape == t.shape and not g.isnan().any())


@gpu
@needs_ext
def test_gpu_dropout_rescale_is_the_realised_keep_rate():
    """Kept elements are scaled by ``2**16 / (2**16 - t)`` (``t``: the 16-bit threshold), the inverse of the keep
    probability the kernels realise: at p = 0.999 (t = 65470) ``1 / (1 - p)`` is 0.7 % too large.  Uniform
    probabilities (q = k = 0): ``out_i = sum_j keep_ij v_j / Lk * 2**16 / (2**16 - t)``."""
    p, seed, L = 0.999, 4242, 64
    q = torch.zeros(1, 2, L, 64, dtype=torch.float16, device=DEV)
    v = (torch.rand(1, 2, L, 64, generator=torch.Generator().manual_seed(3)) + 0.5).to(DEV, torch.float16)
    out, _ = _direct(q, q, v, None, None, 4, 16, None, p, seed)
    t = drop_threshold(p)
    want = keep_mask(seed, 0, 1, 2, L, L, p).double() @ v.double().cpu() / L * (2 ** 16 / (2 ** 16 - t))
    assert (want != 0).sum() >= 64  # a few kept elements (each a row of 64)
    torch.testing.assert_close(out.double().cpu(), want, rtol=2e-3, atol=0)


@gpu
@needs_ext
def test_gpu_dropout_statistics():
    p = 0.25
    Lq = Lk = 256
    q = torch.zeros(1, 2, Lq, 64, dtype=torch.float16, device=DEV)
    k = torch.zeros(1, 2, Lk, 64, dtype=torch.float16, device=DEV)
    v = torch.ones(1, 2, Lk, 64, dtype=torch.float16, device=DEV)
    # uniform probabilities 1/Lk and v = 1: out = (#kept / Lk) / (1 - p), mean -> 1
    out, _ = _direct(q, k, v, None, None, 4, 16, None, p, 987654321)
    kept_frac = out[..., 0].float() * (1 - p)
    assert abs(kept_frac.mean().item() - (1 - p)) < 0.01
    assert kept_frac.std().item() == pytest.approx(math.sqrt(p * (1 - p) / Lk), rel=0.2)
    out2, _ = _direct(q, k, v, None, None, 4, 16, None, p, 987654321)
    assert torch.equal(out, out2)
    out3, _ = _direct(q, k, v, None, None, 4, 16, None, p, 987654322)
    assert not torch.equal(out, out3)


@gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [32, 128])
def test_gpu_output_weights_sum_to_one(dtype, D):
    """Columns of V constant over the keys (signed powers of two) come out exactly: the output's weights sum to 1.
    Without dropout the forward's row sums ride the P . V product (an n-tile of ones, rescaled with the output);
    saturated and band tiles, a key mask, a row maximum growing over the key tiles."""
    B, H, L = 2, 2, 150
    q, k, v, pk, pq = make_inputs(B, H, L, L, D, 4, torch.float32, "cpu")  # span 4: buckets 4
    k = k + (torch.linspace(-1.0, 1.0, L) ** 3 * 8)[:, None]  # the maxima grow along the keys
    c = torch.randint(-3, 4, (D,)).to(torch.float32).exp2() * (torch.randint(0, 2, (D,)) * 2 - 1)
    v = c.expand(B, H, L, D)
    q, k, v, pk, pq = (t.to(DEV, dtype) for t in (q, k, v, pk, pq))
    mask = torch.ones(B, L, dtype=torch.bool, device=DEV)
    mask[1, 100:] = False
    out, lse = _direct(q, k, v, pk, pq, 4, 16, mask, 0.0, 0)
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(out, c.to(DEV, dtype).expand_as(out), atol=0, rtol=0)


@gpu
@needs_ext
def test_gpu_uniform_rows_and_lse():
    B, H, L = 2, 2, 70
    q, k, v, pk, pq = make_inputs(B, H, L, L, 64, 4, torch.bfloat16, DEV)  # span 4: buckets 4
    mask = torch.ones(B, L, dtype=torch.bool, device=DEV)
    mask[0, 40:] = False
    mask[1, :] = False  # a batch element with no key at all: every row uniform
    out, lse = _direct(q, k, v, pk, pq, 4, 16, mask, 0.0, 0)
    _, rlse = disentangled_attention_reference(q.double(), k.double(), v.double(), pk.double(), pq.double(),
                                               position_buckets=4, max_relative_positions=16, attention_mask=mask,
                                               return_lse=True)
    torch.testing.assert_close(lse.double(), rlse.double(), atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(out[1].float(), v[1].float().mean(-2, keepdim=True).expand(H, L, 64),
                               atol=2e-2, rtol=2e-2)


@gpu
@needs_ext
@pytest.mark.parametrize("Lq,Lk", [(37, 37), (21, 45)])
def test_gpu_key_mask_broadcast_over_the_queries(Lq, Lk):
    """HF's extended ``[B, 1, 1, Lk]`` mask (and ``[1, 1, 1, Lk]``, ``[B, 1, Lk]``): keys masked, no query row made
    uniform but those of a batch entry without keys; served as a key mask (not a refused full mask), forward and the
    five gradients against float64."""
    span = attention_span(4, 16)
    q, k, v, pk, pq = make_inputs(2, 3, Lq, Lk, 64, span, torch.float16, DEV)
    m = torch.ones(2, Lk, dtype=torch.bool, device=DEV)
    m[0, Lk // 3:] = False
    for mask in (m[:, None, None, :].long(), m[1:, None, None, :], m[:, None, :].float(),
                 torch.zeros(2, 1, 1, Lk, dtype=torch.bool, device=DEV)):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, pk, pq)]
        out = disentangled_attention(*leaves, position_buckets=4, max_relative_positions=16, attention_mask=mask,
                                     backend="cuda")
        assert deberta_fast.last_backend() == "cuda"
        go = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, go)
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        ref = disentangled_attention_reference(*ref_leaves, position_buckets=4, max_relative_positions=16,
                                               attention_mask=mask)
        rgrads = torch.autograd.grad(ref, ref_leaves, go.double())
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
        assert_grads_close(grads, rgrads, ("q", "k", "v", "pos_key", "pos_query"), 6e-2)
        if mask.dtype == torch.bool and mask.shape[0] == 2 and not mask.any():  # every row uniform
            torch.testing.assert_close(out.float(), v.float().mean(-2, keepdim=True).expand_as(out),
                                       atol=2e-2, rtol=2e-2)


@gpu
@needs_ext
def test_gpu_rows_without_keys_lse_inf_and_finite_backward():
    """Fault 9: a query row with no key (every key masked, no uniform row: a direct op call) gets LSE = +inf
    and zero output; the backward gives finite (zero) gradients for it whatever LSE it is handed."""
    B, H, L = 2, 2, 40
    q, k, v, pk, pq = make_inputs(B, H, L, L, 64, 4, torch.float16, DEV)  # span 4: buckets 4
    km = torch.ones(B, L, dtype=torch.bool, device=DEV)
    km[1] = False
    call = call_of(q, k, v, pk, pq, mask=km)
    table, lo, hi = call.slot_table(), call.band().lo, call.band().hi
    ops = _cuda_ext.ops()
    out, lse = ops.cuda_attn_fwd(q, k, v, pk, pq, table, km, None, None, call.scale, 0.0, lo, hi)
    assert_fwd_kernel()
    assert bool((lse[1] == math.inf).all()) and bool(torch.isfinite(lse[0]).all())
    assert bool((out[1] == 0).all())
    dmin, w, perm, offs = _cuda_ext.band_window(table, L, L, lo, hi, pk.shape[-2])
    dout = torch.randn_like(out)
    for bad in (None, -math.inf, math.nan):
        lse_in = lse.clone()
        if bad is not None:
            lse_in[1] = bad
        grads = ops.cuda_attn_bwd(dout, q, k, v, out, lse_in, pk, pq, table, km, None, None, call.scale, 0.0,
                                  dmin, w, perm, offs)
        for g in grads:
            assert bool(torch.isfinite(g).all()), f"non-finite gradient with LSE {bad}"
        assert bool((grads[0][1] == 0).all()) and bool((grads[3][1] == 0).all())


@gpu
@needs_ext
def test_gpu_position_rows_wider_than_the_slot_range():
    """A direct op call whose position rows (16) outnumber the slots its table uses (span 4: slots 0..7): saturated
    distances read and receive the slots at the band's edges (0 / 7), not the last rows; rows 8..15 get no
    gradient.  L = 150 puts whole tiles beyond the band on both sides."""
    L = 150
    q, k, v, pk, pq = make_inputs(1, 2, L, L, 64, 8, torch.float16, DEV)  # 16 position rows
    call = call_of(q, k, v, pk[:, :8], pq[:, :8])  # buckets 4 / 16: span 4
    table, lo, hi = call.slot_table(), call.band().lo, call.band().hi
    assert int(table.max()) == 7 and hi - lo < 64
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pq)]
    out, _ = _cuda_ext.ops().cuda_attn_fwd(q, k, v, pk, pq, table, None, None, None, call.scale, 0.0, lo, hi)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, go)
    assert_bwd_kernel()
    rl = [t.detach().double().requires_grad_() for t in (q, k, v, pk[:, :8], pq[:, :8])]
    ref = disentangled_attention_reference(*rl, position_buckets=4, max_relative_positions=16)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    rgrads = torch.autograd.grad(ref, rl, go.double())
    for name, g, rg in zip(("q", "k", "v", "pos_key", "pos_query"), grads, rgrads):
        g = g.double()
        if name.startswith("pos"):
            assert bool((g[:, 8:] == 0).all()), f"d{name}: gradient in rows the table never uses"
            g = g[:, :8]
        err = (g - rg).abs().max().item() / (rg.abs().max().item() + 1e-6)
        assert err < 6e-2, f"d{name}: relative max error {err:.3g}"


@gpu
@needs_ext
@pytest.mark.parametrize("masked,mode,D", [(False, "1", 64), (True, "1", 64), (True, "serial", 64), (False, "1", 128),
                                           (True, "1", 32)])
def test_gpu_wgmma_kernels_equal_the_mma_sync_ones(masked, mode, D):
    """The wgmma variants (``DEBERTA_FAST_CUDA_WGMMA=1``: the forward's products overlapped with its softmax;
    ``serial``: not) against the mma.sync kernels on one call with band and saturated tiles (buckets 8 / 32, L = 270:
    five key tiles, so that the overlapped forward refills the stage of a tile whose P V was in flight; HF padding when
    ``masked``; D = 64, and the pipelined kernel at D = 128 (32-key tiles) and 32; the serial one masked, at D = 64):
    output and all five gradients.  In the simulator bit for bit (both sum exact products once per 16 of k); on an
    sm_90 device within the fp16 rounding of a different summation order; elsewhere there are no wgmma variants to
    compare."""
    if not SIM and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma variants are sm_90 only")
    q, k, v, pk, pq = make_inputs(2, 2, 270, 270, D, attention_span(8, 32), torch.float16, DEV)
    mask = torch.arange(270, device=DEV)[None, :] < torch.tensor([270, 97], device=DEV)[:, None] if masked else None
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(DEV, torch.float16)
    res = {}
    for on in (False, True):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, pk, pq)]
        with _cuda_ext.use_wgmma(mode if on else False):
            out = disentangled_attention(*leaves, position_buckets=8, max_relative_positions=32, attention_mask=mask,
                                         backend="cuda")
            assert_fwd_kernel()
            grads = torch.autograd.grad(out, leaves, go)
            assert_bwd_kernel()
        res[on] = (out, *grads)
    for name, a, b in zip(("out", "q", "k", "v", "pos_key", "pos_query"), res[False], res[True]):
        if SIM:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(b, a, atol=2e-3 * float(a.abs().max()) + 1e-3, rtol=1e-2, msg=name)


@gpu
@needs_ext
@pytest.mark.parametrize("masked,D,dtype,budget,p_drop", [(False, 64, torch.float16, 1, 0.2),
                                                          (True, 128, torch.bfloat16, 0, 0.0)],
                         ids=["d64-groups-dropout", "d128-padding"])
def test_gpu_precomputed_saturated_terms_equal_the_per_tile_ones(masked, D, dtype, budget, p_drop):
    """``DEBERTA_FAST_CUDA_SAT_TERMS=1`` (the saturated tiles' column terms from one extra kernel, copied into the K /
    Q tiles' padding) against ``=0`` (every block computes them per tile): output and all five gradients bit for bit,
    on the GPU too (the same ``mma.sync`` products in the same order).  Buckets 8 / 32 at L = 270: band and saturated
    tiles, five key tiles; HF padding when ``masked``; the backward's heads in groups (``budget`` 1); dropout."""
    ext = _cuda_ext._need_ext()
    q, k, v, pk, pq = make_inputs(2, 2, 270, 270, D, attention_span(8, 32), dtype, DEV)
    mask = torch.arange(270, device=DEV)[None, :] < torch.tensor([270, 97], device=DEV)[:, None] if masked else None
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(DEV, dtype)
    res = {}
    old = ext.set_band_budget(budget)
    try:
        for on in (False, True):
            leaves = [t.detach().requires_grad_() for t in (q, k, v, pk, pq)]
            with _cuda_ext.use_sat_terms(on):
                torch.manual_seed(5)  # the dropout seed
                out = disentangled_attention(*leaves, position_buckets=8, max_relative_positions=32,
                                             attention_mask=mask, backend="cuda", dropout_p=p_drop)
                res[on] = (out, *torch.autograd.grad(out, leaves, go))
    finally:
        ext.set_band_budget(old)
    for name, a, b in zip(("out", "q", "k", "v", "pos_key", "pos_query"), res[False], res[True]):
        assert torch.equal(a, b), name


@gpu
@needs_ext
def test_gpu_backward_is_deterministic():
    q, k, v, pk, pq = make_inputs(2, 4, 300, 300, 64, 256, torch.bfloat16, DEV)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pq)]
    go = torch.randn(2, 4, 300, 64, dtype=torch.bfloat16, device=DEV)
    runs = []
    for _ in range(2):
        out = disentangled_attention(q, k, v, pk, pq, position_buckets=256, max_relative_positions=512,
                                     backend="cuda", dropout_p=0.0)
        runs.append(torch.autograd.grad(out, leaves, go))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@gpu
@needs_ext
@pytest.mark.parametrize("shared_pos", [True, False], ids=["pos3d", "pos4d"])
def test_gpu_backward_head_groups_equal_one_group(shared_pos):
    """The backward's heads in groups (a band-buffer budget of 1 byte: one head per group) give the bits of one
    group: the dropout stream keyed by the call's own (b, h), a key mask's uniform rows, 3-D and 4-D position rows."""
    ext = _cuda_ext._need_ext()
    B, H, L = 2, 3, 70
    q, k, v, pk, pq = make_inputs(B, H, L, L, 64, 4, torch.float16, DEV, shared_pos=shared_pos)
    mask = torch.ones(B, L, dtype=torch.bool, device=DEV)
    mask[0, 50:] = False
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pq)]
    go = torch.randn(B, H, L, 64, generator=torch.Generator().manual_seed(2)).to(DEV, torch.float16)
    runs = []
    for budget in (0, 1):
        old = ext.set_band_budget(budget)
        try:
            torch.manual_seed(5)  # the dropout seed
            out = disentangled_attention(q, k, v, pk, pq, position_buckets=4, max_relative_positions=16,
                                         attention_mask=mask, backend="cuda", dropout_p=0.2)
            runs.append([out, *torch.autograd.grad(out, leaves, go)])
        finally:
            ext.set_band_budget(old)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _cuda_call(packed, ts, mask, p):
    """Forward of the cuda backend on ``ts`` (q, k, v [B, H, L, D], pos_key, pos_query), padded or packed."""
    if not packed:
        return disentangled_attention(*ts, position_buckets=4, max_relative_positions=16, attention_mask=mask,
                                      dropout_p=p, backend="cuda")
    B, H, L, D = ts[0].shape
    a, b, c = (t.transpose(1, 2).reshape(B * L, H, D) for t in ts[:3])
    cu = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=DEV)
    out = deberta_fast.disentangled_attention_varlen(a, b, c, ts[3], ts[4], cu, cu, L, L, position_buckets=4,
                                                     max_relative_positions=16, dropout_p=p, backend="cuda")
    return out.reshape(B, L, H, D).transpose(1, 2)


@gpu
@needs_ext
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gpu_eager_fast_path_equals_the_custom_op(monkeypatch, packed):
    """The backend's direct path (the extension called from an autograd function, no custom-op dispatch) and the
    custom ops with their registered autograd: forward and all five gradients bitwise equal, with dropout and a
    key mask (padded); the direct path is taken in both passes when nothing traces."""
    from deberta_fast.backends import cuda_backend

    B, H, L = 2, 2, 37
    inputs = make_inputs(B, H, L, L, 32, 4, torch.float16, DEV)
    mask = None
    if not packed:
        mask = torch.ones(B, L, dtype=torch.bool, device=DEV)
        mask[1, 30:] = False
    go = torch.randn(B, H, L, 32, generator=torch.Generator().manual_seed(3)).to(DEV, torch.float16)

    def run():
        ts = [t.clone().requires_grad_() for t in inputs]
        torch.manual_seed(11)  # the dropout seed
        out = _cuda_call(packed, ts, mask, 0.25)
        return [out, *torch.autograd.grad(out, ts, go)]

    calls = []
    real = cuda_backend.direct
    monkeypatch.setattr(cuda_backend, "direct", lambda *t: calls.append(real(*t)) or calls[-1])
    fast = run()
    assert calls == [True, True]
    monkeypatch.setattr(cuda_backend, "direct", lambda *t: False)
    slow = run()
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


@gpu
@needs_ext
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gpu_inference_skips_the_autograd_function(monkeypatch, packed):
    """Nothing requires grad, or grad mode is off: the extension runs without the autograd function (its ``apply``
    is host time on every inference call), with the output of a call that records grad."""
    from deberta_fast.backends import cuda_backend

    inputs = make_inputs(1, 2, 29, 29, 32, 4, torch.bfloat16, DEV)
    want = _cuda_call(packed, [t.clone().requires_grad_() for t in inputs], None, 0.0).detach()

    def refuse(*args):
        raise AssertionError("the autograd function ran")

    fn = cuda_backend.CudaVarlenFunction if packed else cuda_backend.CudaAttentionFunction
    monkeypatch.setattr(fn, "apply", refuse)
    assert torch.equal(_cuda_call(packed, inputs, None, 0.0), want)
    with torch.no_grad():
        got = _cuda_call(packed, [t.clone().requires_grad_() for t in inputs], None, 0.0)
    assert torch.equal(got, want) and got.grad_fn is None


@gpu
@needs_ext
def test_gpu_double_backward_refuses_clearly():
    """A backward that records a graph (``create_graph=True``) goes through the backward op: first-order gradients
    as without it, and a second-order gradient refuses (the op has no autograd formula) instead of a silent zero."""
    inputs = make_inputs(1, 2, 21, 21, 32, 4, torch.float16, DEV)
    ts = [t.clone().requires_grad_() for t in inputs]
    out = _cuda_call(False, ts, None, 0.0)
    gq, = torch.autograd.grad(out.float().square().sum(), ts[0], create_graph=True)
    want, = torch.autograd.grad(_cuda_call(False, ts, None, 0.0).float().square().sum(), ts[0])
    assert torch.equal(gq.detach(), want)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(gq.float().sum(), ts[2])


@gpu
@needs_ext
def test_gpu_transforms_and_forward_ad():
    """torch.func's transforms and the legacy vmap go through the custom ops (a loop: ``vmap`` and
    ``autograd.grad(is_grads_batched=True)`` equal one), ``functionalize`` leaves the caches clean for the eager calls
    after it, and a forward-mode tangent is refused by name (``auto``: the torch backend serves it)."""
    import warnings

    import torch.autograd.forward_ad as fwAD

    from deberta_fast.dispatch import BackendUnavailableError

    q, k, v, pk, pq = make_inputs(1, 2, 19, 19, 32, 4, torch.float16, DEV)
    f = lambda q, k, v, pk, pq: disentangled_attention(q, k, v, pk, pq, position_buckets=4,  # noqa: E731
                                                       max_relative_positions=16, backend="cuda")
    qs = torch.stack([q, -q])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's "no batching rule" performance warning)
        got = torch.func.vmap(lambda x: f(x, k, v, pk, pq))(qs)
    assert torch.equal(got, torch.stack([f(x, k, v, pk, pq) for x in qs]))
    ts = [t.clone().requires_grad_() for t in (q, k, v, pk, pq)]
    gos = torch.randn(2, *q.shape, generator=torch.Generator().manual_seed(4)).to(DEV, torch.float16)
    batched = torch.autograd.grad(f(*ts), ts, gos, is_grads_batched=True)
    for i in range(2):
        for a, b in zip(batched, torch.autograd.grad(f(*ts), ts, gos[i])):
            assert torch.equal(a[i], b)
    q2, k2, v2, pk2, pq2 = make_inputs(1, 2, 27, 27, 32, 4, torch.float16, DEV)  # a shape no call above cached
    got = torch.func.functionalize(f)(q2, k2, v2, pk2, pq2)  # the first call of this shape fills no cache
    assert torch.equal(f(q2, k2, v2, pk2, pq2), got)
    t = torch.randn_like(q)
    with fwAD.dual_level():
        with pytest.raises(BackendUnavailableError, match="forward-mode AD"):
            f(fwAD.make_dual(q, t), k, v, pk, pq)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = disentangled_attention(fwAD.make_dual(q, t), k, v, pk, pq, position_buckets=4,
                                         max_relative_positions=16, backend="auto")
        assert fwAD.unpack_dual(out).tangent is not None and deberta_fast.last_backend() == "torch"
    with pytest.raises(BackendUnavailableError, match="reverse-mode transforms"):
        torch.func.grad(lambda x: f(x, k, v, pk, pq).float().sum())(q)


@gpu
@needs_ext
def test_gpu_kernel_errors_are_actionable():
    q = torch.randn(1, 2, 8, 64, device=DEV, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        _cuda_ext._need_ext().fwd(q.float(), q.float(), q.float(), None, None, None, None, None, None, 0.1, 0.0)
    with pytest.raises(RuntimeError, match="head_dim must be 32, 64 or 128"):
        x = torch.randn(1, 2, 8, 48, device=DEV, dtype=torch.float16)
        _cuda_ext._need_ext().fwd(x, x, x, None, None, None, None, None, None, 0.1, 0.0)
    if not SIM:
        with pytest.raises(RuntimeError, match="CUDA tensor"):
            _cuda_ext._need_ext().fwd(q.cpu(), q, q, None, None, None, None, None, None, 0.1, 0.0)
    # the forward's position rows
    pk = torch.randn(2, 16, 64, device=DEV, dtype=torch.float16)
    table = torch.zeros(15, dtype=torch.int32, device=DEV)
    cases = [
        ((pk[..., :32].contiguous(), None, table), r"pos_key must be \[H, 2\*span, D\] = \[2, R, 64\]"),
        ((pk.bfloat16(), None, table), "pos_key must be a Half tensor"),
        ((pk, pk[:, :8], table), "pos_key and pos_query must have the same rows"),
        ((pk, None, None), "relative terms need the slot table"),
        ((None, pk.flatten()[1:].view(-1)[:2 * 15 * 64].view(2, 15, 64), table), "16-byte aligned rows"),
        ((pk[None].expand(3, 2, 16, 64), None, table), r"or \[B\|1, H, R, D\]"),
    ]
    for (pos_key, pos_query, tb), err in cases:
        with pytest.raises(RuntimeError, match=err):
            _cuda_ext._need_ext().fwd(q, q, q, pos_key, pos_query, tb, None, None, None, 0.1, 0.0)


@gpu
@needs_ext
@not_sim
def test_gpu_torch_compile():
    q, k, v, pk, pq = make_inputs(1, 2, 64, 64, 64, 8, torch.float16, DEV)

    def f(q, k, v, pk, pq):
        return disentangled_attention(q, k, v, pk, pq, position_buckets=4, max_relative_positions=16,
                                      backend="cuda")

    ref = f(q, k, v, pk, pq)
    got = torch.compile(f, fullgraph=False)(q, k, v, pk, pq)
    torch.testing.assert_close(got, ref)


@gpu
@needs_ext
def test_custom_ops_opcheck():
    """The padded forward op's schema and fake kernel (what torch.compile / torch.export see) agree with the
    real kernel; opcheck runs the op, so this needs the GPU."""
    from deberta_fast.backends.cuda_backend import _positions

    q, k, v, pk, pq = make_inputs(2, 3, 37, 29, 64, attention_span(4, 8), torch.bfloat16, DEV, True, True, True)
    call = build_call(q, k, v, pk, pq, position_buckets=4, max_relative_positions=8, attention_mask=None,
                      scale=None, dropout_p=0.0)
    table, rows, lo, hi = _positions(call)
    pk_rows, pq_rows = pk[..., rows, :].contiguous(), pq[..., rows, :].contiguous()
    km = torch.ones(2, 29, dtype=torch.bool, device=DEV)
    km[1, 20:] = False
    rng = torch.tensor([1234, 0], dtype=torch.int64, device=DEV)
    for key_mask, p in ((None, 0.0), (km, 0.1)):
        args = (q, k, v, pk_rows, pq_rows, table, key_mask, None, rng if p else None, float(call.scale), p, lo, hi)
        torch.library.opcheck(_cuda_ext.ops().cuda_attn_fwd, args, test_utils=("test_schema", "test_faketensor"))
