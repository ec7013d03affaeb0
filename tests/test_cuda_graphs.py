"""CUDA-graph capture (issue 12: a host path that captures).  Every backend's dropout seed lives on the device (the
triton kernels read theirs from an int64 tensor, ``SEED``, drawn by torch's generator of the device), so a captured
call with dropout draws a fresh mask per replay.  On CPU the interpreter checks what capture relies on (the kernels
read the seed from memory when they run, not at launch; a drawn seed follows ``torch.manual_seed``; a compiled call
with dropout traces as one graph); on a GPU (``gpu``) forward and forward + backward are captured and replayed."""
import pytest
import torch

import deberta_fast as df
from deberta_fast.backends import BACKENDS

V3 = dict(position_buckets=256, max_relative_positions=512)


def _inputs(device, dtype, grad=False, B=2, H=2, L=40, D=32):
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return mk(B, H, L, D), mk(B, H, L, D), mk(B, H, L, D), mk(H, 512, D), mk(H, 512, D)


def _triton_call(ts, seed, p=0.3):
    """The triton backend's functional entry on ``ts`` (v3 buckets, no mask) with dropout ``p`` and ``seed``."""
    from deberta_fast.backends.triton_backend import triton_attention
    q = ts[0]
    return triton_attention(*ts, position_buckets=256, max_relative_positions=512, span=256,
                            scale=1.0 / (3 * q.shape[-1]) ** 0.5, dropout_p=p, seed=seed)


def _interpreter_only():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CPU tensors under the interpreter; the GPU tests capture for real")


def test_triton_kernels_read_the_seed_when_they_run():
    """One seed tensor, its value changed in place between two calls with otherwise the same arguments, gives each
    value's mask, the mask an int seed of that value gives, a value beyond 32 bits included (Philox's high key word).
    (Under the interpreter, launch and run are one step; the GPU test below replays a capture with a refilled seed.)"""
    _interpreter_only()
    ts = _inputs("cpu", torch.float32)
    seed = torch.zeros(1, dtype=torch.int64)
    outs = []
    for value in (7, 2**40 + 7, 7):
        seed.fill_(value)
        got = _triton_call(ts, seed)
        assert torch.equal(got, _triton_call(ts, value))  # an int seed: the same stream
        outs.append(got)
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])
    # an int key from 2**63 up is the int64 of the same bits
    assert torch.equal(_triton_call(ts, 2**64 - 5), _triton_call(ts, torch.tensor([-5])))


def test_seed_changed_before_the_backward_raises():
    """The seed tensor is saved for the backward: refilled between forward and backward (which would give the backward
    another mask than the forward's), autograd raises instead of returning wrong gradients."""
    _interpreter_only()
    ts = _inputs("cpu", torch.float32, grad=True)
    seed = torch.full((1,), 5, dtype=torch.int64)
    out = _triton_call(ts, seed)
    seed.fill_(6)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_drawn_seed_follows_manual_seed():
    """Without a seed the backend draws one on the inputs' device: ``torch.manual_seed`` replays it, a second call
    draws another (the forward + backward of one call share theirs: test_triton_backward's dropout tests)."""
    _interpreter_only()
    ts = _inputs("cpu", torch.float32)

    def call():
        return df.disentangled_attention(*ts, dropout_p=0.3, backend="triton", **V3)
    torch.manual_seed(5)
    a, b = call(), call()
    torch.manual_seed(5)
    assert torch.equal(call(), a) and not torch.equal(a, b)


@pytest.mark.parametrize("bad, what", [(torch.zeros(1, dtype=torch.int32), "int32"),
                                       (torch.zeros(2, dtype=torch.int64), "(2,)"),
                                       (torch.zeros(1, dtype=torch.int64, device="meta"), "meta")])
def test_bad_seed_tensor_is_refused(bad, what):
    pytest.importorskip("triton")
    ts = _inputs("cpu", torch.float32)
    with pytest.raises(ValueError, match=r"dropout seed must be an int or an int64 tensor.*" + what):
        _triton_call(ts, bad)


