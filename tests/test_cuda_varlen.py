"""Packed variable-length (varlen) path of the ``"cuda"`` backend.

CPU: refusals, offset validation, fake kernels, and torch emulations of exactly what the kernels
index (tables ``[H, T, 2S]`` at row ``h*T + token``, slot ``table[i - j + max_k - 1]``, one band
window for all sequences, the dropout stream's counters: ``philox_ref.block_of`` with ``bh = n*H + h``) against
the torch backend and the per-sequence gather gradient.  GPU (``@pytest.mark.gpu``): kernels against the fp64
reference run per sequence."""
import math

import numpy as np
import pytest
import torch

import deberta_fast
from deberta_fast import _cuda_ext, disentangled_attention_reference, disentangled_attention_varlen
from deberta_fast.backends import BACKENDS
from deberta_fast.dispatch import BackendUnavailableError, build_varlen_call
from deberta_fast.positions import attention_span, relative_slot_table, slot_band
from deberta_fast.reference import default_scale

from cuda_checks import assert_bwd_kernel, assert_fwd_kernel  # noqa: E402
from grad_check import assert_grads_close  # noqa: E402
from philox_ref import block_of, keep_of, keep_scale  # noqa: E402  (numpy Philox, see test_cuda_backend)

HAS_CUDA = torch.cuda.is_available()
BUILT = _cuda_ext.load() is not None
# DEBERTA_FAST_CUDA_SIM=1: the kernel tests below run on CPU tensors in the CPU simulator (tests/test_cuda_sim.py)
SIM = _cuda_ext.simulating()
DEV = "cpu" if SIM else "cuda"
not_sim = pytest.mark.skipif(SIM, reason="not a simulator test (CPU refusals, torch.compile, GPU memory)")


def cu_of(lens, device="cpu"):
    return torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32, device=device)


def make_packed(lens_q, lens_k=None, H=3, D=64, span=8, dtype=torch.float32, device="cpu", pk=True, pq=True,
                seed=1):
    lens_k = lens_q if lens_k is None else lens_k
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    q, k, v = r(sum(lens_q), H, D), r(sum(lens_k), H, D), r(sum(lens_k), H, D)
    return (q, k, v, r(H, 2 * span, D) if pk else None, r(H, 2 * span, D) if pq else None,
            cu_of(lens_q, device), cu_of(lens_k, device))


def vcall(q, k, v, pk, pq, cq, ck, buckets=4, max_rel=16, dropout_p=0.0, max_q=None, max_k=None):
    lq = (cq[1:] - cq[:-1]).tolist()
    lk = (ck[1:] - ck[:-1]).tolist()
    return build_varlen_call(q, k, v, pk, pq, cq, ck, max_q or max(max(lq), 1), max_k or max(max(lk), 1),
                             position_buckets=buckets, max_relative_positions=max_rel, scale=None,
                             dropout_p=dropout_p)


# ----------------------------------------------------------------------------- CPU: contract, refusals
def test_supports_varlen_and_summary():
    be = BACKENDS["cuda"]
    assert be.supports_varlen is True
    assert "varlen" in be.summary


@not_sim
def test_varlen_refusals_list_every_reason():
    be = BACKENDS["cuda"]
    q, k, v, pk, pq, cq, ck = make_packed([5, 9], D=48, dtype=torch.float32)
    why = " | ".join(be.refusals_varlen(vcall(q, k, v, pk, pq, cq, ck)))
    assert "needs CUDA tensors" in why
    assert "torch.float32 is not supported" in why
    assert "head_dim 48 is not compiled" in why


@not_sim
def test_varlen_refusals_cpu_half_only_device():
    q, k, v, pk, pq, cq, ck = make_packed([5, 1, 9], [3, 7, 2], dtype=torch.bfloat16)
    why = BACKENDS["cuda"].refusals_varlen(vcall(q, k, v, pk, pq, cq, ck, dropout_p=0.1))
    assert len(why) == 1 and "needs CUDA tensors" in why[0], why


def test_varlen_refuses_grid_overflow():
    n, H = 40000, 2  # N*H = 80000 > 65535
    q = torch.zeros(n, H, 32, dtype=torch.float16)
    cu = torch.arange(n + 1, dtype=torch.int32)
    call = build_varlen_call(q, q, q, None, None, cu, cu, 1, 1, position_buckets=4, max_relative_positions=16,
                             scale=None, dropout_p=0.0)
    why = " | ".join(BACKENDS["cuda"].refusals_varlen(call))
    assert "N*H = 80000" in why and "split the batch" in why


@not_sim
def test_varlen_dispatch_refuses_on_cpu_and_auto_falls_back():
    q, k, v, pk, pq, cq, ck = make_packed([4, 7], dtype=torch.float16)
    with pytest.raises(BackendUnavailableError, match="backend='cuda' cannot serve this call"):
        disentangled_attention_varlen(q, k, v, pk, pq, cq, ck, 7, 7, position_buckets=4, max_relative_positions=16,
                                      backend="cuda")


