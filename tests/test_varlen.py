"""disentangled_attention_varlen and the pack/unpack helpers (torch backend on CPU)."""
import pytest
import torch

from deberta_fast import disentangled_attention, disentangled_attention_varlen, last_backend
from deberta_fast.packing import is_contiguous_padding, pack, pack_info, pad_varlen, unpack

KW = dict(position_buckets=4, max_relative_positions=8)
H, D, SPAN = 2, 8, 4


def _packed(lens_q, lens_k, dtype=torch.float64, grad=False):
    mk = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=grad)  # noqa: E731
    q, k, v = mk(sum(lens_q), H, D), mk(sum(lens_k), H, D), mk(sum(lens_k), H, D)
    pk, pq = mk(H, 2 * SPAN, D), mk(H, 2 * SPAN, D)
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return q, k, v, pk, pq, cu(lens_q), cu(lens_k)


def _per_sequence(q, k, v, pk, pq, cq, ck):
    outs = []
    for n in range(len(cq) - 1):
        qs = q[cq[n]:cq[n + 1]].transpose(0, 1)[None]
        ks = k[ck[n]:ck[n + 1]].transpose(0, 1)[None]
        vs = v[ck[n]:ck[n + 1]].transpose(0, 1)[None]
        outs.append(disentangled_attention(qs, ks, vs, pk, pq, backend="torch", **KW)[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("lens_q,lens_k", [([5, 1, 23, 9], None), ([3, 17], [7, 2]), ([1], None), ([40, 2], None)])
def test_varlen_equals_per_sequence(lens_q, lens_k):
    lens_k = lens_k or lens_q
    q, k, v, pk, pq, cq, ck = _packed(lens_q, lens_k, grad=True)
    out = disentangled_attention_varlen(q, k, v, pk, pq, cq, ck, max(lens_q), max(lens_k), **KW)
    assert last_backend() == "torch" and out.shape == q.shape
    want = _per_sequence(q, k, v, pk, pq, cq, ck)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    got_g = torch.autograd.grad(out, (q, k, v, pk, pq), g)
    want_g = torch.autograd.grad(want, (q, k, v, pk, pq), g)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_varlen_errors():
    q, k, v, pk, pq, cq, ck = _packed([3, 4], [3, 4])
    with pytest.raises(ValueError, match=r"3-D \[total_tokens, H, D\]"):
        disentangled_attention_varlen(q[None], k, v, pk, pq, cq, ck, 4, 4, **KW)
    with pytest.raises(TypeError, match="int32"):
        disentangled_attention_varlen(q, k, v, pk, pq, cq.float(), ck, 4, 4, **KW)
    with pytest.raises(ValueError, match="same number of sequences"):
        disentangled_attention_varlen(q, k, v, pk, pq, cq[:2], ck, 4, 4, **KW)
    with pytest.raises(TypeError, match="needs cu_seqlens"):
        disentangled_attention_varlen(q, k, v, pk, pq, **KW)
    with pytest.raises(ValueError, match=r"\[H, 2\*span, D\]"):
        disentangled_attention_varlen(q, k, v, pk[None], pq, cq, ck, 4, 4, **KW)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pack_unpack_round_trip(side):
    B, L = 4, 11
    lens = torch.tensor([11, 1, 6, 0])
    pos = torch.arange(L)[None]
    mask = pos < lens[:, None] if side == "right" else pos >= (L - lens)[:, None]
    info = pack_info(mask)
    assert info.total == int(lens.sum()) and info.max_seqlen == 11
    assert info.cu_seqlens.tolist() == [0, 11, 12, 18, 18]
    x = torch.randn(B, L, 3, 5)
    p = pack(x, info)
    assert p.shape == (info.total, 3, 5)
    back = unpack(p, info, fill=0.0)
    torch.testing.assert_close(back, x * mask[..., None, None])
    # the varlen helpers agree with pack_info
    padded, kmask, _ = pad_varlen(p, info.cu_seqlens, info.max_seqlen)
    assert padded.shape == (B, 3, L, 5) and kmask.sum() == info.total


def test_pack_refuses_holes():
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]])
    assert is_contiguous_padding(mask).tolist() == [False, True]
    with pytest.raises(ValueError, match="non-contiguous"):
        pack_info(mask)
    with pytest.raises(ValueError, match="2-D"):
        pack_info(mask[0])
