"""Triton packed (varlen) path: forward and all five gradients against the float64 reference run
sequence by sequence; dropout (keep rate, independence, forward/backward consistency with the same
mask); determinism; dispatch, refusals and the custom ops.  Interpreter on CPU (tests/conftest.py)."""
import copy

import pytest
import torch

import deberta_fast
from deberta_fast import disentangled_attention, disentangled_attention_reference, disentangled_attention_varlen
from deberta_fast.backends.triton_backend import TritonBackend, triton_attention_varlen
from deberta_fast.dispatch import BackendUnavailableError, build_varlen_call
from deberta_fast.positions import attention_span

from philox_ref import keep_of, keep_scale
from triton_cases import BUCKETED, UNBUCKETED, V3, assert_close_fp32, assert_close_lowp, cast, max_err

pytest.importorskip("triton")

NAMES = ("out", "dq", "dk", "dv", "dpos_key", "dpos_query")


def cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def make_packed(lens_q, lens_k=None, H=2, D=16, terms="both", buckets=BUCKETED):
    """float32 ``(q, k, v, pos_key, pos_query, cu_q, cu_k, max_q, max_k, kwargs)``."""
    lens_k = lens_q if lens_k is None else lens_k
    span = attention_span(*buckets)
    q, k, v = torch.randn(sum(lens_q), H, D), torch.randn(sum(lens_k), H, D), torch.randn(sum(lens_k), H, D)
    pk = torch.randn(H, 2 * span, D) if terms in ("both", "c2p") else None
    pq = torch.randn(H, 2 * span, D) if terms in ("both", "p2c") else None
    kw = dict(position_buckets=buckets[0], max_relative_positions=buckets[1])
    return q, k, v, pk, pq, cu(lens_q), cu(lens_k), max(max(lens_q), 1), max(max(lens_k), 1), kw


def per_sequence(q, k, v, pk, pq, cq, ck, kw, probs_fn=None):
    """The oracle: ``disentangled_attention(..., backend="torch")`` on every sequence alone
    (``probs_fn(n, probs)`` -> probabilities to use instead, for the dropout checks)."""
    outs = []
    for n in range(len(cq) - 1):
        qs = q[cq[n]:cq[n + 1]].transpose(0, 1)[None]
        ks = k[ck[n]:ck[n + 1]].transpose(0, 1)[None]
        vs = v[ck[n]:ck[n + 1]].transpose(0, 1)[None]
        if qs.shape[2] == 0:
            continue
        if ks.shape[2] == 0:  # no key: the row attends to nothing (the torch backend's zero output)
            outs.append(qs.new_zeros(qs.shape[2], qs.shape[1], qs.shape[3]))
            continue
        if probs_fn is None:
            o = disentangled_attention(qs, ks, vs, pk, pq, backend="torch", **kw)
        else:
            _, probs = disentangled_attention_reference(qs, ks, vs, pk, pq, return_probs=True, **kw)
            o = torch.matmul(probs_fn(n, probs), vs)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def grads(fn, tensors, dtype, do):
    ts = cast(tensors, dtype, grad=True)
    out = fn(*ts)
    live = [t for t in ts if t is not None]
    return [out] + list(torch.autograd.grad(out, live, do.to(dtype)))


def _names(pk, pq):
    return [n for n, present in zip(NAMES, (1, 1, 1, 1, pk is not None, pq is not None)) if present]


def check(lens_q, lens_k=None, dtype=torch.float32, H=2, D=16, **kw):
    q, k, v, pk, pq, cq, ck, mq, mk, akw = make_packed(lens_q, lens_k, H, D, **kw)
    ts = (q, k, v, pk, pq)
    do = torch.randn(q.shape)

    def triton(q, k, v, pk, pq):
        return disentangled_attention_varlen(q, k, v, pk, pq, cq, ck, mq, mk, backend="triton", **akw)

    def oracle(q, k, v, pk, pq):
        return per_sequence(q, k, v, pk, pq, cq, ck, akw)

    got = grads(triton, ts, dtype, do)
    assert deberta_fast.last_backend() == "triton"
    ref = grads(oracle, ts, torch.float64, do)
    low = grads(oracle, ts, dtype, do) if dtype != torch.float32 else None
    for i, name in enumerate(_names(pk, pq)):
        assert got[i].dtype == dtype and got[i].shape == ref[i].shape, name
        if dtype == torch.float32:
            assert_close_fp32(got[i], ref[i], tol=2e-5, what=name)
        else:
            assert_close_lowp(got[i], ref[i], low[i], what=name)


