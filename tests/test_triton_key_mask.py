"""The triton backend reads the caller's key-padding mask (a bool one as given, another after one comparison with
0): nonzero = attend in every dtype, strided and batch-broadcast masks, ``Lq == Lk`` (the kernels find HF's padded
rows in the mask itself) and ``Lq != Lk`` (the host's uniform-row flags); output and all five gradients against
float64 autograd of the reference, and the launcher's stride handling against a repeated signature.  Triton
interpreter on CPU."""
import pytest
import torch

from deberta_fast import dispatch, disentangled_attention
from deberta_fast.backends import BACKENDS, base

from triton_cases import BUCKETED, assert_close_fp32, grads, make_inputs, reference_fn, triton_fn

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _triton():
    if BACKENDS["triton"].unavailable():
        pytest.skip(f"triton backend unavailable: {BACKENDS['triton'].unavailable()}")


def _values(keep: torch.Tensor, dtype) -> torch.Tensor:
    """A mask of ``dtype`` that is nonzero exactly where ``keep``, with varied nonzero values (HF: nonzero =
    attend)."""
    if dtype == torch.bool:
        return keep.clone()
    g = torch.Generator().manual_seed(3)
    if dtype.is_floating_point:
        pool = torch.tensor([0.5, -2.0, 1.0, float("nan"), 3e-39], dtype=dtype)
    else:
        pool = torch.tensor([1, 2, 7, 255] if dtype == torch.uint8 else [1, -3, 2, 7], dtype=dtype)
    vals = pool[torch.randint(0, len(pool), keep.shape, generator=g)]
    return torch.where(keep, vals, torch.zeros((), dtype=dtype))