@not_sim
@pytest.mark.skipif(BUILT, reason="the extension is built here")
def test_varlen_ops_raise_clearly_without_build():
    q, k, v, pk, pq, cq, ck = make_packed([4, 7], dtype=torch.float16)
    with pytest.raises(RuntimeError, match="not built"):
        _cuda_ext.ops().cuda_varlen_fwd(q, k, v, None, None, None, cq, ck, 7, 7, None, 0.1, 0.0, 0, 0)


def test_varlen_fake_kernels_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = _cuda_ext.ops()
    with FakeTensorMode():
        q = torch.empty(11, 3, 64, dtype=torch.float16)
        k = torch.empty(13, 3, 64, dtype=torch.float16)
        cu = torch.empty(3, dtype=torch.int32)
        pos = torch.empty(3, 16, 64, dtype=torch.float16)
        out, lse = ops.cuda_varlen_fwd(q, k, k, pos, pos, None, cu, cu, 8, 9, None, 0.1, 0.0, -8, 8)
        assert out.shape == (11, 3, 64) and lse.shape == (3, 11) and lse.dtype == torch.float32
        dq, dk, dv, dc2p, dp2c = ops.cuda_varlen_bwd(q, q, k, k, q, lse, pos, None, None, cu, cu, 8, 9, None, 0.1,
                                                     0.0, 0, 1, None, None)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
        assert dc2p.shape == (3, 11, 16) and dp2c.numel() == 0
        _, _, _, dc2p, dp2c = ops.cuda_varlen_bwd(q, q, k, k, q, lse, None, pos, None, cu, cu, 8, 9, None, 0.1,
                                                  0.0, 0, 1, None, None)
        assert dc2p.numel() == 0 and dp2c.shape == (3, 13, 16)


