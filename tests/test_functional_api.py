"""disentangled_attention: validation messages, mask semantics and dispatch (torch backend, CPU)."""
import math

import pytest
import torch

import deberta_fast
from deberta_fast import BackendUnavailableError, disentangled_attention, last_backend
from deberta_fast.backends import BACKENDS

KW = dict(position_buckets=4, max_relative_positions=8)


def _qkv(B=2, H=3, Lq=7, Lk=7, D=8, span=4, dtype=torch.float64):
    q = torch.randn(B, H, Lq, D, dtype=dtype)
    k = torch.randn(B, H, Lk, D, dtype=dtype)
    v = torch.randn(B, H, Lk, D, dtype=dtype)
    pk = torch.randn(H, 2 * span, D, dtype=dtype)
    pq = torch.randn(H, 2 * span, D, dtype=dtype)
    return q, k, v, pk, pq


def _naive(q, k, v, pk, pq, mask_fn, scale):
    """Element by element from the paper's formula with HF's bucket/clamp (independent of reference.py)."""
    from deberta_fast.positions import relative_delta
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    span = pk.shape[-2] // 2
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                s = []
                for j in range(Lk):
                    d = relative_delta(torch.tensor([i - j]), 4, 8).item()
                    slot = min(max(d + span, 0), 2 * span - 1)
                    s.append(scale * (q[b, h, i] @ k[b, h, j] + q[b, h, i] @ pk[h, slot] + k[b, h, j] @ pq[h, slot]))
                s = torch.stack(s)
                keep = torch.tensor([mask_fn(b, i, j) for j in range(Lk)])
                s = torch.where(keep, s, torch.tensor(-math.inf, dtype=s.dtype)) if keep.any() else torch.zeros_like(s)
                out[b, h, i] = torch.softmax(s, 0) @ v[b, h]
    return out


@pytest.mark.parametrize("Lq,Lk", [(7, 7), (5, 11), (12, 3)])
def test_matches_naive_formula_with_padding(Lq, Lk):
    q, k, v, pk, pq = _qkv(Lq=Lq, Lk=Lk)
    m = torch.ones(2, Lk, dtype=torch.bool)
    m[1, Lk // 2:] = False
    got = disentangled_attention(q, k, v, pk, pq, attention_mask=m, **KW)
    scale = deberta_fast.reference.default_scale(8, 2)  # HF: float32 sqrt
    if Lq == Lk:  # HF outer product: padded query rows are uniform
        fn = lambda b, i, j: bool(m[b, i] and m[b, j])  # noqa: E731
    else:
        fn = lambda b, i, j: bool(m[b, j])  # noqa: E731
    torch.testing.assert_close(got, _naive(q, k, v, pk, pq, fn, scale), rtol=1e-6, atol=1e-8)
    assert last_backend() == "torch"


@pytest.mark.parametrize("shape", [(0, 9), (0, 1, 1, 9), (0, 1, 9), (0, 1, 7, 9)])
def test_empty_batch_with_every_mask_form(shape):
    """B = 0: the empty output and gradients, with a mask of each form (a key mask broadcast over the heads and
    queries is reshaped to ``[B, Lk]``: its key count given, not inferred, which an empty batch leaves undefined)."""
    q, k, v, pk, pq = _qkv(B=0, Lq=7, Lk=9, dtype=torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pq)]
    backends = ["torch"] + (["triton"] if not torch.cuda.is_available() else [])
    for backend in backends:
        with pytest.MonkeyPatch.context() as mp:
            if backend == "triton":
                mp.setenv("TRITON_INTERPRET", "1")
                if BACKENDS["triton"].unavailable() is not None:
                    continue
            out = disentangled_attention(q, k, v, pk, pq, attention_mask=torch.ones(shape, dtype=torch.bool),
                                         backend=backend, **KW)
            assert out.shape == q.shape and last_backend() == backend
            for t, g in zip(leaves, torch.autograd.grad(out.sum(), leaves, allow_unused=True)):
                assert g is None or (g.shape == t.shape and not g.isnan().any())


