"""torch.compile(fullgraph=True) traces the dispatcher and the kernels' custom ops (forward and backward)."""
import os

import pytest
import torch

import deberta_fast as df
from deberta_fast.backends import BACKENDS as ALL

BACKENDS = ["torch"]
if (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1") and ALL["triton"].unavailable() is None:
    BACKENDS.append("triton")


def _attn(q, k, v, pk, pq, m, backend):
    return df.disentangled_attention(q, k, v, pk, pq, position_buckets=4, max_relative_positions=8,
                                     attention_mask=m, backend=backend)


def _assert_same(out, want, leaves):
    """``out`` and its gradients with respect to ``leaves`` equal ``want``'s (fp32 tolerances)."""
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_matches_eager(backend):
    torch._dynamo.reset()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    mk = lambda *s: torch.randn(*s, device=dev, requires_grad=True)  # noqa: E731
    q, k, v, pk, pq = mk(2, 3, 17, 16), mk(2, 3, 17, 16), mk(2, 3, 17, 16), mk(3, 8, 16), mk(3, 8, 16)
    m = torch.ones(2, 17, device=dev)
    m[1, 10:] = 0
    compiled = torch.compile(_attn, fullgraph=True)
    _assert_same(compiled(q, k, v, pk, pq, m, backend), _attn(q, k, v, pk, pq, m, "torch"), (q, k, v, pk, pq))


def test_trace_constant_is_what_torch_assume_constant_result_sets():
    """deberta_fast marks trace-time constants without importing torch._dynamo at import time: the marker must
    stay the one torch's decorator sets (a torch upgrade that renames it fails here, not silently in compile)."""
    from deberta_fast.positions import trace_constant

    def a():
        return 1

    def b():
        return 1

    torch.compiler.assume_constant_result(a)
    trace_constant(b)
    assert a.__dict__ == b.__dict__ and b.__dict__


def test_slot_band_is_a_trace_constant():
    """The cuda backend reads slot_band outside its custom op: under fullgraph compile it must be a constant
    (the eager computation uses .nonzero() and int(), which would break the graph)."""
    from deberta_fast.positions import slot_band

    def f(x):
        band = slot_band(256, 512)
        return x + band.hi - band.lo

    torch._dynamo.reset()
    eager = f(torch.zeros(2))
    compiled = torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2))
    torch.testing.assert_close(compiled, eager)
    assert eager[0].item() == slot_band(256, 512).hi - slot_band(256, 512).lo


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_recompile_at_the_second_call(monkeypatch, backend):
    """A compiled call compiles one graph, not a second one at its second call, in a fresh process: nothing the
    dispatch path caches is first cached inside the trace (the environment keys of ``_env.getenv``, the triton
    backend's import check; either failed the guard dynamo put on it and recompiled)."""
    from torch._dynamo.testing import CompileCounter

    from deberta_fast import _env

    torch._dynamo.reset()
    monkeypatch.setattr(_env, "_ENV_KEYS", _env._known_keys())  # (as in a fresh process)
    monkeypatch.setattr(ALL["triton"], "_available", False)
    counter = CompileCounter()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 3, 17, 16, device=dev)
    pk = torch.randn(3, 8, 16, device=dev)
    compiled = torch.compile(_attn, fullgraph=True, backend=counter)
    for _ in range(3):
        compiled(x, x, x, pk, pk, torch.ones(2, 17, device=dev), backend)
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_shapes_fullgraph(backend):
    """``torch.compile(dynamic=True)`` makes every dim symbolic, the head dim too: the default scale is then still a
    constant of the graph (guarded, so another head dim recompiles with its own scale), and odd lengths and head
    dims give the eager torch backend's output and gradients."""
    torch._dynamo.reset()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    compiled = torch.compile(_attn, dynamic=True, fullgraph=True)
    for L, D in ((17, 16), (23, 16), (19, 24)):
        mk = lambda *s: torch.randn(*s, device=dev, requires_grad=True)  # noqa: E731
        q, k, v, pk, pq = mk(2, 3, L, D), mk(2, 3, L, D), mk(2, 3, L, D), mk(3, 8, D), mk(3, 8, D)
        m = torch.ones(2, L, device=dev)
        m[1, 10:] = 0
        _assert_same(compiled(q, k, v, pk, pq, m, backend), _attn(q, k, v, pk, pq, m, "torch"), (q, k, v, pk, pq))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_with_a_tensor_passed_twice(backend):
    """One tensor as several arguments (``q is k is v``, ``pos_key is pos_query``; packed: ``cu_seqlens_q is
    cu_seqlens_k``, the usual self-attention call): dynamo refuses an ``autograd.Function`` with a duplicate input, so
    the triton backend passes the repeats as views while compiling.  Output and gradients equal eager."""
    torch._dynamo.reset()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 3, 9, 16, device=dev, requires_grad=True)
    pk = torch.randn(3, 8, 16, device=dev, requires_grad=True)
    m = torch.ones(2, 9, device=dev)
    m[1, 5:] = 0

    def padded(x, pk, m):
        return _attn(x, x, x, pk, pk, m, backend)

    _assert_same(torch.compile(padded, fullgraph=True)(x, pk, m), padded(x, pk, m), (x, pk))

    t = torch.randn(17, 3, 16, device=dev, requires_grad=True)
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32, device=dev)

    def packed(t, pk, cu):
        return df.disentangled_attention_varlen(t, t, t, pk, pk, cu, cu, 9, 9, position_buckets=4,
                                                max_relative_positions=8, backend=backend)

    _assert_same(torch.compile(packed, fullgraph=True)(t, pk, cu), packed(t, pk, cu), (t, pk))