def test_check_varlen_offsets():
    """Every backend's packed call is validated by the dispatcher before a kernel runs."""
    q, k, v, pk, pq, cq, ck = make_packed([5, 1, 9], [3, 7, 2], dtype=torch.float16)
    vcall(q, k, v, pk, pq, cq, ck)  # valid: no error
    cases = [
        (dict(cq=cq, ck=ck, max_q=8), "a query sequence is longer than max_seqlen_q=8"),
        (dict(cq=cq, ck=ck, max_k=6), "a key sequence is longer than max_seqlen_k=6"),
        (dict(cq=torch.tensor([0, 5, 6, 14], dtype=torch.int32), ck=ck, max_q=9),
         "cu_seqlens_q\\[-1\\] must equal the number of query tokens 15"),
        (dict(cq=cq, ck=torch.tensor([1, 4, 11, 12], dtype=torch.int32), max_k=7), "cu_seqlens_k\\[0\\] must be 0"),
        (dict(cq=torch.tensor([0, 6, 5, 15], dtype=torch.int32), ck=ck, max_q=10), "non-decreasing"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            vcall(q, k, v, pk, pq, **kw)


def varlen_tables(query, key, pos_key, pos_query):
    """``(C2P [H,Tq,2S], P2C [H,Tk,2S])`` over packed tokens (None where the term is absent): the emulation's
    tables, and the layout of the backward's ``dC2P`` / ``dP2C`` (row ``h*T + token``)."""
    c2p = None if pos_key is None else torch.matmul(query.transpose(0, 1), pos_key.transpose(-1, -2)).contiguous()
    p2c = None if pos_query is None else torch.matmul(key.transpose(0, 1), pos_query.transpose(-1, -2)).contiguous()
    return c2p, p2c


def test_varlen_tables_layout():
    q, k, v, pk, pq, cq, ck = make_packed([5, 9], [4, 6], dtype=torch.float64)
    c2p, p2c = varlen_tables(q, k, pk, pq)
    assert c2p.shape == (3, 14, 16) and p2c.shape == (3, 10, 16)
    assert c2p.is_contiguous() and p2c.is_contiguous()
    torch.testing.assert_close(c2p[1, 7], pk[1] @ q[7, 1])
    torch.testing.assert_close(p2c[2, 3], pq[2] @ k[3, 2])
    c2p_only, none = varlen_tables(q, k, pk, None)
    assert none is None and torch.equal(c2p_only, c2p)


# ----------------------------------------------------------------------------- CPU: kernel index emulation
def _seqs(cq, ck):
    for n in range(cq.numel() - 1):
        yield n, int(cq[n]), int(cq[n + 1] - cq[n]), int(ck[n]), int(ck[n + 1] - ck[n])


def emulate_varlen_forward(call, keep=None):
    """Forward exactly as the kernels index it: flat [H*T, 2S] tables at row h*T + token, slot from the
    max-length table at i - j + max_k - 1, LSE [H, Tq] (+inf for rows with no key, as the kernels write)."""
    q, k, v = call.query.double(), call.key.double(), call.value.double()
    Tq, H, D = q.shape
    Tk = k.shape[0]
    pk = call.pos_key.double() if call.pos_key is not None else None
    pq = call.pos_query.double() if call.pos_query is not None else None
    c2p, p2c = varlen_tables(q, k, pk, pq)
    table = call.slot_table().long() if call.has_rel else None
    c2p_f = c2p.reshape(H * Tq, -1) if c2p is not None else None
    p2c_f = p2c.reshape(H * Tk, -1) if p2c is not None else None
    out = torch.zeros(Tq, H, D, dtype=torch.float64)
    lse = torch.full((H, Tq), math.inf, dtype=torch.float64)
    for n, qs, lq, ks, lk in _seqs(call.cu_seqlens_q, call.cu_seqlens_k):
        if lq == 0 or lk == 0:
            continue
        i = torch.arange(lq)[:, None]
        j = torch.arange(lk)[None, :]
        for h in range(H):
            qoff, koff = h * Tq + qs, h * Tk + ks
            s = q[qs:qs + lq, h] @ k[ks:ks + lk, h].T
            if table is not None:
                slot = table[i - j + call.max_seqlen_k - 1]
                if c2p_f is not None:
                    s = s + c2p_f[qoff + i, slot]
                if p2c_f is not None:
                    s = s + p2c_f[koff + j, slot]
            s = s * call.scale
            lse[h, qs:qs + lq] = torch.logsumexp(s, -1)
            pr = torch.softmax(s, -1)
            if keep is not None:
                pr = pr * keep[n][h] / (1.0 - call.dropout_p)
            out[qs:qs + lq, h] = pr @ v[ks:ks + lk, h]
    return out, lse


@pytest.mark.parametrize("lens_q,lens_k,buckets,max_rel", [
    ([1, 17, 40, 6], None, 4, 16),       # lengths 1, odd, longer than the band (span 4)
    ([5, 30, 1], [9, 2, 33], 256, 512),  # Lq != Lk per sequence, unbucketed band covers all
    ([12, 3], [4, 25], -1, 6),           # no buckets, v1-style span
])
@pytest.mark.parametrize("terms", ["c2p", "p2c", "c2p+p2c"])
def test_emulated_kernel_indexing_matches_torch_backend(lens_q, lens_k, buckets, max_rel, terms):
    span = attention_span(buckets, max_rel)
    q, k, v, pk, pq, cq, ck = make_packed(lens_q, lens_k, H=2, D=8, span=span, dtype=torch.float64,
                                          pk="c2p" in terms, pq="p2c" in terms)
    call = vcall(q, k, v, pk, pq, cq, ck, buckets=buckets, max_rel=max_rel)
    got, _ = emulate_varlen_forward(call)
    want = BACKENDS["torch"].forward_varlen(call)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def band_emulation_varlen(ds_per_seq, cq, ck, H, table, max_q, max_k, band, s2, by_key):
    """Backward kernels + band_to_slots over packed rows: band rows (h*T + token), ONE window for all
    sequences from band_window(table, max_q, max_k, ...)."""
    dmin, w, perm, offs = _cuda_ext.band_window(table, max_q, max_k, band.lo, band.hi, s2)
    T = int((ck if by_key else cq)[-1])
    rows = H * T
    bandbuf = torch.zeros(rows, max(w, 1), dtype=torch.float64)
    sat = torch.zeros(rows, 2, dtype=torch.float64)
    for (n, qs, lq, ks, lk), ds in zip(_seqs(cq, ck), ds_per_seq):
        i = torch.arange(lq)[:, None].expand(lq, lk)
        j = torch.arange(lk)[None, :].expand(lq, lk)
        d = i - j - dmin
        assert d.numel() == 0 or (d.min() >= -(max_k - 1) - dmin and d.max() < max_q - dmin)
        for h in range(H):
            base = h * T + (ks if by_key else qs)
            r = base + (j if by_key else i)
            lo, hi, mid = d < 0, d >= w, (d >= 0) & (d < w)
            sat[:, 0].index_put_((r[lo],), ds[h][lo], accumulate=True)
            sat[:, 1].index_put_((r[hi],), ds[h][hi], accumulate=True)
            # one writer per element in the kernels: assert no collisions
            assert torch.unique(r[mid] * max(w, 1) + d[mid]).numel() == int(mid.sum())
            bandbuf[r[mid], d[mid]] = ds[h][mid]
    out = torch.zeros(rows, s2, dtype=torch.float64)
    for s in range(s2):
        idx = perm[int(offs[s]):int(offs[s + 1])].long()
        out[:, s] = bandbuf[:, idx].sum(-1)
    out[:, 0] += sat[:, 0]
    out[:, s2 - 1] += sat[:, 1]
    return out.view(H, T, s2)


@pytest.mark.parametrize("lens_q,lens_k,buckets,max_rel", [
    ([1, 9, 23], None, 4, 16), ([6, 2, 31], [13, 1, 7], 8, 6), ([3, 40], [40, 3], 256, 512), ([7], [2], -1, 3),
    # non-monotone bucket functions: a slot is used by separate runs of distances
    ([6, 40], [40, 9], 16, 4), ([131, 2], [3, 130], 256, 128), ([20, 7], None, 8, 2),
])
def test_varlen_band_window_reproduces_per_sequence_gather_gradient(lens_q, lens_k, buckets, max_rel):
    lens_k = lens_k or lens_q
    H = 2
    span = attention_span(buckets, max_rel)
    s2 = 2 * span
    max_q, max_k = max(lens_q), max(lens_k)
    table = relative_slot_table(max_q, max_k, buckets, max_rel, span)
    band = slot_band(buckets, max_rel, span)
    cq, ck = cu_of(lens_q), cu_of(lens_k)
    g = torch.Generator().manual_seed(3)
    ds = [torch.randn(H, lq, lk, generator=g, dtype=torch.float64) for lq, lk in zip(lens_q, lens_k)]
    want_q = torch.zeros(H, sum(lens_q), s2, dtype=torch.float64)
    want_k = torch.zeros(H, sum(lens_k), s2, dtype=torch.float64)
    for (n, qs, lq, ks, lk), d in zip(_seqs(cq, ck), ds):
        # per-sequence table (its own lengths): what the reference gathers
        t_n = relative_slot_table(lq, lk, buckets, max_rel, span).long()
        idx = t_n[torch.arange(lq)[:, None] - torch.arange(lk)[None, :] + lk - 1]
        want_q[:, qs:qs + lq] = torch.zeros(H, lq, s2, dtype=torch.float64).scatter_add_(
            -1, idx.expand(H, lq, lk), d)
        want_k[:, ks:ks + lk] = torch.zeros(H, lk, s2, dtype=torch.float64).scatter_add_(
            -1, idx.t().expand(H, lk, lq), d.transpose(-1, -2))
    got_q = band_emulation_varlen(ds, cq, ck, H, table, max_q, max_k, band, s2, by_key=False)
    got_k = band_emulation_varlen(ds, cq, ck, H, table, max_q, max_k, band, s2, by_key=True)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)


def keep_mask_varlen(seed, offset, lens_q, lens_k, H, p):
    """The kernels' varlen dropout mask per sequence: ``keep_of`` with ``bh = n * H + h`` and ``i``, ``j`` within
    sequence ``n``."""
    masks = []
    for n, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        bh, i, j = np.meshgrid(n * H + np.arange(H), np.arange(lq), np.arange(lk), indexing="ij")
        masks.append(torch.from_numpy(keep_of(seed, offset, bh, i, j, p)))
    return masks


def test_varlen_dropout_counters_distinct_and_statistics():
    lens_q, lens_k, H = [7, 33, 1, 64], [9, 33, 5, 64], 3
    # every element of every sequence / head draws its own (counter, word, half) for one (seed, offset), and a
    # Philox call serves at most 8 elements
    elems, calls = set(), {}
    for n, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        i, j = np.meshgrid(np.arange(lq), np.arange(lk), indexing="ij")
        c0, c1, word = block_of(i, j)
        for h in range(H):
            for a, b, w, jj in zip(c0.ravel(), c1.ravel(), word.ravel(), j.ravel()):
                elems.add((a, b, n * H + h, w, jj & 1))
                calls[(a, b, n * H + h)] = calls.get((a, b, n * H + h), 0) + 1
    assert len(elems) == H * sum(lq * lk for lq, lk in zip(lens_q, lens_k))
    assert max(calls.values()) == 8
    keep = keep_mask_varlen(0x1234_5678_9ABC, 0, lens_q, lens_k, H, 0.3)
    frac = torch.cat([m.reshape(-1) for m in keep]).float().mean().item()
    assert abs(frac - 0.7) < 0.02
    # different sequences with equal lengths get different masks
    assert not torch.equal(keep[1], keep_mask_varlen(0x1234_5678_9ABC, 0, [33], [33], H, 0.3)[0])


def test_emulated_dropout_forward_matches_reference_with_keep():
    lens_q, lens_k = [5, 12], [8, 3]
    q, k, v, pk, pq, cq, ck = make_packed(lens_q, lens_k, H=2, D=8, span=4, dtype=torch.float64)
    call = vcall(q, k, v, pk, pq, cq, ck, buckets=4, max_rel=16, dropout_p=0.25)
    keep = keep_mask_varlen(99, 5, lens_q, lens_k, 2, 0.25)
    got, _ = emulate_varlen_forward(call, keep)
    want = ref_varlen(q, k, v, pk, pq, cq, ck, 4, 16, keep=keep, p=0.25)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- fp64 per-sequence reference
def ref_varlen(q, k, v, pk, pq, cq, ck, buckets, max_rel, keep=None, p=0.0):
    """Per-sequence fp64 reference (differentiable in its inputs); zero rows for sequences with no key."""
    D = q.shape[-1]
    scale = default_scale(D, (pk is not None) + (pq is not None))
    outs = []
    for n, qs, lq, ks, lk in _seqs(cq.cpu(), ck.cpu()):
        if lq == 0:
            continue
        if lk == 0:
            outs.append(q.new_zeros(lq, q.shape[1], D, dtype=torch.float64))
            continue
        qn = q[qs:qs + lq].transpose(0, 1)[None].double()
        kn = k[ks:ks + lk].transpose(0, 1)[None].double()
        vn = v[ks:ks + lk].transpose(0, 1)[None].double()
        _, probs = disentangled_attention_reference(
            qn, kn, vn, pk.double() if pk is not None else None, pq.double() if pq is not None else None,
            position_buckets=buckets, max_relative_positions=max_rel, return_probs=True, scale=scale)
        if keep is not None:
            probs = probs * keep[n].to(probs.device, probs.dtype)[None] * keep_scale(p)
        outs.append((probs @ vn)[0].transpose(0, 1))
    return torch.cat(outs)


# ----------------------------------------------------------------------------- GPU
gpu = pytest.mark.cuda_sim if SIM else pytest.mark.gpu
needs_ext = pytest.mark.skipif(not (SIM or (HAS_CUDA and BUILT)), reason="needs a CUDA device and the built extension")


def _run_varlen(dtype, D, lens_q, lens_k, terms, buckets, max_rel, H=3):
    span = attention_span(buckets, max_rel)
    q, k, v, pk, pq, cq, ck = make_packed(lens_q, lens_k, H, D, span, dtype, DEV, "c2p" in terms,
                                          "p2c" in terms)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pq) if t is not None]
    out = disentangled_attention_varlen(q, k, v, pk, pq, cq, ck, max(lens_q), max(lens_k or lens_q),
                                        position_buckets=buckets, max_relative_positions=max_rel, backend="cuda")
    assert deberta_fast.last_backend() == "cuda" and out.shape == q.shape
    assert_fwd_kernel()
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, go)
    assert_bwd_kernel()
    rl = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(rl)
    rq, rk, rv = next(it), next(it), next(it)
    rpk = next(it) if pk is not None else None
    rpq = next(it) if pq is not None else None
    ref = ref_varlen(rq, rk, rv, rpk, rpq, cq, ck, buckets, max_rel)
    rgrads = torch.autograd.grad(ref, rl, go.double(), allow_unused=True)
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    rgrads = [torch.zeros_like(g, dtype=torch.float64) if rg is None else rg for g, rg in zip(grads, rgrads)]
    assert_grads_close(grads, rgrads, ("q", "k", "v", "pos_key", "pos_query"), 3 * tol)