@pytest.mark.parametrize("shape", ["B,1,1,Lk", "1,H,1,Lk", "B,1,Lk"])
@pytest.mark.parametrize("Lq,Lk", [(7, 7), (5, 11)])
def test_masks_broadcast_over_the_queries(shape, Lq, Lk):
    """A mask with a query dim of 1 (HF's extended ``[B, 1, 1, Lk]``, which DeBERTa's attention broadcasts) masks keys
    only: unlike a 2-D padding mask, no query row is made uniform; a head masking every key is (row without keys)."""
    q, k, v, pk, pq = _qkv(Lq=Lq, Lk=Lk)
    m = torch.rand(2, 3, Lk) > 0.3
    m[1, 2] = False  # batch 1, head 2: no key at all
    if shape == "B,1,1,Lk":
        mask, fn = m[:, :1, None].long(), (lambda b, h, i, j: bool(m[b, 0, j]))
    elif shape == "1,H,1,Lk":
        mask, fn = m[1:, :, None], (lambda b, h, i, j: bool(m[1, h, j]))
    else:
        mask, fn = m[:, 0, None].float(), (lambda b, h, i, j: bool(m[b, 0, j]))
    scale = deberta_fast.reference.default_scale(8, 2)
    want = torch.stack([torch.stack([_naive(q[b:b + 1, h:h + 1], k[b:b + 1, h:h + 1], v[b:b + 1, h:h + 1],
                                            pk[h:h + 1], pq[h:h + 1], lambda _b, i, j, b=b, h=h: fn(b, h, i, j),
                                            scale)[0, 0] for h in range(3)]) for b in range(2)])
    got = disentangled_attention(q, k, v, pk, pq, attention_mask=mask, **KW)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    # a mask broadcast over the heads too is a key mask (O(L) in the kernels; the cuda backend serves it)
    kind = deberta_fast.reference.mask_kind(mask, 2, 3, Lq, Lk)
    assert kind == ("full" if shape == "1,H,1,Lk" else "key")
    # the triton kernels' key- or full-mask path: on the GPU where there is one, else under the interpreter (which
    # Triton chooses when the kernels are defined: set only on CPU-only machines)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with pytest.MonkeyPatch.context() as mp:
        if dev == "cpu":
            mp.setenv("TRITON_INTERPRET", "1")
        if BACKENDS["triton"].unavailable() is not None:
            return
        leaves = [t.to(dev, torch.float32).requires_grad_() for t in (q, k, v, pk, pq)]
        mask = mask.to(dev)
        got = disentangled_attention(*leaves, attention_mask=mask, backend="triton", **KW)
        torch.testing.assert_close(got.double().cpu(), want, rtol=2e-5, atol=2e-5)
        full = mask[:, None] if mask.dim() == 3 else mask
        dense = full.expand(full.shape[0], full.shape[1], Lq, Lk).contiguous()  # the same mask, materialised
        assert deberta_fast.reference.mask_kind(dense, 2, 3, Lq, Lk) == "full"
        again = disentangled_attention(*leaves, attention_mask=dense, backend="triton", **KW)
        assert torch.equal(got, again)
        go = torch.randn_like(got)
        for a, b in zip(torch.autograd.grad(got, leaves, go), torch.autograd.grad(again, leaves, go)):
            assert torch.equal(a, b)


def test_padded_rows_are_uniform_and_terms_optional():
    q, k, v, pk, pq = _qkv()
    m = torch.ones(2, 7)
    m[0, 5:] = 0
    out = disentangled_attention(q, k, v, pk, None, attention_mask=m, **KW)
    torch.testing.assert_close(out[0, :, 5], v[0].mean(-2))
    plain = disentangled_attention(q, k, v, **KW)
    want = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    torch.testing.assert_close(plain, want)


def test_batched_pos_tables_and_scale():
    q, k, v, pk, pq = _qkv()
    a = disentangled_attention(q, k, v, pk, pq, scale=0.3, **KW)
    b = disentangled_attention(q, k, v, pk[None].expand(2, -1, -1, -1), pq[None].expand(2, -1, -1, -1),
                               scale=0.3, **KW)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad,match", [
    (lambda t: dict(query=t["query"][0]), "4-D"),
    (lambda t: dict(value=t["value"][:, :, :3]), "same shape"),
    (lambda t: dict(key=t["key"][:1], value=t["value"][:1]), "does not match"),
    (lambda t: dict(pos_key=t["pos_key"][:, :5], pos_query=t["pos_query"][:, :5]), "has 5 rows; it needs"),
    (lambda t: dict(pos_key=t["pos_key"][:2]), r"\[H, 2\*span, D\]"),
    (lambda t: dict(pos_query=t["pos_query"][:, :6]), "same number of rows"),
    (lambda t: dict(key=t["key"].float(), value=t["value"].float()), "dtype"),
    (lambda t: dict(query=t["query"].long()), "float16"),
    (lambda t: dict(attention_mask=torch.ones(2, 6)), r"\[B, Lk\]"),
    (lambda t: dict(attention_mask=torch.ones(2, 7, 6)), "does not fit"),
    (lambda t: dict(attention_mask=torch.ones(2, 1, 2, 7)), "does not fit"),
    (lambda t: dict(attention_mask=torch.ones(7)), "1-D"),
    (lambda t: dict(dropout_p=1.0), "dropout_p"),
    (lambda t: dict(backend="flash"), "unknown backend"),
])
def test_clear_errors(bad, match):
    q, k, v, pk, pq = _qkv()
    args = dict(query=q, key=k, value=v, pos_key=pk, pos_query=pq, **KW)
    args.update(bad(args))
    with pytest.raises((ValueError, TypeError), match=match):
        disentangled_attention(**args)