@pytest.mark.parametrize("terms", ["both", pytest.param("c2p", marks=pytest.mark.slow),
                                   pytest.param("p2c", marks=pytest.mark.slow), "none"])
def test_terms_self_attention(terms):
    """Length 1, odd lengths, and a 130-token sequence (interior saturated tiles with buckets (4, 8))."""
    check([1, 37, 5, 130], terms=terms)


def test_cross_lengths_per_sequence():
    """Lq != Lk in every sequence (cu_seqlens_q != cu_seqlens_k), including 1 x 33 and 64 x 1."""
    check([3, 17, 64, 1, 45], [7, 2, 1, 33, 45])


def test_empty_sequences():
    """Zero-length sequences (pack_info of an all-padding row) and a sequence with queries but no keys."""
    check([0, 9, 4, 0, 20], [0, 9, 0, 6, 20], terms="both")


def test_unbucketed():
    check([50, 3, 29], buckets=UNBUCKETED)


def test_v3_buckets_head_dim_24():
    check([40, 1, 21], buckets=V3, D=24, H=3)


@pytest.mark.parametrize("terms", ["both", pytest.param("c2p", marks=pytest.mark.slow),
                                   pytest.param("p2c", marks=pytest.mark.slow)])
def test_fp16(terms):
    check([48, 1, 13, 70], [30, 5, 13, 70], dtype=torch.float16, terms=terms)


def test_bf16():
    check([33, 8, 40], dtype=torch.bfloat16, D=32)


def test_strided_packed_inputs():
    """q, k, v as views of one fused ``[T, 3, H, D]`` projection (token stride 3*H*D), no copies."""
    lens = [12, 40, 7]
    q, k, v, pk, pq, cq, ck, mq, mk, kw = make_packed(lens)
    qkv = torch.stack([q, k, v], 1)
    qs, ks, vs = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    assert not qs.is_contiguous()
    out = disentangled_attention_varlen(qs, ks, vs, pk, pq, cq, ck, mq, mk, backend="triton", **kw)
    ref = per_sequence(*cast((q, k, v, pk, pq), torch.float64), cq, ck, kw)
    assert_close_fp32(out, ref, what="out")


def test_lse_layout():
    """The forward op's statistics are ``[2, H, Tq]`` float32: with them, the log-sum-exp of each
    sequence's scores."""
    from deberta_fast._kernels.triton_attention_launch import lse_from_stats
    lens = [5, 33]
    q, k, v, pk, pq, cq, ck, mq, mk, kw = make_packed(lens)
    c = build_varlen_call(q, k, v, pk, pq, cq, ck, mq, mk, scale=None, dropout_p=0.0, **kw)
    _, stats = torch.ops.deberta_fast.triton_varlen_fwd(q, k, v, pk, pq, cq, ck, mq, mk, 4, 8, c.span, c.scale, 0.0,
                                                        None)
    assert stats.shape == (2, 2, sum(lens)) and stats.dtype == torch.float32
    lse = lse_from_stats(stats)
    for n in range(len(lens)):
        sl = slice(int(cq[n]), int(cq[n + 1]))
        qs, ks, vs = (t[sl].transpose(0, 1)[None] for t in cast((q, k, v), torch.float64))
        _, ref_lse = disentangled_attention_reference(qs, ks, vs, *cast((pk, pq), torch.float64), return_lse=True,
                                                      **kw)
        assert_close_fp32(lse[:, sl], ref_lse[0], what=f"lse of sequence {n}")


def test_relative_share_on_the_host(monkeypatch):
    """The breakdown's ``REL_SHARE = "host"`` experiment on packed calls: the kernels skip their epilogue and the
    launcher adds dq's / dk's relative share in place into its float32 buffers."""
    from deberta_fast._kernels import triton_attention_launch as launch
    monkeypatch.setattr(launch, "REL_SHARE", "host")
    check([1, 37, 5, 60], [9, 40, 5, 1])


