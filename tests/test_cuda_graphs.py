"""CUDA-graph capture (issue 12: a host path that captures).  The triton kernels take their dropout seed as a launch
argument drawn on the host, so a captured call with dropout would replay one mask forever: refused by name, and
``auto`` takes a backend whose dropout is graph-safe.  On CPU the capture is simulated (the refusal, the memo, the
fallback); on a GPU (``gpu``) forward and forward + backward are captured and replayed for real."""
import pytest
import torch

import deberta_fast as df
from deberta_fast import BackendUnavailableError
from deberta_fast.backends import BACKENDS

V3 = dict(position_buckets=256, max_relative_positions=512)


def _inputs(device, dtype, grad=False, B=2, H=2, L=40, D=32):
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return mk(B, H, L, D), mk(B, H, L, D), mk(B, H, L, D), mk(H, 512, D), mk(H, 512, D)


@pytest.fixture
def capturing(monkeypatch):
    """Every device's stream reads as capturing (the dispatcher's memo and the triton backend's refusal ask)."""
    from deberta_fast import dispatch
    from deberta_fast.backends import triton_backend

    for mod in (dispatch, triton_backend):
        monkeypatch.setattr(mod, "graph_capturing", lambda device: True)


def test_triton_refuses_dropout_under_capture(capturing):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("simulated capture of CPU tensors (the interpreter); the GPU tests capture for real")
    ts = _inputs("cpu", torch.float32)
    with pytest.raises(BackendUnavailableError, match="every replay would reuse one mask"):
        df.disentangled_attention(*ts, dropout_p=0.1, backend="triton", **V3)
    df.disentangled_attention(*ts, dropout_p=0.0, backend="triton", **V3)  # no dropout: served
    assert df.last_backend() == "triton"
    df.disentangled_attention(*ts, dropout_p=0.1, backend="auto", **V3)
    assert df.last_backend() == "torch"


def test_memo_of_an_uncaptured_call_does_not_serve_a_captured_one(monkeypatch):
    """The same call, first outside a capture (its choice memoised), then inside: refused all the same."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("simulated capture of CPU tensors (the interpreter)")
    from deberta_fast import dispatch
    from deberta_fast.backends import triton_backend

    ts = _inputs("cpu", torch.float32)
    for _ in range(2):
        df.disentangled_attention(*ts, dropout_p=0.1, backend="triton", **V3)
    assert dispatch._MEMO
    for mod in (dispatch, triton_backend):
        monkeypatch.setattr(mod, "graph_capturing", lambda device: True)
    with pytest.raises(BackendUnavailableError, match="CUDA graph"):
        df.disentangled_attention(*ts, dropout_p=0.1, backend="triton", **V3)


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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_capture_with_dropout_draws_a_fresh_mask_per_replay(dtype):
    """Dropout under capture: ``auto`` serves it with a backend whose dropout is graph-safe (bf16: cuda where built;
    float32, which cuda refuses: torch), two replays on the same inputs differ, and the triton backend refuses it by
    name."""
    static = _inputs("cuda", dtype)
    if BACKENDS["triton"].unavailable() is None:
        df.disentangled_attention(*static, backend="triton", **V3)  # (this shape's host caches, before the capture)
        with pytest.raises(BackendUnavailableError, match="every replay would reuse one mask"):
            _capture(lambda *ts: df.disentangled_attention(*ts, dropout_p=0.3, backend="triton", **V3), static, 0)
    g, (out,) = _capture(lambda *ts: (df.disentangled_attention(*ts, dropout_p=0.3, backend="auto", **V3),), static)
    assert df.last_backend() != "triton"
    g.replay()
    first = out.clone()
    g.replay()
    assert not torch.equal(first, out) and torch.isfinite(out).all()


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
