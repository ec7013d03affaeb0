"""The torch backend's entry points are composite custom ops: one op in compile and export graphs, the reference's
aten ops below them (autograd, decompositions, ONNX), and fake tensors never poison the per-shape caches."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import deberta_fast as df
from deberta_fast import positions
from deberta_fast.reference import disentangled_attention_reference as reference

KW = dict(position_buckets=4, max_relative_positions=8)
H, D, SPAN = 3, 8, 4
OP = torch.ops.deberta_fast.torch_attention.default
VOP = torch.ops.deberta_fast.torch_attention_varlen.default


def _recorder(graphs):
    """A torch.compile backend that keeps dynamo's graphs and runs them as they are."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def _ops(gm):
    """The op packets a dynamo graph calls (``torch.ops.deberta_fast.torch_attention``, ``operator.eq``, ...)."""
    return [getattr(n.target, "overloadpacket", n.target) for n in gm.graph.nodes if n.op == "call_function"]


def _padded(B, L, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).requires_grad_(grad)  # noqa: E731
    mask = torch.ones(B, L, dtype=torch.long)
    mask[-1, L - L // 3:] = 0
    return mk(B, H, L, D), mk(B, H, L, D), mk(B, H, L, D), mk(H, 2 * SPAN, D), mk(H, 2 * SPAN, D), mask


def _packed(lens, grad=False):
    mk = lambda *s: torch.randn(*s).requires_grad_(grad)  # noqa: E731
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return mk(T, H, D), mk(T, H, D), mk(T, H, D), mk(H, 2 * SPAN, D), mk(H, 2 * SPAN, D), cu


def _attn(q, k, v, pk, pq, m):
    return df.disentangled_attention(q, k, v, pk, pq, attention_mask=m, backend="torch", **KW)


def test_opcheck_padded_and_packed():
    """Schema, autograd registration, fake tensors and AOT dispatch with dynamic shapes (torch.library.opcheck's
    default checks) of both ops: padded with one term, a mask and a missing table; packed with both terms."""
    q, k, v, _, pq, m = _padded(2, 11, grad=True)
    scale = 0.123
    torch.library.opcheck(OP, (q, k, v, None, pq, m, 4, 8, scale, 0.0))
    q, k, v, pk, pq, cu = _packed([5, 1, 12], grad=True)
    torch.library.opcheck(VOP, (q, k, v, pk, pq, cu, cu, 12, 12, 4, 8, scale, 0.0))


def test_the_padded_call_is_one_op_in_a_compiled_graph():
    graphs = []
    torch._dynamo.reset()
    f = torch.compile(_attn, backend=_recorder(graphs), fullgraph=True)
    for B, L in [(2, 11), (3, 17)]:
        args = _padded(B, L)
        for t in (*args[:3], args[5]):  # batch and length dynamic (the head dim stays static, as in a model)
            torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.mark_dynamic(t, t.dim() - 2 if t.dim() == 4 else 1)
        torch.testing.assert_close(f(*args), _attn(*args), rtol=0, atol=0)
    assert len(graphs) == 1, "recompiled for a new shape"
    ops = _ops(graphs[0])
    assert ops.count(OP.overloadpacket) == 1, ops
    assert not any("matmul" in str(t) or "softmax" in str(t) for t in ops), ops


def test_export_keeps_the_op_and_its_decomposition_is_correct_at_other_lengths():
    class M(torch.nn.Module):
        def forward(self, q, k, v, pk, pq, m):
            return _attn(q, k, v, pk, pq, m)

    b, n = torch.export.Dim("b", min=1, max=16), torch.export.Dim("n", min=2, max=64)
    dyn = {"q": {0: b, 2: n}, "k": {0: b, 2: n}, "v": {0: b, 2: n}, "pk": None, "pq": None, "m": {0: b, 1: n}}
    ep = torch.export.export(M(), _padded(2, 13), dynamic_shapes=dyn)
    assert "deberta_fast.torch_attention" in str(ep.graph)
    core = ep.run_decompositions()
    assert "deberta_fast" not in str(core.graph)
    for B, L in [(3, 29), (1, 5), (2, 64)]:
        args = _padded(B, L, seed=L)
        want = _attn(*args)
        torch.testing.assert_close(ep.module()(*args), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(core.module()(*args), want, rtol=1e-6, atol=1e-6)


def test_packed_call_compiles_to_one_op_and_matches_eager():
    def f(q, k, v, pk, pq, cu, max_len):
        return df.disentangled_attention_varlen(q, k, v, pk, pq, cu, cu, max_len, max_len, backend="torch", **KW)

    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=_recorder(graphs), fullgraph=True)
    q, k, v, pk, pq, cu = _packed([7, 2, 11], grad=True)
    out = compiled(q, k, v, pk, pq, cu, 11)
    want = f(q, k, v, pk, pq, cu, 11)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    ops = _ops(graphs[0])
    assert ops.count(VOP.overloadpacket) == 1, ops
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, pk, pq), g), torch.autograd.grad(want, (q, k, v, pk, pq), g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_fake_tensors_do_not_enter_the_shape_caches(packed):
    """A call under FakeTensorMode (what opcheck, export and some tools do) runs the trace path: afterwards an
    eager call of the same shape still gets real tables and the right answer."""
    caches = positions.shape_caches()
    for cached in caches:
        cached.cache_clear()
    args = _packed([6, 9]) if packed else _padded(2, 9)
    run = ((lambda q, k, v, pk, pq, cu: df.disentangled_attention_varlen(q, k, v, pk, pq, cu, cu, 9, 9,
                                                                          backend="torch", **KW))
           if packed else _attn)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = run(*(mode.from_tensor(a) for a in args))
    assert fake.shape == args[0].shape
    for cached in caches:
        assert cached.cache_info().currsize == 0
    got = run(*args)
    if packed:  # the first sequence alone
        got, want = got[:6].transpose(0, 1)[None], reference(*_first_sequence(*args), **KW)
    else:
        want = reference(*args[:5], attention_mask=args[5], **KW)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_trimmed_table_under_a_fake_mode_leaves_the_caches_alone():
    """The cuda backend reads the trimmed table on its host path: under FakeTensorMode (non-strict export) that
    read fails, and must not leave a fake tensor in the caches for the next eager call of that shape."""
    caches = positions.shape_caches()
    for cached in caches:
        cached.cache_clear()
    with FakeTensorMode():
        with pytest.raises(Exception):
            positions.trimmed_slot_table(11, 13, 4, 8, 4)
    assert all(c.cache_info().currsize == 0 for c in caches)
    table, lo, hi = positions.trimmed_slot_table(11, 13, 4, 8, 4)
    assert type(table) is torch.Tensor and (lo, hi) == (0, 7)


def test_auto_takes_triton_before_cuda_while_tracing(monkeypatch):
    """``backend="auto"`` tries cuda first in eager mode but triton first while tracing (the cuda backend's host
    path reads table values a trace cannot): both backends made to accept every call here."""
    from deberta_fast import dispatch
    from deberta_fast.backends import BACKENDS

    monkeypatch.setattr(dispatch, "_reasons", lambda b, call: [] if b.name in ("cuda", "triton") else ["no"])
    q, k, v, pk, pq, mask = _padded(2, 9)
    call = dispatch.build_call(q, k, v, pk, pq, attention_mask=mask, scale=None, dropout_p=0.0, **KW)
    assert dispatch.choose_backend(call, "auto") is BACKENDS["cuda"]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq = mode.from_tensor(q)
        fcall = dispatch.build_call(fq, *(mode.from_tensor(t) for t in (k, v, pk, pq)), attention_mask=None,
                                    scale=None, dropout_p=0.0, **KW)
        assert dispatch.choose_backend(fcall, "auto") is BACKENDS["triton"]


def _first_sequence(q, k, v, pk, pq, cu):
    """``(q, k, v, pk, pq)`` of the first packed sequence as ``[1, H, L, D]``."""
    n = int(cu[1])
    return (*(t[:n].transpose(0, 1)[None] for t in (q, k, v)), pk, pq)