def test_named_backend_refusal_explains_and_auto_serves():
    q, k, v, pk, pq = _qkv(dtype=torch.float64)
    for name in ("triton", "cuda"):
        reasons = BACKENDS[name].unavailable() or "; ".join(BACKENDS[name].refusals(
            deberta_fast.dispatch.build_call(q, k, v, pk, pq, attention_mask=None, scale=None, dropout_p=0.0, **KW)))
        assert reasons  # fp64 on CPU is never a kernel's job
        with pytest.raises(BackendUnavailableError, match=f"backend='{name}' cannot serve"):
            disentangled_attention(q, k, v, pk, pq, backend=name, **KW)
    disentangled_attention(q, k, v, pk, pq, backend="auto", **KW)
    assert last_backend() == "torch"


def test_gradients_flow_to_every_input():
    q, k, v, pk, pq = (t.requires_grad_(True) for t in _qkv())
    out = disentangled_attention(q, k, v, pk, pq, **KW)
    grads = torch.autograd.grad(out.sum(), (q, k, v, pk, pq))
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_auto_warns_once_when_it_picks_the_triton_interpreter(monkeypatch):
    """A TRITON_INTERPRET=1 left in the environment makes ``auto`` run the (slow) interpreter on CPU:
    said once, with the fix."""
    import warnings

    from deberta_fast import dispatch
    pytest.importorskip("triton")
    if BACKENDS["triton"].unavailable() or torch.cuda.is_available():
        pytest.skip("needs triton on a CPU-only machine")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_warned", set())
    q, k, v, pk, pq = _qkv(dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="CPU interpreter because TRITON_INTERPRET=1"):
        disentangled_attention(q, k, v, pk, pq, **KW)
    assert last_backend() == "triton"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        disentangled_attention(q, k, v, pk, pq, **KW)
    assert not [w for w in seen if "deberta_fast" in str(w.message)], [str(w.message) for w in seen]


def test_triton_interpreter_refuses_a_numpy_it_cannot_run_with(monkeypatch):
    """triton < 3.7's interpreter calls int() on 1-element arrays, which numpy >= 2.4 refuses (seen in the
    GPU image's versions, triton 3.6.0 + numpy 2.5): the triton backend refuses CPU calls with the fix and
    ``auto`` serves them with torch, instead of failing inside the interpreter."""
    np = pytest.importorskip("numpy")
    triton = pytest.importorskip("triton")
    from deberta_fast.backends import triton_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    triton_backend.interpreter_problem.cache_clear()
    monkeypatch.setattr(np, "zeros", lambda *a, **k: [0])  # what numpy >= 2.4 does: int() of it raises TypeError
    try:
        why = triton_backend.interpreter_problem()
        assert why is not None and "numpy<2.4" in why and "triton 3.6.0" in why
        q, k, v, pk, pq = _qkv(dtype=torch.float32)
        with pytest.raises(BackendUnavailableError, match="numpy<2.4"):
            disentangled_attention(q, k, v, pk, pq, backend="triton", **KW)
        out = disentangled_attention(q, k, v, pk, pq, **KW)
        assert last_backend() == "torch" and torch.isfinite(out).all()
        monkeypatch.setattr(triton, "__version__", "3.7.1")  # fixed there
        triton_backend.interpreter_problem.cache_clear()
        assert triton_backend.interpreter_problem() is None
    finally:
        monkeypatch.undo()
        triton_backend.interpreter_problem.cache_clear()