def test_bad_seed_value_is_refused():
    """An int key beyond 64 bits, and an op called with dropout but no seed: errors that say so."""
    pytest.importorskip("triton")
    from deberta_fast.backends.triton_backend import _triton_fwd_impl
    ts = _inputs("cpu", torch.float32)
    with pytest.raises(ValueError, match="does not fit 64 bits"):
        _triton_call(ts, 2**64)
    with pytest.raises(ValueError, match="needs a dropout seed"):
        _triton_fwd_impl(*ts, None, None, None, 256, 512, 256, 0.1, 0.3, None)


def test_fullgraph_compile_with_dropout():
    """A compiled call with dropout traces as one graph, its seed drawn in the graph on the inputs' device (a CUDA
    graph of it, as ``mode="reduce-overhead"`` makes, then holds no host value); with ``aot_eager`` it draws what the
    eager call draws, forward and backward."""
    _interpreter_only()
    torch._dynamo.reset()
    ts = _inputs("cpu", torch.float32, grad=True)

    def f(*xs):
        return df.disentangled_attention(*xs, dropout_p=0.3, backend="triton", **V3)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(11)
    got = compiled(*ts)
    got_g = torch.autograd.grad(got.square().sum(), ts)
    torch.manual_seed(11)
    want = f(*ts)
    want_g = torch.autograd.grad(want.square().sum(), ts)
    assert torch.equal(got, want)
    for a, b in zip(got_g, want_g):
        assert torch.equal(a, b)


def test_capture_query_stays_out_of_compiled_graphs(monkeypatch):
    """Under torch.compile the capture query is skipped (it is not traceable: a fullgraph compile would fail on it);
    eager, it is asked."""
    from deberta_fast.backends import base

    # (like the real query, which dynamo cannot put in a graph: a fullgraph compile that reaches it fails)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", torch._dynamo.disable(lambda: True))
    cuda = torch.device("cuda")
    assert base.graph_capturing(cuda) and not base.graph_capturing(torch.device("cpu"))
    f = torch.compile(lambda x: x + float(base.graph_capturing(cuda)), fullgraph=True, backend="eager")
    assert torch.equal(f(torch.zeros(3)), torch.zeros(3))