def test_backward_op_refuses_batched_position_tables():
    """The packed backward's kernels index ``pos_key`` / ``pos_query`` by head alone (their batch index is the
    sequence): a direct call of the op with ``[B, H, R, D]`` tables is refused, not read at the wrong rows."""
    lens = [5, 9]
    q, k, v, pk, pq, cq, ck, mq, mk, kw = make_packed(lens)
    c = build_varlen_call(q, k, v, pk, pq, cq, ck, mq, mk, scale=None, dropout_p=0.0, **kw)
    out, stats = torch.ops.deberta_fast.triton_varlen_fwd(q, k, v, pk, pq, cq, ck, mq, mk, 4, 8, c.span, c.scale,
                                                          0.0, None)
    with pytest.raises(ValueError, match=r"packed calls take pos_key / pos_query \[H, 2\*span, D\]"):
        torch.ops.deberta_fast.triton_varlen_bwd(torch.randn_like(out), q, k, v, pk[None].expand(2, -1, -1, -1), pq,
                                                 out, stats, cq, ck, mq, mk, 4, 8, c.span, c.scale, 0.0, None)


def test_backward_is_deterministic():
    q, k, v, pk, pq, cq, ck, mq, mk, kw = make_packed([40, 1, 25], [40, 9, 25], H=1)
    do = torch.randn(q.shape)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)  # same dropout seed: the runs must agree bit for bit

        def fn(q, k, v, pk, pq):
            return disentangled_attention_varlen(q, k, v, pk, pq, cq, ck, mq, mk, dropout_p=0.2, backend="triton",
                                                 **kw)
        runs.append(grads(fn, (q, k, v, pk, pq), torch.float32, do))
    for a, b, name in zip(*runs, NAMES):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


# ---------------------------------------------------------------- dropout

P_DROP = 0.3


def _scale(q, k, v, pk, pq, cq, ck, mq, mk, kw):
    return build_varlen_call(q, k, v, pk, pq, cq, ck, mq, mk, scale=None, dropout_p=0.0, **kw).scale


def recover_keep_masks(lens_q, lens_k, H, seed, buckets=BUCKETED):
    """The kernel's keep-masks (one bool ``[H, Lq_n, Lk_n]`` per sequence) for ``seed``: with ``V``
    one-hot in the key's position within its sequence the output is ``probs * keep * keep_scale(p)``."""
    D = max(lens_k)
    q, k, _, pk, pq, cq, ck, mq, mk, kw = make_packed(lens_q, lens_k, H, D, buckets=buckets)
    pos_in_seq = torch.cat([torch.arange(n) for n in lens_k])
    v = torch.nn.functional.one_hot(pos_in_seq, D).float()[:, None, :].expand(-1, H, -1).contiguous()
    out = triton_attention_varlen(q, k, v, pk, pq, cq, ck, mq, mk, position_buckets=kw["position_buckets"],
                                  max_relative_positions=kw["max_relative_positions"], span=pk.shape[-2] // 2,
                                  scale=_scale(q, k, v, pk, pq, cq, ck, mq, mk, kw), dropout_p=P_DROP, seed=seed)
    keeps = []
    for n in range(len(lens_q)):
        qs = q[cq[n]:cq[n + 1]].transpose(0, 1)[None].double()
        ks = k[ck[n]:ck[n + 1]].transpose(0, 1)[None].double()
        _, probs = disentangled_attention_reference(qs, ks, ks, *cast((pk, pq), torch.float64), return_probs=True,
                                                    **kw)
        got = out[cq[n]:cq[n + 1], :, :lens_k[n]].transpose(0, 1).double()
        ratio = got / (keep_scale(P_DROP) * probs[0])
        keep = ratio > 0.5
        # every entry is exactly dropped (0) or kept and rescaled by keep_scale(p) (1)
        assert max_err(ratio, keep.double()) < 1e-4
        # and nothing leaks into the one-hot columns past the sequence's keys
        assert torch.equal(out[cq[n]:cq[n + 1], :, lens_k[n]:], torch.zeros_like(out[cq[n]:cq[n + 1], :, lens_k[n]:]))
        keeps.append(keep)
    return keeps