@gpu
@needs_ext
def test_gpu_varlen_backward_head_groups_equal_one_group():
    """Packed: the backward's heads in groups (one head per group) give the bits of one group, with dropout."""
    ext = _cuda_ext._need_ext()
    lens = [37, 1, 64, 9]
    q, k, v, pk, pq, cq, ck = make_packed(lens, H=3, span=4, dtype=torch.float16, device=DEV)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pq)]
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(DEV, torch.float16)
    runs = []
    for budget in (0, 1):
        old = ext.set_band_budget(budget)
        try:
            torch.manual_seed(5)  # the dropout seed
            out = disentangled_attention_varlen(q, k, v, pk, pq, cq, ck, 64, 64, position_buckets=4,
                                                max_relative_positions=16, backend="cuda", dropout_p=0.2)
            runs.append([out, *torch.autograd.grad(out, leaves, go)])
        finally:
            ext.set_band_budget(old)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@gpu
@needs_ext
def test_gpu_varlen_precomputed_saturated_terms_equal_the_per_tile_ones():
    """Packed: the saturated column terms from one extra kernel (``DEBERTA_FAST_CUDA_SAT_TERMS=1``, rows ``h * T +
    token``) against the per-tile ones (``=0``), output and gradients bit for bit; sequences of 1 - 200 tokens."""
    lens = [200, 1, 77, 130]
    q, k, v, pk, pq, cq, ck = make_packed(lens, H=2, span=4, dtype=torch.float16, device=DEV)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(DEV, torch.float16)
    runs = []
    for on in (False, True):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, pk, pq)]
        with _cuda_ext.use_sat_terms(on):
            out = disentangled_attention_varlen(*leaves, cq, ck, 200, 200, position_buckets=4,
                                                max_relative_positions=16, backend="cuda")
            runs.append([out, *torch.autograd.grad(out, leaves, go)])
    for name, a, b in zip(("out", "q", "k", "v", "pos_key", "pos_query"), *runs):
        assert torch.equal(a, b), name


@gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("terms", ["", "c2p", "p2c", "c2p+p2c"])
def test_gpu_varlen_variants(dtype, D, terms):
    _run_varlen(dtype, D, [1, 77, 130, 64], None, terms, 256, 512)


@gpu
@needs_ext
@pytest.mark.parametrize("lens_q,lens_k", [
    ([1], [1]), ([1, 65, 3], [65, 1, 3]), ([50, 131, 7], [131, 50, 200]), ([129, 0, 5], [129, 4, 0]),
])
@pytest.mark.parametrize("buckets,max_rel", [(256, 512), (-1, 24), (8, 32)])
def test_gpu_varlen_lengths_buckets(lens_q, lens_k, buckets, max_rel):
    # (8, 32) / (-1, 24): sequences longer than the band; 0-length sequences: no rows / no keys
    _run_varlen(torch.bfloat16, 64, lens_q, lens_k, "c2p+p2c", buckets, max_rel)


def _direct(q, k, v, pk, pq, cq, ck, max_q, max_k, buckets, max_rel, p, seed, offset=0):
    call = build_varlen_call(q, k, v, pk, pq, cq, ck, max_q, max_k, position_buckets=buckets,
                             max_relative_positions=max_rel, scale=None, dropout_p=p)
    lo, hi = (call.band().lo, call.band().hi) if call.has_rel else (0, 0)
    rng = torch.tensor([seed, offset], dtype=torch.int64, device=q.device)
    res = _cuda_ext.ops().cuda_varlen_fwd(q, k, v, pk, pq, call.slot_table() if call.has_rel else None, cq, ck,
                                          max_q, max_k, rng, call.scale, p, lo, hi)
    assert_fwd_kernel()
    return res


