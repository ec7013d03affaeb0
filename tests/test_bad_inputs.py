"""Every argument of the public functions, the module and ``patch``: a wrong value raises an error
that names the argument the caller passed (never a crash, an internal name or a silent answer)."""
import math

import pytest
import torch

import deberta_fast
from deberta_fast import disentangled_attention, disentangled_attention_reference, disentangled_attention_varlen

H, D = 2, 8


def _qkv(B=2, Lq=7, Lk=7, rows=8, dtype=torch.float32):
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    return r(B, H, Lq, D), r(B, H, Lk, D), r(B, H, Lk, D), r(H, rows, D), r(H, rows, D)


def _call(**over):
    q, k, v, pk, pq = _qkv()
    kw = dict(position_buckets=4, max_relative_positions=8, backend="torch")
    kw.update(over)
    args = [kw.pop(n, t) for n, t in zip(("query", "key", "value", "pos_key", "pos_query"), (q, k, v, pk, pq))]
    return disentangled_attention(*args, **kw)


@pytest.mark.parametrize("name,value,exc,words", [
    ("position_buckets", 4.5, TypeError, "position_buckets must be an int"),
    ("position_buckets", "4", TypeError, "position_buckets must be an int"),
    ("position_buckets", True, TypeError, "position_buckets must be an int"),
    ("max_relative_positions", 8.0, TypeError, "max_relative_positions must be an int"),
    ("position_buckets", 1, ValueError, "position_buckets=1"),
    ("dropout_p", "0.1", TypeError, "dropout_p must be a float"),
    ("dropout_p", 1.0, ValueError, "dropout_p must be in [0, 1)"),
    ("dropout_p", -0.1, ValueError, "dropout_p must be in [0, 1)"),
    ("dropout_p", math.nan, ValueError, "dropout_p must be in [0, 1)"),
    ("scale", math.inf, ValueError, "scale must be finite"),
    ("scale", math.nan, ValueError, "scale must be finite"),
    ("scale", "1", TypeError, "scale must be a float"),
    ("attention_mask", [1, 1], TypeError, "attention_mask must be a torch.Tensor"),
    ("attention_mask", torch.ones(3, 7), ValueError, "attention_mask"),
    ("attention_mask", torch.ones(2, 1, 1, 7, 7), ValueError, "attention_mask"),
    ("query", torch.randn(2, H, 7), ValueError, "query must be 4-D"),
    ("key", torch.randn(2, H, 7, D + 1), ValueError, "key"),
    ("value", torch.randn(2, H, 6, D), ValueError, "value"),
    ("pos_key", torch.randn(H + 1, 8, D), ValueError, "pos_key must be [H, 2*span, D]"),
    ("pos_query", torch.randn(H, 8, D, dtype=torch.float64), TypeError, "pos_query has dtype"),
    ("pos_key", "table", TypeError, "pos_key must be a torch.Tensor"),
    ("backend", "fastest", ValueError, "unknown backend 'fastest'"),
])
def test_bad_argument_is_named(name, value, exc, words):
    with pytest.raises(exc) as e:
        _call(**{name: value})
    assert words in str(e.value)