def test_dropout_keep_rate_and_independence():
    lens = [48, 48, 29]
    keeps = recover_keep_masks(lens, [32, 32, 17], H=2, seed=1234)
    allk = torch.cat([m.reshape(-1) for m in keeps])
    n = allk.numel()
    rate = allk.double().mean().item()
    sd = ((1 - P_DROP) * P_DROP / n) ** 0.5
    assert abs(rate - (1 - P_DROP)) < 5 * sd, f"keep rate {rate:.4f}, expected {1 - P_DROP} +- {5 * sd:.4f}"
    # same shapes, different sequences / heads / tiles: different masks
    assert not torch.equal(keeps[0], keeps[1])
    assert not torch.equal(keeps[0][0], keeps[0][1])
    assert not torch.equal(keeps[0][:, :16], keeps[0][:, 16:32])
    other = recover_keep_masks(lens, [32, 32, 17], H=2, seed=1235)
    assert not torch.equal(keeps[0], other[0])


def test_dropout_mask_is_the_stream_per_sequence():
    """Packed calls draw ``philox_ref.keep_of`` with ``bh = n * H + h`` and positions within each sequence (the cuda
    backend's varlen stream): lengths across 16-query / 16-key blocks, odd, and a sequence of one query."""
    import numpy as np
    lens_q, lens_k, H, seed = [40, 1, 23], [32, 7, 37], 2, 4321
    keeps = recover_keep_masks(lens_q, lens_k, H, seed)
    for n, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        bh, i, j = np.meshgrid(n * H + np.arange(H), np.arange(lq), np.arange(lk), indexing="ij")
        assert torch.equal(keeps[n], torch.from_numpy(keep_of(seed, 0, bh, i, j, P_DROP))), n