@gpu
@needs_ext
def test_gpu_varlen_dropout_exact_mask_forward_and_backward():
    p, seed = 0.2, 0x1234_5678_9ABC
    lens_q, lens_k = [64, 1, 45], [64, 9, 93]
    # span 4 = attention_span(4, 16): the raw reference reads the span off the tables' rows
    q, k, v, pk, pq, cq, ck = make_packed(lens_q, lens_k, 3, 64, 4, torch.float16, DEV)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pq)]
    out, lse = _direct(q, k, v, pk, pq, cq, ck, 64, 93, 4, 16, p, seed)
    keep = keep_mask_varlen(seed, 0, lens_q, lens_k, 3, p)
    rl = [t.detach().double().requires_grad_() for t in leaves]
    ref = ref_varlen(*rl, cq, ck, 4, 16, keep=keep, p=p)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, go)
    rgrads = torch.autograd.grad(ref, rl, go.double())
    for g, rg in zip(grads, rgrads):
        assert (g.double() - rg).abs().max().item() <= 6e-2 * (rg.abs().max().item() + 1e-6)


@gpu
@needs_ext
def test_gpu_varlen_dropout_statistics_and_lse():
    p, H, L = 0.25, 2, 256
    lens = [L, L, L]
    q = torch.zeros(3 * L, H, 64, dtype=torch.float16, device=DEV)
    v = torch.ones(3 * L, H, 64, dtype=torch.float16, device=DEV)
    cu = cu_of(lens, DEV)
    out, lse = _direct(q, q, v, None, None, cu, cu, L, L, 4, 16, p, 987654321)
    # uniform probabilities and v = 1: out = (#kept / L) / (1 - p)
    kept = out[..., 0].float() * (1 - p)
    assert abs(kept.mean().item() - (1 - p)) < 0.01
    assert kept.std().item() == pytest.approx(math.sqrt(p * (1 - p) / L), rel=0.2)
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(L)), atol=1e-4, rtol=0)
    # equal sequences must not share masks (counters carry n*H + h)
    assert not torch.equal(out[:L], out[L:2 * L])
    out2, _ = _direct(q, q, v, None, None, cu, cu, L, L, 4, 16, p, 987654321)
    assert torch.equal(out, out2)
    out3, _ = _direct(q, q, v, None, None, cu, cu, L, L, 4, 16, p, 987654322)
    assert not torch.equal(out, out3)


@gpu
@needs_ext
def test_gpu_varlen_sequence_without_keys():
    """Fault 9: the rows of a sequence with no key get LSE = +inf (as emulate_varlen_forward) and zero output;
    the backward stays finite whatever LSE it is handed for them."""
    lens_q, lens_k = [5, 7], [6, 0]
    q, k, v, pk, pq, cq, ck = make_packed(lens_q, lens_k, 2, 64, 4, torch.float16, DEV)  # span 4: buckets 4
    out, lse = _direct(q, k, v, pk, pq, cq, ck, 7, 6, 4, 16, 0.0, 0)
    assert bool((lse[:, 5:] == math.inf).all()) and bool(torch.isfinite(lse[:, :5]).all())
    assert bool((out[5:] == 0).all())
    call = vcall(q, k, v, pk, pq, cq, ck)
    table = call.slot_table()
    dmin, w, perm, offs = _cuda_ext.band_window(table, 7, 6, call.band().lo, call.band().hi, pk.shape[-2])
    dout = torch.randn_like(out)
    for bad in (None, -math.inf, math.nan):
        lse_in = lse.clone()
        if bad is not None:
            lse_in[:, 5:] = bad
        grads = _cuda_ext.ops().cuda_varlen_bwd(dout, q, k, v, out, lse_in, pk, pq, table, cq, ck, 7, 6, None,
                                                call.scale, 0.0, dmin, w, perm, offs)
        for g in grads:
            assert bool(torch.isfinite(g).all()), f"non-finite gradient with LSE {bad}"
        assert bool((grads[0][5:] == 0).all())