def test_integer_like_scalars_are_accepted():
    import numpy as np
    q, k, v, pk, pq = _qkv()
    want = disentangled_attention(q, k, v, pk, pq, position_buckets=4, max_relative_positions=8, backend="torch")
    got = disentangled_attention(q, k, v, pk, pq, position_buckets=np.int64(4),
                                 max_relative_positions=torch.tensor(8), backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("pb,mr", [(2, 2), (16, 9), (8, 5), (1, 4)])
def test_undefined_bucket_functions_raise(pb, mr):
    """HF divides by zero for these (NaN/inf buckets cast to integers): refused, naming both values."""
    q, k, v, pk, pq = _qkv(rows=2 * pb)
    with pytest.raises(ValueError, match=f"position_buckets={pb}"):
        disentangled_attention(q, k, v, pk, pq, position_buckets=pb, max_relative_positions=mr)


def test_longer_tables_use_their_first_rows_as_hf():
    """HF cuts rel_embeddings to the first 2*span rows: extra rows must change nothing."""
    q, k, v, pk, pq = _qkv(Lq=11, Lk=11, rows=8)
    kw = dict(position_buckets=4, max_relative_positions=8)
    want = disentangled_attention(q, k, v, pk, pq, **kw)
    pad = lambda t: torch.cat([t, 100 * torch.randn(H, 6, D)], 1)  # noqa: E731
    got = disentangled_attention(q, k, v, pad(pk), pad(pq), **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_unbucketed_long_tables_and_v1_slice():
    """Unbucketed: span = max_relative_positions; a centred v1 slice covering every distance is exact."""
    q, k, v, pk, pq = _qkv(Lq=5, Lk=5, rows=24, dtype=torch.float64)
    kw = dict(position_buckets=-1, max_relative_positions=12)
    want = disentangled_attention(q, k, v, pk, pq, **kw)
    s = 5
    got = disentangled_attention(q, k, v, pk[:, 12 - s:12 + s], pq[:, 12 - s:12 + s], **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="needs 2 \\* max_relative_positions = 24"):
        disentangled_attention(q, k, v, pk[:, 8:16], pq[:, 8:16], **kw)  # s = 4 < L = 5


def test_short_bucketed_table_raises():
    q, k, v, pk, pq = _qkv(rows=6)
    with pytest.raises(ValueError, match="pos_key and pos_query has 6 rows; it needs 2 \\* position_buckets = 8"):
        disentangled_attention(q, k, v, pk, pq, position_buckets=4, max_relative_positions=8)


def test_tables_without_a_span_raise():
    q, k, v, pk, _ = _qkv()
    with pytest.raises(ValueError, match="define no span"):
        disentangled_attention(q, k, v, pk, None, position_buckets=-1, max_relative_positions=-1)


def test_meta_tensors_on_the_torch_backend():
    q, k, v, pk, pq = (t.to("meta") for t in _qkv())
    out = disentangled_attention(q, k, v, pk, pq, position_buckets=4, max_relative_positions=8, backend="torch")
    assert out.device.type == "meta" and out.shape == q.shape
    out = disentangled_attention_reference(q, k, v, pk, pq, position_buckets=4, max_relative_positions=8)
    assert out.device.type == "meta"


# ------------------------------------------------------------------------------------------- varlen

def _packed(lens=(5, 3), rows=8):
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    r = torch.randn
    return r(T, H, D), r(T, H, D), r(T, H, D), r(H, rows, D), r(H, rows, D), cu


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cu,maxlen,words", [
    ([0, 5, 9], 5, "cu_seqlens_q[-1] must equal the number of query tokens 8"),   # past the end (was heap corruption)
    ([0, 5, 100], 95, "cu_seqlens_q[-1] must equal"),
    ([1, 5, 8], 5, "cu_seqlens_q[0] must be 0"),
    ([0, 6, 5, 8], 6, "cu_seqlens_q must be non-decreasing"),
    ([0, 5, 7], 5, "cu_seqlens_q[-1] must equal the number of query tokens 8"),   # ends before the last token
    ([0, 5, 8], 4, "a query sequence is longer than max_seqlen_q=4"),
])
def test_varlen_bad_offsets_raise_before_any_kernel(backend, cu, maxlen, words):
    if backend == "triton":
        pytest.importorskip("triton")
    q, k, v, pk, pq, _ = _packed()
    cu = torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(ValueError, match=words.replace("[", "\\[").replace("]", "\\]")):
        disentangled_attention_varlen(q, k, v, pk, pq, cu, cu, maxlen, maxlen, position_buckets=4,
                                      max_relative_positions=8, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_varlen_unchecked_bad_offsets_give_finite_rows(backend):
    """``check_offsets=False`` (and tracing, where the check cannot read the offsets): offsets that do not describe
    the tokens give wrong rows but no error, no out-of-range index and nothing uninitialised: finite outputs, 0 for a
    token no sequence covers, finite gradients (the torch backend indexed out of range: IndexError on CPU, an abort
    under torch.compile's CPU kernels)."""
    if backend == "triton":
        pytest.importorskip("triton")
    q, k, v, pk, pq, _ = _packed()
    for cu, maxlen in (([0, 5, 9], 5), ([0, 5, 100], 95), ([1, 5, 8], 5), ([0, 6, 5, 8], 6), ([0, 5, 7], 5),
                       ([0, 5, 8], 4), ([-3, 2, 8], 5)):
        cu = torch.tensor(cu, dtype=torch.int32)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pq)]
        with pytest.MonkeyPatch.context() as mp:
            if backend == "triton":
                mp.setenv("TRITON_INTERPRET", "1")
            out = disentangled_attention_varlen(*leaves, cu, cu, maxlen, maxlen, position_buckets=4,
                                                max_relative_positions=8, backend=backend, check_offsets=False)
            grads = torch.autograd.grad(out.sum(), leaves)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads), cu.tolist()
        if cu[0] > 0:  # the tokens before the first sequence
            assert not out[:int(cu[0])].any()


