"""No Triton kernel reads or writes outside its tensors (``interp_memcheck``: every address a load or store lets
through, checked against the storages of the launch's tensor arguments), where it is likeliest: the band tiles
gather their tables without predicates, rows and keys clamped to the lengths (``_rel_terms``).  One ``(b, h)`` block,
so that its last row is its storage's last; odd lengths, Lq != Lk both ways, a single query, packed sequences with
empty ones, dropout; the interpreter's tiles and the GPU launch configs'.  Results are checked finite here; their
values are the parity suite's."""
import pytest
import torch

from deberta_fast import disentangled_attention_varlen
from deberta_fast._env import interpreting
from interp_memcheck import bounds_checked
from test_triton_gpu_tiles import gpu_configs  # noqa: F401 - the fixture
from triton_cases import BUCKETED, V3, grads, make_inputs, triton_fn

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not interpreting() or torch.cuda.is_available(),
                                reason="checks the Triton interpreter's accesses to CPU tensors")

KERNELS = {"disentangled_fwd_kernel", "disentangled_bwd_dq_kernel", "disentangled_bwd_dkdv_kernel"}


def _padded(Lq, Lk, D, buckets, dropout_p, terms="both", mask="key", dtype=torch.float32):
    q, k, v, pk, pq, m, kw = make_inputs(1, 1, Lq, Lk, D, terms=terms, buckets=buckets, mask=mask)
    with bounds_checked() as seen:
        got = grads(triton_fn(m, kw, dropout_p=dropout_p), (q, k, v, pk, pq), dtype, torch.randn(1, 1, Lq, D))
    assert KERNELS <= set(seen), set(seen)
    for g in got:
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("Lq,Lk", [(37, 23), (23, 37), (1, 45)], ids=["Lq>Lk", "Lq<Lk", "one-query"])
@pytest.mark.parametrize("buckets", [BUCKETED, V3], ids=["tiny", "v3"])
def test_padded_calls_stay_inside_their_tensors(Lq, Lk, buckets):
    _padded(Lq, Lk, 16, buckets, 0.1)


@pytest.mark.parametrize("terms,mask", [("c2p", "full"), ("p2c", "none"), ("both", "full_h1")])
def test_each_term_and_mask_kind_stays_inside_its_tensors(terms, mask):
    _padded(29, 19, 16, BUCKETED, 0.0, terms=terms, mask=mask)


def test_16bit_tables_stay_inside_their_tensors(monkeypatch):
    """``TABLE_DTYPE = "input"``: 2-byte table entries, so a row's overrun is half as many bytes."""
    from deberta_fast._kernels import triton_attention_launch as launch

    monkeypatch.setattr(launch, "TABLE_DTYPE", "input")
    _padded(33, 21, 16, BUCKETED, 0.1, dtype=torch.float16)


@pytest.mark.parametrize("Lq,Lk,D", [(75, 53, 64), (41, 97, 32)])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_gpu_tiles_stay_inside_their_tensors(gpu_configs, Lq, Lk, D, p):  # noqa: F811 - the fixture
    """The GPU configs' tiles (64 x 64, 64 x 32, 16 x 64, ... by architecture) overhang the lengths further (with
    dropout: the dq kernel's unmasked stores of its decisions' bytes, dK/dV's loads of them)."""
    _padded(Lq, Lk, D, BUCKETED, p)


def test_packed_calls_stay_inside_their_tensors():
    """Sequences without queries or without keys, a single token, Lq != Lk; the last sequence ends the tensors."""
    lens_q, lens_k, H, D = [0, 9, 4, 1, 23], [5, 9, 0, 17, 11], 1, 16
    cq = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    ck = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    _, _, _, pk, pq, _, kw = make_inputs(1, H, 1, 1, D, buckets=BUCKETED)
    q, k, v = torch.randn(sum(lens_q), H, D), torch.randn(sum(lens_k), H, D), torch.randn(sum(lens_k), H, D)

    def fn(q, k, v, pk, pq):
        return disentangled_attention_varlen(q, k, v, pk, pq, cq, ck, max(lens_q), max(lens_k), backend="triton",
                                             dropout_p=0.1, **kw)

    with bounds_checked() as seen:
        got = grads(fn, (q, k, v, pk, pq), torch.float32, torch.randn(q.shape))
    assert KERNELS <= set(seen), set(seen)
    for g in got:
        assert torch.isfinite(g).all()


def test_the_check_catches_a_read_past_a_tensor():
    """The checker itself: a kernel reading one element past its input fails, the same kernel within bounds passes."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy(X, Y, n, EXTRA: tl.constexpr):
        i = tl.arange(0, 16)
        tl.store(Y + i, tl.load(X + i, mask=i < n + EXTRA), mask=i < n)

    x, y = torch.randn(10), torch.empty(10)
    with bounds_checked() as seen:
        copy[(1,)](x, y, 10, 0)
    assert seen and torch.equal(x, y)
    from triton.runtime.errors import InterpreterError

    with pytest.raises(InterpreterError, match="copy: load of 1 element.s. outside"):
        with bounds_checked():
            copy[(1,)](x, y, 10, 1)