@gpu
@needs_ext
def test_gpu_varlen_tokens_outside_every_sequence_get_no_position_gradient():
    """A direct op call whose cu_seqlens start past token 0 (invalid: the dispatcher refuses it, the op does not
    check): no kernel writes the band entries of that token's rows, and band_to_slots must not read them (the
    buffers are not zero-filled; the simulator fills them with NaN), so its dC2P / dP2C rows are 0."""
    lens = [6, 9]
    q, k, v, pk, pq, cq, ck = make_packed([1] + lens, None, 2, 64, 4, torch.float16, DEV)  # token 0: a sequence
    cq1 = cq[1:].contiguous()  # ... that the offsets now skip: [1, 7, 16]
    ck1 = ck[1:].contiguous()
    call = vcall(q, k, v, pk, pq, cq, ck)
    table = call.slot_table()
    lo, hi = call.band().lo, call.band().hi
    out, lse = _cuda_ext.ops().cuda_varlen_fwd(q, k, v, pk, pq, table, cq1, ck1, 9, 9, None, call.scale, 0.0, lo, hi)
    dmin, w, perm, offs = _cuda_ext.band_window(table, 9, 9, lo, hi, pk.shape[-2])
    grads = _cuda_ext.ops().cuda_varlen_bwd(torch.randn_like(out), q, k, v, out, lse, pk, pq, table, cq1, ck1, 9, 9,
                                            None, call.scale, 0.0, dmin, w, perm, offs, lo, hi)
    dc2p, dp2c = grads[3], grads[4]
    assert bool(torch.isfinite(dc2p).all()) and bool(torch.isfinite(dp2c).all())
    assert bool((dc2p[:, 0] == 0).all()) and bool((dp2c[:, 0] == 0).all())
    assert bool((dc2p[:, 1:] != 0).any()) and bool((dp2c[:, 1:] != 0).any())


@gpu
@needs_ext
def test_gpu_varlen_unchecked_bad_offsets_give_finite_rows():
    """``check_offsets=False`` with offsets that do not describe the tokens (the dispatcher's check refuses each):
    wrong rows but no error, nothing read out of range and nothing uninitialised: finite outputs and gradients, and 0
    (output, dq, dk, dv) for a token that no sequence covers, as the triton and torch backends give it
    (``tests/test_bad_inputs.py``).  The kernels clamp each sequence to ``[0, T)`` and ``max_seqlen``
    (``seq_range``); until 2026-12-07 such a token's rows were the allocator's bytes."""
    q, k, v, pk, pq, _, _ = make_packed([5, 3], None, 2, 64, 4, torch.float16, DEV)
    T = q.shape[0]
    for cu, maxlen in (([0, 5, 9], 5), ([0, 5, 100], 95), ([1, 5, 8], 5), ([0, 6, 5, 8], 6), ([0, 5, 7], 5),
                       ([0, 5, 8], 4), ([-3, 2, 8], 5)):
        covered = torch.zeros(T, dtype=torch.bool)
        for a, b in zip(cu[:-1], cu[1:]):  # seq_range: start clamped to [0, T], end to [start, T], then max_seqlen
            s = min(max(a, 0), T)
            e = min(max(b, s), T)
            covered[s:s + min(e - s, maxlen)] = True
        leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pq)]
        offs = torch.tensor(cu, dtype=torch.int32, device=DEV)
        out = disentangled_attention_varlen(*leaves, offs, offs, maxlen, maxlen, position_buckets=4,
                                            max_relative_positions=16, backend="cuda", check_offsets=False)
        assert deberta_fast.last_backend() == "cuda"
        grads = torch.autograd.grad(out.float().sum(), leaves)
        assert bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads), cu
        gone = ~covered.to(out.device)
        for name, x in zip(("out", "dq", "dk", "dv"), (out, *grads[:3])):
            assert not bool(x[gone].any()), (cu, name)


@gpu
@needs_ext
def test_gpu_varlen_lse_matches_emulation():
    lens_q, lens_k = [70, 3, 129], [20, 140, 129]
    q, k, v, pk, pq, cq, ck = make_packed(lens_q, lens_k, 2, 64, 8, torch.bfloat16, DEV)
    _, lse = _direct(q, k, v, pk, pq, cq, ck, 129, 140, 4, 16, 0.0, 0)
    call = vcall(q.cpu(), k.cpu(), v.cpu(), pk.cpu(), pq.cpu(), cq.cpu(), ck.cpu(), buckets=4, max_rel=16)
    _, want = emulate_varlen_forward(call)
    torch.testing.assert_close(lse.double().cpu(), want, atol=3e-2, rtol=1e-2)


@gpu
@needs_ext
def test_gpu_varlen_backward_is_deterministic():
    lens = [300, 17, 257, 1]
    q, k, v, pk, pq, cq, ck = make_packed(lens, None, 4, 64, 256, torch.bfloat16, DEV)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pq)]
    go = torch.randn_like(q)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # same dropout seed both times: same mask, bitwise-equal gradients
        out = disentangled_attention_varlen(q, k, v, pk, pq, cq, ck, 300, 300, position_buckets=256,
                                            max_relative_positions=512, backend="cuda", dropout_p=0.1)
        runs.append(torch.autograd.grad(out, leaves, go))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@gpu