def _capture(fn, static, warmup=3):
    """``(graph, outputs)``: ``fn(*static)`` captured after ``warmup`` eager calls on a side stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn(*static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = fn(*static)
    return g, outs


def _assert_replays_differ(g, outs):
    """Two replays of ``g`` (dropout drawn in the graph) give other values in every output, all finite."""
    g.replay()
    first = [t.clone() for t in outs]
    g.replay()
    for a, b in zip(first, outs):
        assert not torch.equal(a, b) and torch.isfinite(b).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("train", [False, True], ids=["forward", "forward+backward"])
def test_gpu_capture_replays_the_eager_result(backend, train):
    """No dropout: a captured call replayed on new input values gives the eager call's result bitwise (deterministic
    kernels, backward included)."""
    why = BACKENDS[backend].unavailable()
    if why:
        pytest.skip(why)
    static = _inputs("cuda", torch.bfloat16, grad=train)
    dout = torch.randn_like(static[0])
    mask = torch.ones(2, 40, dtype=torch.bool, device="cuda")
    mask[1, 29:] = False

    def fn(*ts):
        out = df.disentangled_attention(*ts, attention_mask=mask, backend=backend, **V3)
        return (out, *torch.autograd.grad(out, ts, dout)) if train else (out,)

    g, outs = _capture(fn, static)
    for _ in range(2):
        with torch.no_grad():
            for t in static:
                t.copy_(torch.randn_like(t))
        g.replay()
        want = fn(*static)
        for got, ref in zip(outs, want):
            assert torch.equal(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_capture_with_dropout_draws_a_fresh_mask_per_replay(backend, dtype):
    """Dropout under capture: every backend draws its seed on the device, so two replays on the same inputs differ,
    forward and backward (cuda refuses float32: skipped there)."""
    why = BACKENDS[backend].unavailable() if backend != "auto" else None
    if why:
        pytest.skip(why)
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the cuda kernels take 16-bit inputs")
    static = _inputs("cuda", dtype, grad=True)
    dout = torch.randn_like(static[0])

    def fn(*ts):
        out = df.disentangled_attention(*ts, dropout_p=0.3, backend=backend, **V3)
        return (out, *torch.autograd.grad(out, ts, dout))
    g, outs = _capture(fn, static)
    if backend == "auto":  # (a kernel backend, not a fallback to torch)
        assert df.last_backend() == ("cuda" if dtype != torch.float32 and not BACKENDS["cuda"].unavailable()
                                     else "triton")
    _assert_replays_differ(g, outs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_capture_of_packed_calls_with_dropout(backend):
    """Packed sequences with dropout captured (offsets unchecked: a capture cannot read them back): two replays
    differ, forward and backward."""
    if BACKENDS[backend].unavailable():
        pytest.skip(BACKENDS[backend].unavailable())
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    static = (mk(40, 2, 32), mk(40, 2, 32), mk(40, 2, 32), mk(2, 512, 32), mk(2, 512, 32))
    cu = torch.tensor([0, 24, 40], dtype=torch.int32, device="cuda")
    dout = torch.randn(40, 2, 32, device="cuda", dtype=torch.bfloat16)

    def fn(*ts):
        out = df.disentangled_attention_varlen(*ts, cu, cu, 24, 24, dropout_p=0.3, check_offsets=False,
                                               backend=backend, **V3)
        return (out, *torch.autograd.grad(out, ts, dout))
    _assert_replays_differ(*_capture(fn, static))


@pytest.mark.gpu
def test_gpu_captured_triton_dropout_equals_the_eager_call_of_its_seed():
    """A captured triton call whose seed tensor the caller refills before each replay: each replay equals the eager
    call with that seed, forward and backward, bitwise (the kernels read the seed when they run)."""
    if BACKENDS["triton"].unavailable():
        pytest.skip(BACKENDS["triton"].unavailable())
    static = _inputs("cuda", torch.bfloat16, grad=True)
    dout = torch.randn_like(static[0])
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")

    def fn(*ts):
        out = _triton_call(ts, seed)
        return (out, *torch.autograd.grad(out, ts, dout))
    g, outs = _capture(fn, static)
    for value in (3, 2**40 + 1):
        seed.fill_(value)
        g.replay()
        want = fn(*static)
        for got, ref in zip(outs, want):
            assert torch.equal(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_capture_of_a_patched_model(backend):
    """A patched DeBERTa-v2 (packing on, the default) captured and replayed: the encoder takes the padded layout
    under capture (packing reads the mask back, a sync a capture forbids), and replays equal eager calls."""
    from hf_configs import transformers, v2_config

    if BACKENDS[backend].unavailable():
        pytest.skip(BACKENDS[backend].unavailable())
    model = transformers.DebertaV2Model(v2_config(position_buckets=256, max_relative_positions=512, hidden=64))
    model = model.cuda().to(torch.bfloat16).eval()
    df.patch(model, backend=backend)
    ids = torch.randint(0, 97, (2, 40), device="cuda")
    mask = torch.ones(2, 40, dtype=torch.long, device="cuda")
    mask[1, 25:] = 0
    with torch.no_grad():
        g, (out,) = _capture(lambda i, m: (model(input_ids=i, attention_mask=m).last_hidden_state,), (ids, mask))
        ids.copy_(torch.randint(0, 97, ids.shape, device="cuda"))
        g.replay()
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()  # (eager, the encoder packs: other kernels, the same values within bf16 rounding)
    torch.testing.assert_close(out[keep].float(), want[keep].float(), rtol=2e-2, atol=2e-2)