@pytest.mark.parametrize("name,value,exc,words", [
    ("max_seqlen_q", 5.0, TypeError, "max_seqlen_q must be an int"),
    ("max_seqlen_k", 0, ValueError, "max_seqlen_q / max_seqlen_k must be >= 1"),
    ("cu_seqlens_q", torch.tensor([0.0, 5.0, 8.0]), TypeError, "cu_seqlens_q must be int32"),
    ("cu_seqlens_k", torch.tensor([[0, 5, 8]], dtype=torch.int32), ValueError, "cu_seqlens_k must be 1-D"),
    ("cu_seqlens_k", torch.tensor([0, 8], dtype=torch.int32), ValueError, "same number of sequences"),
    ("dropout_p", "0.5", TypeError, "dropout_p must be a float"),
])
def test_varlen_bad_argument_is_named(name, value, exc, words):
    q, k, v, pk, pq, cu = _packed()
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5, position_buckets=4,
              max_relative_positions=8)
    kw[name] = value
    with pytest.raises(exc, match=words):
        disentangled_attention_varlen(q, k, v, pk, pq, **kw)


def test_varlen_torch_memory_follows_real_lengths():
    """A huge max_seqlen with short sequences pads to the real longest sequence (was [N, H, 1e5, 1e5])."""
    q, k, v, pk, pq, cu = _packed((5, 3))
    want = disentangled_attention_varlen(q, k, v, pk, pq, cu, cu, 5, 5, position_buckets=4,
                                         max_relative_positions=8, backend="torch")
    got = disentangled_attention_varlen(q, k, v, pk, pq, cu, cu, 100_000, 100_000, position_buckets=4,
                                        max_relative_positions=8, backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------- module and patch

def test_module_and_patch_arguments():
    from deberta_fast import DisentangledAttention
    from hf_configs import v2_config
    cfg = v2_config()
    with pytest.raises(ValueError, match="unknown backend"):
        DisentangledAttention(cfg, backend="fastest")
    m = DisentangledAttention(cfg)
    with pytest.raises((ValueError, TypeError), match="hidden_states"):
        m(torch.randn(2, 5), torch.ones(2, 5))
    import transformers
    model = transformers.DebertaV2Model(cfg)
    with pytest.raises(ValueError, match="unknown backend"):
        deberta_fast.patch(model, backend="fastest")
    with pytest.raises(TypeError, match="pack must be a bool"):
        deberta_fast.patch(model, pack="yes")
    with pytest.raises(ValueError, match="found no DeBERTa attention"):
        deberta_fast.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        deberta_fast.patch("microsoft/deberta-v3-base")
    assert not deberta_fast.is_patched(model)


def test_triton_refuses_rocm_and_old_gpus_by_name(monkeypatch):
    """The device rules of the triton backend, without a GPU: a ROCm build (its MI300 reports capability 9.4, which
    would pick the sm_90 launch configs and their inline PTX) and a pre-sm_80 NVIDIA GPU are refused with a reason
    naming the torch backend / the capability; an sm_90 device is not."""
    from types import SimpleNamespace

    pytest.importorskip("triton")
    from deberta_fast.backends import triton_backend as tb

    t = torch.empty(1, 1, 4, 16)
    call = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16, head_dim=16, query=t, key=t, value=t,
                           forward_ad=False, dropout_p=0.0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    assert any("ROCm" in w and "backend='torch'" in w for w in tb._device_dtype_refusals(call))
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert tb._device_dtype_refusals(call) == []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert any("sm_75" in w for w in tb._device_dtype_refusals(call))