@needs_ext
def test_gpu_varlen_matches_padded_cuda_path():
    """Same sequences through the padded kernels (key mask) and the varlen kernels."""
    lens = [37, 64, 5]
    q, k, v, pk, pq, cq, ck = make_packed(lens, None, 2, 64, 8, torch.float16, DEV)
    out_v = disentangled_attention_varlen(q, k, v, pk, pq, cq, ck, 64, 64, position_buckets=4,
                                          max_relative_positions=16, backend="cuda")
    for n, qs, lq, ks, lk in _seqs(cq.cpu(), ck.cpu()):
        qn = q[qs:qs + lq].transpose(0, 1)[None]
        kn = k[ks:ks + lk].transpose(0, 1)[None]
        vn = v[ks:ks + lk].transpose(0, 1)[None]
        out_p = deberta_fast.disentangled_attention(qn, kn, vn, pk, pq, position_buckets=4,
                                                    max_relative_positions=16, backend="cuda")
        torch.testing.assert_close(out_v[qs:qs + lq], out_p[0].transpose(0, 1), atol=2e-3, rtol=2e-3)


@gpu
@needs_ext
def test_gpu_varlen_errors_are_actionable():
    q, k, v, pk, pq, cq, ck = make_packed([4, 7], None, 2, 64, 8, torch.float16, DEV)
    ext = _cuda_ext._need_ext()
    with pytest.raises(RuntimeError, match="int32"):
        ext.varlen_fwd(q, k, v, None, None, None, cq.long(), ck, 7, 7, None, 0.1, 0.0)
    with pytest.raises(RuntimeError, match=r"pos_key must be \[H, 2\*span, D\]"):
        pos = torch.zeros(1, 2, 16, 64, device=DEV, dtype=q.dtype)  # batched: padded layout only
        ext.varlen_fwd(q, k, v, pos, None, None, cq, ck, 7, 7, None, 0.1, 0.0)
    with pytest.raises(RuntimeError, match=r"varlen backward: pos_key must be \[H, 2\*span, D\]"):
        pos = torch.zeros(2, 2, 16, 64, device=DEV, dtype=q.dtype)  # batched: padded layout only
        ext.varlen_bwd(q, q, k, v, q, torch.zeros(2, 11, device=DEV), pos, None, None, cq, ck, 7, 7, None, 0.1,
                       0.0, 0, 0, None, None)
    with pytest.raises(RuntimeError, match="3-D"):
        ext.varlen_fwd(q[None], k, v, None, None, None, cq, ck, 7, 7, None, 0.1, 0.0)
    with pytest.raises(ValueError, match="longer than max_seqlen_q=5"):
        disentangled_attention_varlen(q, k, v, pk, pq, cq, ck, 5, 7, position_buckets=4, max_relative_positions=16,
                                      backend="cuda")


@gpu
@needs_ext
@not_sim
def test_gpu_varlen_torch_compile():
    q, k, v, pk, pq, cq, ck = make_packed([30, 64, 1], None, 2, 64, 8, torch.float16, DEV)

    def f(q, k, v, pk, pq):
        return disentangled_attention_varlen(q, k, v, pk, pq, cq, ck, 64, 64, position_buckets=4,
                                             max_relative_positions=16, backend="cuda")

    ref = f(q, k, v, pk, pq)
    got = torch.compile(f, fullgraph=False)(q, k, v, pk, pq)
    torch.testing.assert_close(got, ref)


@gpu
@needs_ext
@not_sim
def test_gpu_varlen_int64_offsets():
    """Token offsets x row stride beyond 2^31 elements: the last sequences sit past 2^31."""
    H, D, L = 16, 128, 512
    N = (1 << 31) // (L * H * D) + 4  # 4 sequences start beyond element 2^31
    need = 7 * N * L * H * D * 2 + (4 << 30)  # q, k, v, out, dq, dk, dv (fp16) + slack
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB free GPU memory")
    T = N * L
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(T, H, D, device=DEV, dtype=torch.float16, generator=g)
    k = torch.randn(T, H, D, device=DEV, dtype=torch.float16, generator=g)
    v = torch.randn(T, H, D, device=DEV, dtype=torch.float16, generator=g)
    cu = cu_of([L] * N, DEV)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = disentangled_attention_varlen(q, k, v, None, None, cu, cu, L, L, position_buckets=256,
                                        max_relative_positions=512, backend="cuda")
    go = torch.randn(T, H, D, device=DEV, dtype=torch.float16, generator=g)
    dq, dk, dv = torch.autograd.grad(out, leaves, go)
    assert (N - 1) * L * H * D > (1 << 31)
    for n in (0, N - 1):
        s = slice(n * L, (n + 1) * L)
        rl = [t[s].detach().double().requires_grad_() for t in (q, k, v)]
        cq1 = cu_of([L])
        ref = ref_varlen(*rl, None, None, cq1, cq1, 256, 512)
        torch.testing.assert_close(out[s].double(), ref, atol=2e-2, rtol=2e-2)
        rg = torch.autograd.grad(ref, rl, go[s].double())
        for g_, r_ in zip((dq[s], dk[s], dv[s]), rg):
            assert (g_.double() - r_).abs().max().item() <= 6e-2 * (r_.abs().max().item() + 1e-6)