def test_dropout_forward_backward_match_reference_with_same_mask():
    lens_q, lens_k, H, D, seed = [40, 1, 23], [32, 7, 23], 2, 16, 99
    keeps = recover_keep_masks(lens_q, lens_k, H, seed)
    q, k, v, pk, pq, cq, ck, mq, mk, kw = make_packed(lens_q, lens_k, H, D)
    scale = _scale(q, k, v, pk, pq, cq, ck, mq, mk, kw)
    do = torch.randn(q.shape)

    def kernel(q, k, v, pk, pq):
        return triton_attention_varlen(q, k, v, pk, pq, cq, ck, mq, mk, position_buckets=4, max_relative_positions=8,
                                       span=pk.shape[-2] // 2, scale=scale, dropout_p=P_DROP, seed=seed)

    def reference(q, k, v, pk, pq):
        return per_sequence(q, k, v, pk, pq, cq, ck, kw,
                            probs_fn=lambda n, probs: probs * keeps[n] * keep_scale(P_DROP))

    got = grads(kernel, (q, k, v, pk, pq), torch.float32, do)
    ref = grads(reference, (q, k, v, pk, pq), torch.float64, do)
    for a, b, name in zip(got, ref, NAMES):
        assert_close_fp32(a, b, tol=2e-5, what=name)


# ---------------------------------------------------------------- dispatch, refusals, ops

def test_dispatch_auto_and_refusals(monkeypatch):
    q, k, v, pk, pq, cq, ck, mq, mk, kw = make_packed([6, 11])
    disentangled_attention_varlen(q, k, v, pk, pq, cq, ck, mq, mk, **kw)
    assert deberta_fast.last_backend() == "triton"
    assert TritonBackend.supports_varlen

    def refusals(*ts):
        return TritonBackend().refusals_varlen(build_varlen_call(*ts, cq, ck, mq, mk, scale=None, dropout_p=0.0, **kw))

    assert refusals(q, k, v, pk, pq) == []
    (msg,) = refusals(*cast((q, k, v, pk, pq), torch.float64))
    assert "float64" in msg
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    (msg,) = refusals(qt, k, v, pk, pq)
    assert "query" in msg and ".contiguous()" in msg
    with pytest.raises(BackendUnavailableError, match="float64"):
        disentangled_attention_varlen(*cast((q, k, v, pk, pq), torch.float64), cq, ck, mq, mk, backend="triton", **kw)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, pk, pq, cq, ck = (t.cpu() for t in (q, k, v, pk, pq, cq, ck))  # CPU, no interpreter
    (msg,) = refusals(q, k, v, pk, pq)
    assert "needs CUDA tensors" in msg
    disentangled_attention_varlen(q, k, v, pk, pq, cq, ck, mq, mk, **kw)
    assert deberta_fast.last_backend() == "torch"


def test_grid_limit_refusal():
    H = 4
    lens = [1] * 16384  # N*H = 65536 > 65535
    q = torch.randn(len(lens), H, 8)
    c = build_varlen_call(q, q, q, None, None, cu(lens), cu(lens), 1, 1, position_buckets=4,
                          max_relative_positions=8, scale=None, dropout_p=0.0)
    (msg,) = TritonBackend().refusals_varlen(c)
    assert "65535" in msg and "N*H" in msg


def test_custom_ops_opcheck():
    """Schema and fake (meta) implementations of both packed custom ops."""
    q, k, v, pk, pq, cq, ck, mq, mk, kw = make_packed([4, 9], [5, 2])
    scale = _scale(q, k, v, pk, pq, cq, ck, mq, mk, kw)
    args = (q, k, v, pk, pq, cq, ck, mq, mk, 4, 8, 4, scale, 0.0, None)
    torch.library.opcheck(torch.ops.deberta_fast.triton_varlen_fwd, args,
                          test_utils=("test_schema", "test_faketensor"))
    out, stats = torch.ops.deberta_fast.triton_varlen_fwd(*args)
    bargs = (torch.randn_like(out), q, k, v, pk, pq, out, stats, cq, ck, mq, mk, 4, 8, 4, scale, 0.0, None)
    torch.library.opcheck(torch.ops.deberta_fast.triton_varlen_bwd, bargs,
                          test_utils=("test_schema", "test_faketensor"))
    seed = torch.tensor([2**40 + 3])  # dropout: the seed an int64 [1] tensor on the inputs' device
    for op, a in ((torch.ops.deberta_fast.triton_varlen_fwd, args), (torch.ops.deberta_fast.triton_varlen_bwd, bargs)):
        torch.library.opcheck(op, (*a[:-2], 0.1, seed), test_utils=("test_schema", "test_faketensor"))


def test_patched_hf_model_packs_through_triton():
    """A patched HF DeBERTa-v2 model (padding in the batch, pack=True) runs its attention through the
    packed Triton path; loss and every parameter gradient stay as close to the float64 truth as HF's
    own float32 eager run (x4 over all tensors) and within the fp32 bound per tensor."""
    transformers = pytest.importorskip("transformers")
    from hf_configs import v2_config

    from deberta_fast import patched

    model = transformers.DebertaV2ForSequenceClassification(v2_config(conv=3)).eval()
    ids = torch.randint(1, 97, (3, 21))
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[1, 13:] = 0
    mask[2, 5:] = 0
    labels = torch.tensor([0, 1, 1])

    def run(m):
        m.zero_grad()
        loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return [loss.detach().double()] + [p.grad.detach().double().clone() for p in m.parameters()]

    truth = run(copy.deepcopy(model).double())
    eager = run(model)
    with patched(model, backend="triton", pack=True):
        packs = [e.__dict__["_deberta_fast_pack"] for e in model.modules() if "_deberta_fast_pack" in e.__dict__]
        assert packs and all(packs)  # the encoder packs for this backend
        fast = run(model)
        assert deberta_fast.last_backend() == "triton"
    eager_err = max(max_err(e, t) for e, t in zip(eager, truth))
    fast_err = max(max_err(f, t) for f, t in zip(fast, truth))
    assert eager_err > 0 and fast_err <= 4 * eager_err, f"max abs err {fast_err:.3g} > 4 x eager {eager_err:.3g}"
    for f, t in zip(fast, truth):
        assert_close_fp32(f, t, tol=2e-5, what="loss/grad")