def _keep(B: int, Lk: int) -> torch.Tensor:
    """Padding of several lengths, one batch entry with every key masked (HF: all its rows uniform)."""
    lengths = torch.tensor([Lk - Lk // 3, Lk, 0, 1][:B])
    return torch.arange(Lk)[None, :] < lengths[:, None]


def _check(mask, Lq: int, Lk: int, B: int = 4):
    q, k, v, pk, pq, _, kw = make_inputs(B, 2, Lq, Lk, 16, buckets=BUCKETED)
    ts, do = (q, k, v, pk, pq), torch.randn(B, 2, Lq, 16)
    got = grads(triton_fn(mask, kw), ts, torch.float32, do)
    ref = grads(reference_fn(mask, kw), ts, torch.float64, do)
    for name, a, r in zip(("out", "dq", "dk", "dv", "dpos_key", "dpos_query"), got, ref):
        assert_close_fp32(a, r, tol=2e-5, what=name)
    return got[0]


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.int32, torch.uint8, torch.float32],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("Lq,Lk", [(19, 19), (13, 22)])
def test_every_mask_dtype(dtype, Lq, Lk):
    _check(_values(_keep(4, Lk), dtype), Lq, Lk)


@pytest.mark.parametrize("layout", ["sliced", "sliced_long", "strided", "batch_broadcast"])
def test_strided_masks(layout):
    """A mask that is a view: rows of a wider buffer (bool, read as it is; int64, converted), every other column, one
    row broadcast over the batch."""
    L, keep = 23, _keep(4, 23)
    if layout == "sliced":
        mask = torch.cat([keep, torch.ones(4, 9, dtype=torch.bool)], 1)[:, :L]
    elif layout == "sliced_long":
        mask = torch.cat([keep.long(), torch.ones(4, 9, dtype=torch.long)], 1)[:, :L]
    elif layout == "strided":
        mask = torch.stack([keep, ~keep], -1).flatten(1)[:, ::2]
    else:
        mask = keep[:1].expand(4, L)
    assert torch.equal(mask.bool(), keep[:1].expand(4, L) if layout == "batch_broadcast" else keep)
    _check(mask, L, L)


def test_repeated_signature_reads_each_masks_strides():
    """Two bool masks of one shape (the kernels read them as they are), one a view with another row stride, called in
    turn: the launcher's cached plan must not keep the first one's strides."""
    L = 21
    keep = _keep(4, L)
    wide = torch.cat([~keep, keep], 1)[:, L:]
    assert wide.stride() != keep.stride() and torch.equal(wide, keep)
    for mask in (keep, wide, keep.flip(0), torch.cat([~keep, keep], 1).flip(0)[:, L:]):
        q, k, v, pk, pq, _, kw = make_inputs(4, 2, L, L, 16, buckets=BUCKETED)
        got = disentangled_attention(q, k, v, pk, pq, attention_mask=mask, backend="triton", **kw)
        ref = reference_fn(mask, kw)(*(t.double() for t in (q, k, v, pk, pq)))
        assert_close_fp32(got, ref, what=f"mask of strides {mask.stride()}")


def test_no_host_mask_work_when_lengths_match(monkeypatch):
    """With ``Lq == Lk`` and a bool mask, neither a copy of the mask nor the uniform rows are made on the host (the
    kernels read the caller's mask): the host path of a patched model's layers."""
    def refuse(*a, **k):
        raise AssertionError("a key mask normalised on the host")
    monkeypatch.setattr(base, "key_uniform_rows", refuse)
    monkeypatch.setattr(dispatch, "normalize_mask", refuse)
    monkeypatch.setattr(base.AttentionCall, "key_mask", property(refuse))
    L = 17
    q, k, v, pk, pq, _, kw = make_inputs(3, 2, L, L, 16, buckets=BUCKETED)
    mask = _keep(3, L)
    for _ in range(2):  # cold, then the memo's path
        got = disentangled_attention(q, k, v, pk, pq, attention_mask=mask, backend="triton", **kw)
    monkeypatch.undo()
    ref = reference_fn(mask, kw)(*(t.double() for t in (q, k, v, pk, pq)))
    assert_close_fp32(got, ref, what="out")


def test_autograd_keeps_no_reference_to_a_converted_mask():
    """An int64 mask is compared with 0 before the op, so autograd saves that copy: changing the caller's mask in
    place between forward and backward is allowed, as in HF eager (the gradients are those of the forward's mask)."""
    L = 16
    q, k, v, pk, pq, _, kw = make_inputs(2, 2, L, L, 16, buckets=BUCKETED)
    mask = _keep(2, L).long()
    ts = [t.clone().requires_grad_(True) for t in (q, k, v, pk, pq)]
    out = disentangled_attention(*ts, attention_mask=mask, backend="triton", **kw)
    want = grads(reference_fn(mask.clone(), kw), (q, k, v, pk, pq), torch.float64, torch.ones_like(out))
    mask[:, L // 2:] = 0
    out.sum().backward()
    for name, t, r in zip(("dq", "dk", "dv", "dpos_key", "dpos_query"), ts, want[1:]):
        assert_close_fp32(t.grad, r, tol=2e-5, what=name)


def test_key_mask_on_another_device_is_refused():
    """The launcher refuses a key mask on another device than the inputs (the kernels would read a host pointer):
    the ops' own entry, below the dispatcher's checks."""
    from deberta_fast._kernels import triton_attention_launch as launch
    with pytest.raises(ValueError, match="key_mask is on meta"):
        launch._mask_tensors(torch.device("cpu"), torch.ones(2, 5, dtype=torch.bool, device="meta"), None, None, 5, 5)


def test_patched_encoder_passes_a_bool_mask():
    """A patched encoder converts a padding mask once per forward (its ``get_attention_mask``), so that no layer
    converts it again; nonzero = attend, as HF reads it."""
    from deberta_fast.patching import _encoder_attention_mask
    m = _values(_keep(4, 9), torch.int64)
    got = _encoder_attention_mask(None, m)
    assert got.dtype == torch.bool and torch.equal(got, m != 0)
    assert _encoder_attention_mask(None, got) is got  # a bool mask as it is
    assert torch.equal(_encoder_attention_mask(None, m[0]), (m[0] != 0)[None])
