"""Triton backward (dq, dk, dv, dpos_key, dpos_query) against float64 autograd of the reference;
determinism; in-kernel dropout (keep rate, forward/backward consistency, reproducibility)."""
import pytest
import torch

from deberta_fast import disentangled_attention, disentangled_attention_reference
from deberta_fast.backends.triton_backend import triton_attention
from deberta_fast.dispatch import build_call
from philox_ref import drop_threshold, keep_mask, keep_scale

from triton_cases import (BUCKETED, UNBUCKETED, V3, assert_close_fp32, assert_close_lowp, cast, grads, make_inputs,
                          max_err, reference_fn, triton_fn)

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from deberta_fast._kernels.triton_attention_common import _rounded  # noqa: E402

NAMES = ("out", "dq", "dk", "dv", "dpos_key", "dpos_query")


def _names(pk, pq):
    return [n for n, present in zip(NAMES, (1, 1, 1, 1, pk is not None, pq is not None)) if present]


def check_grads(B, H, Lq, Lk, D, dtype=torch.float32, **kw):
    q, k, v, pk, pq, mask, akw = make_inputs(B, H, Lq, Lk, D, **kw)
    ts = (q, k, v, pk, pq)
    do = torch.randn(B, H, Lq, D)
    got = grads(triton_fn(mask, akw), ts, dtype, do)
    ref = grads(reference_fn(mask, akw), ts, torch.float64, do)
    low = grads(reference_fn(mask, akw), ts, dtype, do) if dtype != torch.float32 else None
    for i, name in enumerate(_names(pk, pq)):
        assert got[i].dtype == dtype and got[i].shape == ref[i].shape, name
        if dtype == torch.float32:
            assert_close_fp32(got[i], ref[i], tol=2e-5, what=name)
        else:
            assert_close_lowp(got[i], ref[i], low[i], what=name)


# every term with every mask; the pairs not covered elsewhere (the sweep in test_triton_exactness draws
# terms x masks too) run in the quick suite, the rest in .ci/run's extended stage
_QUICK = {("both", "none"), ("both", "key"), ("both", "full"), ("c2p", "full"), ("p2c", "key"), ("none", "none")}


@pytest.mark.parametrize("terms,mask", [
    (t, m) if (t, m) in _QUICK else pytest.param(t, m, marks=pytest.mark.slow)
    for t in ("both", "c2p", "p2c", "none") for m in ("none", "key", "full")])
def test_terms_and_masks(terms, mask):
    check_grads(2, 2, 45, 70, 16, terms=terms, mask=mask)


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (17, 17), (64, 17), (1, 40), pytest.param(200, 200, marks=pytest.mark.slow)])
def test_lengths(Lq, Lk):
    check_grads(1, 2, Lq, Lk, 16, mask="key")


@pytest.mark.parametrize("buckets", [UNBUCKETED, V3], ids=["unbucketed", "v3"])
def test_buckets(buckets):
    check_grads(2, 2, 50, 50, 16, buckets=buckets, mask="key")


@pytest.mark.parametrize("buckets", [(-1, 32), (-1, 31)], ids=["hi-edge", "lo-edge"])
def test_run_band_ends_on_tile_edges(buckets):
    """The backward sums dS per distance inside the run band and per end outside it (``_advance_runs``): with
    32x32 tiles (the interpreter's) these configs put the band's last distance (31) / first distance (-31) exactly on
    a tile edge, so a tile holding only in-band distances touches an end run's first element."""
    from deberta_fast.positions import attention_span, distance_runs

    runs = distance_runs(100, 100, *buckets, attention_span(*buckets))
    assert runs.hi % 32 == 31 or runs.lo % 32 == 1
    check_grads(1, 2, 100, 100, 16, buckets=buckets, mask="key")


@pytest.mark.parametrize("buckets,kind", [((256, 512), "identity"), ((8, 6), "unique"), ((16, 4), "shared")])
def test_position_grad_fold_paths(buckets, kind):
    """The three ways the launcher turns per-run sums into position gradients (``_position_grads``): run r is
    row r (v3 at short L), runs on distinct rows with rows skipped (slots jump), rows shared by several runs (the
    distances of one log bucket): each exact against the reference."""
    from deberta_fast._kernels.triton_attention_launch import _layout
    from deberta_fast.positions import attention_span

    lay = _layout(37, 37, *buckets, attention_span(*buckets), torch.device("cpu"), True, True)
    assert kind == ("identity" if lay.runs_identity else "unique" if lay.runs_unique else "shared")
    check_grads(1, 2, 37, 37, 16, buckets=buckets, mask="key")


@pytest.mark.parametrize("Lq,Lk,terms", [(40, 1, "p2c"), (70, 9, "p2c"), (9, 70, "c2p")])
def test_relative_share_windows(Lq, Lk, terms):
    """The kernels add dQ's / dK's relative share from the runs their rows' distances reach (``_run_products``):
    a dK/dV program's keys against many more queries, and a dq program's rows against many more keys."""
    check_grads(1, 2, Lq, Lk, 16, terms=terms)


@pytest.mark.parametrize("layout", ["strided", "head_expanded"])
def test_position_tables_with_other_strides(layout):
    """Position rows read by the kernels' epilogue (``POS``): columns not unit-stride (the launcher makes a copy), or
    one table expanded over the heads (head stride 0); gradients reach the underlying tensor."""
    q, k, v, pk, pq, mask, akw = make_inputs(1, 3, 33, 27, 16)
    R = pk.shape[1]
    if layout == "strided":
        base = [torch.randn(3, R, 32)[..., ::2], torch.randn(3, R, 32)[..., 1::2]]
        assert base[0].stride(-1) == 2
    else:
        base = [torch.randn(3, R, 16), torch.randn(1, R, 16)]

    def pos(bs):
        return (bs[0], bs[1].expand(3, -1, -1)) if layout == "head_expanded" else tuple(bs)
    do = torch.randn(1, 3, 33, 16)
    got, ref = [], []
    for fn, dt, out in ((triton_fn(mask, akw), torch.float32, got), (reference_fn(mask, akw), torch.float64, ref)):
        ts = [t.to(dt).requires_grad_() for t in (q, k, v)]
        bs = [b.to(dt).requires_grad_() for b in base]
        o = fn(*ts, *pos(bs))
        out += [o, *torch.autograd.grad(o, ts + bs, do.to(dt))]
    for name, g, r in zip(("out", "dq", "dk", "dv", "dpos_a", "dpos_b"), got, ref):
        assert_close_fp32(g, r, tol=2e-5, what=name)


@pytest.mark.parametrize("dtype,groups", [(torch.float32, False), (torch.bfloat16, True)])
def test_relative_share_on_the_host(monkeypatch, dtype, groups):
    """The breakdown's ``REL_SHARE = "host"`` experiment: the kernels skip their epilogue (``RUN_PRODUCTS``), the
    launcher adds dq's / dk's relative share into float32 buffers and converts; in one launch, and per head."""
    from deberta_fast._kernels import triton_attention_launch as launch
    monkeypatch.setattr(launch, "REL_SHARE", "host")
    if groups:
        monkeypatch.setattr(launch, "TABLE_BUDGET", 1)
    seen = []
    real = launch._bwd_plan
    monkeypatch.setattr(launch, "_bwd_plan", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    check_grads(2, 2, 37, 29, 16, dtype=dtype, mask="key")
    assert seen and all(not plan.kw_dq["RUN_PRODUCTS"] and len(plan.groups) == (2 if groups else 1)
                        for plan, _ in seen)


def test_fp16_relative_share_beyond_fp16_range():
    """A run sum of many dS can exceed float16's range where no dS element does (probabilities spread over many
    keys, large dO): dq and dk stay finite and exact (the epilogue multiplies float16 inputs' sums in TF32; rounded to
    float16, the sum was inf and inf * 0 in the zeroed columns past the runs made whole rows NaN)."""
    B, H, L, D = 1, 1, 64, 16
    kw = dict(position_buckets=4, max_relative_positions=8)
    q = k = torch.zeros(B, H, L, D)
    v = torch.full((B, H, L, D), 150.0)
    v[..., 48:, :] = -450.0
    do = torch.full((B, H, L, D), 1000.0)
    gen = torch.Generator().manual_seed(0)
    pk, pq = (torch.randn(H, 8, D, generator=gen) * 1e-3 for _ in range(2))
    ts = (q, k, v, pk, pq)
    got = grads(lambda *a: disentangled_attention(*a, backend="triton", **kw), ts, torch.float16, do)
    ref = grads(lambda *a: disentangled_attention_reference(*a, **kw), ts, torch.float64, do)
    for name, g, r in zip(("dq", "dk"), got[1:3], ref[1:3]):
        assert torch.isfinite(g).all(), f"{name}: not finite"
        torch.testing.assert_close(g.double(), r, rtol=2e-2, atol=1.0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mask", ["full_b1", "full3d"])
def test_batched_pos_and_broadcast_mask(mask):
    check_grads(2, 2, 40, 33, 16, pos_batched=True, mask=mask)


@pytest.mark.parametrize("D", [24, 32, 40, 64])
def test_head_dims(D):
    check_grads(1, 2, 40, 40, D, mask="key")


@pytest.mark.parametrize("D", [8, 40])
def test_unaligned_head_dims_launch_padded_kernels(monkeypatch, D):
    """A head dim that is not a multiple of 16 is zero-padded to one before the kernels (so the launch specialization
    marks the row strides and the tile loads vectorise), and the results are sliced back: forward and backward,
    with a full mask at ragged lengths (its padded frame too)."""
    from deberta_fast._kernels import triton_attention_launch as launch
    seen = []
    real = launch._config
    monkeypatch.setattr(launch, "_config", lambda p, lq, lk, d, pr: seen.append((p, d)) or real(p, lq, lk, d, pr))
    check_grads(2, 2, 33, 21, D, mask="full3d")
    assert {p for p, _ in seen} == {"fwd", "bwd"} and all(d == D + (-D % 16) for _, d in seen), seen


@pytest.mark.slow
def test_long_sequence_saturated_v3():
    """Position gradients over saturated tiles (|i-j| >= 512) at L=600, v3 buckets."""
    check_grads(1, 1, 600, 600, 16, buckets=V3)


@pytest.mark.parametrize("mask", ["none", pytest.param("key", marks=pytest.mark.slow)])
def test_inner_tiles_between_saturated_ones(mask):
    """Buckets (64, 128): a band that saturates at |d| ~ 128, at L=300: a program walks saturated tiles (one end run),
    tiles with an end run and in-band ones, tiles strictly inside the band (``INNER``: per-distance stores only), and
    the end runs collect from saturated and in-band tiles alike."""
    check_grads(1, 1, 300, 290, 16, buckets=(64, 128), mask=mask)


@pytest.mark.parametrize("lq,lk", [(560, 7), (7, 560), (40, 33)])
def test_trimmed_tables_one_side_saturated(lq, lk):
    """v3 buckets, Lq >> Lk (and back): the tables cover only the used rows lo..hi (trimmed), with the
    saturated slot at one end only; gradients of pos_key / pos_query land in the right rows."""
    check_grads(1, 1, lq, lk, 16, buckets=V3)


@pytest.mark.parametrize("mask,terms", [("key", "both"), ("full", "c2p"), ("none", "p2c")])
def test_fp16(mask, terms):
    check_grads(2, 2, 48, 70, 16, dtype=torch.float16, mask=mask, terms=terms)


def test_bf16():
    check_grads(1, 2, 40, 40, 32, dtype=torch.bfloat16, mask="key")


@pytest.mark.parametrize("source", ["tables", "distance"])
@pytest.mark.parametrize("dtype,mask", [(torch.float16, "key"), (torch.bfloat16, "full")])
def test_16bit_tables_experiment(monkeypatch, dtype, mask, source):
    """``TABLE_DTYPE = "input"`` (the GPU A/B of ``benchmarks.breakdown``): the C2P / P2C tables in the call's 16-bit
    dtype (entries rounded once, as HF's own bmm rounds c2p / p2c), widened by the kernels: output and gradients
    within the low-precision bound, and the tables really are 16-bit (odd lengths, tiny buckets: both regions); slot
    tables and distance tables (``REL_SOURCE``: 8-element vectors)."""
    from deberta_fast._kernels import triton_attention_launch as launch

    made = []
    real = launch._table_gemm
    monkeypatch.setattr(launch, "TABLE_DTYPE", "input")
    monkeypatch.setattr(launch, "REL_SOURCE", source)
    monkeypatch.setattr(launch, "_table_gemm", lambda x, pos, *a: made.append(real(x, pos, *a)) or made[-1])
    check_grads(2, 2, 37, 53, 16, dtype=dtype, mask=mask)
    assert made and all(t.dtype == dtype for t in made)


def test_backward_is_deterministic():
    q, k, v, pk, pq, mask, kw = make_inputs(1, 1, 70, 45, 16, mask="key")
    do = torch.randn(1, 1, 70, 16)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)  # same dropout seed: the runs must agree bit for bit
        runs.append(grads(triton_fn(mask, kw, dropout_p=0.2), (q, k, v, pk, pq), torch.float32, do))
    for a, b, name in zip(*runs, NAMES):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


# ---------------------------------------------------------------- dropout

P_DROP = 0.3


def recover_keep_mask(B, H, Lq, Lk, seed, buckets=BUCKETED, p=P_DROP):
    """The kernel's keep-mask for ``seed``: with ``V`` = identity (``D = Lk``) the output is
    ``probs * keep * keep_scale(p)``.  The mask depends on (seed, b*H+h, i, j) only, not on the data."""
    q, k, _, pk, pq, _, kw = make_inputs(B, H, Lq, Lk, Lk, buckets=buckets)
    v = torch.eye(Lk).expand(B, H, Lk, Lk).contiguous()
    out = triton_attention(q, k, v, pk, pq, position_buckets=kw["position_buckets"],
                           max_relative_positions=kw["max_relative_positions"], span=pk.shape[-2] // 2,
                           scale=build_call(q, k, v, pk, pq, attention_mask=None, scale=None, dropout_p=0.0,
                                            **kw).scale, dropout_p=p, seed=seed)
    _, probs = disentangled_attention_reference(*cast((q, k, v, pk, pq), torch.float64), return_probs=True, **kw)
    ratio = out.double() / (keep_scale(p) * probs)
    keep = ratio > 0.5
    # every entry is exactly dropped (0) or kept and rescaled by keep_scale(p) (1)
    assert max_err(ratio, keep.double()) < 1e-4
    return keep


def test_dropout_keep_rate_and_independence():
    keep = recover_keep_mask(2, 2, 48, 32, seed=1234)
    n = keep.numel()
    rate = keep.double().mean().item()
    sd = ((1 - P_DROP) * P_DROP / n) ** 0.5
    assert abs(rate - (1 - P_DROP)) < 5 * sd, f"keep rate {rate:.4f}, expected {1 - P_DROP} +- {5 * sd:.4f}"
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep[..., :16, :], keep[..., 16:32, :])
    assert not torch.equal(keep, recover_keep_mask(2, 2, 48, 32, seed=1235))


@pytest.mark.parametrize("seed, p", [(1234, 0.3), (2**40 + 77, 0.5), (5, 0.875)])
def test_dropout_mask_is_the_cuda_kernels_stream(seed, p):
    """The stream of ``philox_ref.keep_of`` (numpy Philox checked against Random123), as the CUDA kernels draw it:
    one Philox4x32-10 call per 2 x 4 block (queries i, i + 8 by keys j, j + 1, j + 8, j + 9), 16-bit halves >=
    round(p * 2^16), a 64-bit seed (both key words), thresholds at and above 2^15, odd Lq and Lk (partial blocks)."""
    B, H, Lq, Lk = 2, 3, 37, 29
    keep = recover_keep_mask(B, H, Lq, Lk, seed, p=p)
    assert torch.equal(keep.cpu(), keep_mask(seed, 0, B, H, Lq, Lk, p).cpu())  # (the GPU run makes keep on cuda)


def test_drop_threshold_rounds_as_the_cuda_kernels():
    """The 16-bit threshold ``round(p * 2**16)`` rounds halves away from zero (``std::round`` in the CUDA bindings,
    not Python's half-to-even) and saturates at ``2**16 - 1``."""
    from deberta_fast._kernels.triton_attention_launch import _drop_threshold
    for p, want in [(0.0, 0), (0.1, 6554), (0.5, 32768), (2.5 / 2 ** 16, 3), (3.5 / 2 ** 16, 4), (1 - 2 ** -18, 65535)]:
        assert _drop_threshold(p) == drop_threshold(p) == want, p


@pytest.mark.parametrize("p", [0.3, 0.999, 2 ** -19])
def test_dropout_rescale_is_the_realised_keep_rate(p):
    """Kept elements are scaled by ``2**16 / (2**16 - t)``, the inverse of the keep probability the 16-bit threshold
    ``t`` realises, so that the expected output is the input's at any rate: ``1 / (1 - p)`` is 4.4e-6 off at p = 0.3,
    0.7 % at p = 0.999 (t = 65470; 1.5x at p = 0.99999) and scales a rate below 2**-17, which drops nothing (t = 0).
    Uniform probabilities (q = k = 0): ``out_i = sum_j keep_ij v_j / Lk * 2**16 / (2**16 - t)``."""
    B, H, L, D = 1, 2, 64, 16
    q = torch.zeros(B, H, L, D)  # (on the GPU where there is one: conftest's default device)
    v = torch.rand(B, H, L, D, generator=torch.Generator().manual_seed(3), device="cpu") + 0.5  # (relative error)
    out = triton_attention(q, q, v.to(q.device), None, None, position_buckets=4, max_relative_positions=16, span=4,
                           scale=0.25, dropout_p=p, seed=99)
    t = drop_threshold(p)
    want = keep_mask(99, 0, B, H, L, L, p).double() @ v.double() / L * (2 ** 16 / (2 ** 16 - t))
    assert (want != 0).sum() >= 4  # (p = 0.999: a few kept elements)
    torch.testing.assert_close(out.double().cpu(), want, rtol=2e-6, atol=0)


@triton.jit
def _round_kernel(X, Y, N: tl.constexpr, UPCAST: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, _rounded(tl.load(X + offs), Y, UPCAST))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gradient_stores_round_as_tensor_to(dtype):
    """The backward kernels store dq / dk / dv in the inputs' 16-bit dtype where no position gradient is added on the
    host (``_rounded``): rounded to nearest even, ties both ways, a carry into the exponent, NaN, inf and a subnormal
    included, as ``Tensor.to`` rounds the float32 sums (the interpreter's own bfloat16 conversion truncates); float32
    stored as is."""
    from deberta_fast._env import interpreting

    ulp = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -23}[dtype]
    special = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), -(1 + 3 * ulp / 2), 2 - ulp / 4,
                            float("nan"), float("inf"), -1e-39])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.cat([special, torch.randn(248) * 3.0]).to(dev)
    y = torch.empty(256, dtype=dtype, device=dev)
    _round_kernel[(1,)](x, y, 256, interpreting())
    assert torch.equal(y.isnan(), x.isnan())
    assert torch.equal(y.nan_to_num(0.0), x.to(dtype).nan_to_num(0.0))


@pytest.mark.parametrize("Lq,Lk,mask", [(48, 32, "key"), (40, 40, "key"), (33, 50, "full")])
def test_dropout_forward_backward_match_reference_with_same_mask(Lq, Lk, mask):
    """Also on uniform rows (padded rows of a key mask at Lq = Lk, the fully masked row of a full mask): their output
    comes from the forward's separate pass over the keys, with the same keep mask."""
    B, H, D, seed = 2, 2, 16, 99
    keep = recover_keep_mask(B, H, Lq, Lk, seed)
    q, k, v, pk, pq, mask, kw = make_inputs(B, H, Lq, Lk, D, mask=mask)
    c = build_call(q, k, v, pk, pq, attention_mask=mask, scale=None, dropout_p=P_DROP, **kw)
    do = torch.randn(B, H, Lq, D)

    def kernel(q, k, v, pk, pq):
        return triton_attention(q, k, v, pk, pq, c.key_mask, c.full_mask, c.uniform_rows, position_buckets=4,
                                max_relative_positions=8, span=c.span, scale=c.scale, dropout_p=P_DROP, seed=seed)

    def reference(q, k, v, pk, pq):
        _, probs = disentangled_attention_reference(q, k, v, pk, pq, attention_mask=mask, return_probs=True, **kw)
        return torch.matmul(probs * keep * keep_scale(P_DROP), v)

    got = grads(kernel, (q, k, v, pk, pq), torch.float32, do)
    ref = grads(reference, (q, k, v, pk, pq), torch.float64, do)
    for a, b, name in zip(got, ref, NAMES):
        assert_close_fp32(a, b, tol=2e-5, what=name)


def test_dropout_finite_difference():
    """Directional derivative of the dropout path (fixed seed) vs the kernel gradients, fp32."""
    q, k, v, pk, pq, mask, kw = make_inputs(1, 2, 20, 24, 16, mask="key")
    c = build_call(q, k, v, pk, pq, attention_mask=mask, scale=None, dropout_p=0.4, **kw)
    ts = cast((q, k, v, pk, pq), torch.float32, grad=True)
    w = torch.randn(1, 2, 20, 16)

    def f(*xs):
        out = triton_attention(*xs, c.key_mask, None, c.uniform_rows, position_buckets=4, max_relative_positions=8,
                               span=c.span, scale=c.scale, dropout_p=0.4, seed=5)
        return (out.double() * w).sum()

    g = torch.autograd.grad(f(*ts), ts)
    eps = 1e-2
    for idx in range(5):
        u = torch.randn_like(ts[idx])
        plus = [t.detach() + eps * u if i == idx else t.detach() for i, t in enumerate(ts)]
        minus = [t.detach() - eps * u if i == idx else t.detach() for i, t in enumerate(ts)]
        fd = (f(*plus) - f(*minus)).item() / (2 * eps)
        an = (g[idx].double() * u).sum().item()
        assert abs(fd - an) <= 2e-3 * max(1.0, abs(an)), f"input {idx}: finite difference {fd} vs grad {an}"


def test_dropout_reproducible_under_manual_seed():
    q, k, v, pk, pq, mask, kw = make_inputs(1, 2, 30, 30, 16, mask="key")
    do = torch.randn(1, 2, 30, 16)

    def run(seed):
        torch.manual_seed(seed)
        return grads(triton_fn(mask, kw, dropout_p=0.25), (q, k, v, pk, pq), torch.float32, do)

    a, b, other = run(3), run(3), run(4)
    for x, y, name in zip(a, b, NAMES):
        assert torch.equal(x, y), f"{name} not reproducible under torch.manual_seed"
    assert not torch.equal(a[0], other[0])
    nodrop = disentangled_attention(*cast((q, k, v, pk, pq), torch.float32), attention_mask=mask,
                                    backend="triton", **kw)
    assert not torch.equal(a[0], nodrop)


def test_transforms_go_through_the_custom_ops():
    """torch.func's transforms and the legacy vmap see the custom ops (their batching rule: a loop), never the direct
    path, whose kernels cannot read wrapper tensors: ``vmap`` and ``autograd.grad(is_grads_batched=True)`` equal a
    loop; ``functionalize`` is exact and leaves no wrapper tensor in the slot-table caches (a later eager call of the
    same shape is exact too)."""
    import warnings

    q, k, v, pk, pq, mask, kw = make_inputs(1, 2, 17, 17, 16)
    f = triton_fn(None, kw)
    qs = torch.stack([q, -q, 2 * q])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's "no batching rule" performance warning)
        got = torch.func.vmap(lambda x: f(x, k, v, pk, pq))(qs)
    assert torch.equal(got, torch.stack([f(x, k, v, pk, pq) for x in qs]))
    ts = [t.clone().requires_grad_() for t in (q, k, v, pk, pq)]
    gos = torch.randn(2, *q.shape)
    batched = torch.autograd.grad(f(*ts), ts, gos, is_grads_batched=True)
    for i in range(2):
        for a, b in zip(batched, torch.autograd.grad(f(*ts), ts, gos[i])):
            assert_close_fp32(a[i], b, tol=1e-6, what="batched gradient")
    ref = disentangled_attention_reference(q.double(), k.double(), v.double(), pk.double(), pq.double(), **kw)
    q2, k2, v2, pk2, pq2, _, _ = make_inputs(1, 2, 23, 23, 16)  # a shape no call above cached
    ref2 = disentangled_attention_reference(*(t.double() for t in (q2, k2, v2, pk2, pq2)), **kw)
    assert_close_fp32(torch.func.functionalize(f)(q2, k2, v2, pk2, pq2), ref2, tol=2e-5, what="functionalize")
    assert_close_fp32(f(q2, k2, v2, pk2, pq2), ref2, tol=2e-5, what="eager after functionalize")
    assert_close_fp32(f(q, k, v, pk, pq), ref, tol=2e-5, what="eager")


def test_forward_mode_ad_is_refused_not_dropped():
    """A forward-mode tangent (``torch.autograd.forward_ad``, ``torch.func.jvp``) is refused by name by the kernel
    backend (its autograd has no forward-mode formula), and ``auto`` serves it with the torch backend: the tangent
    of the reference, never a silently missing one."""
    import torch.autograd.forward_ad as fwAD

    from deberta_fast.dispatch import BackendUnavailableError

    q, k, v, pk, pq, mask, kw = make_inputs(1, 2, 15, 15, 16, mask="key")
    t = torch.randn_like(q)
    _, want = torch.func.jvp(lambda x: disentangled_attention(x, k, v, pk, pq, attention_mask=mask, backend="torch",
                                                              **kw), (q,), (t,))
    with pytest.raises(BackendUnavailableError, match="forward-mode AD"):
        torch.func.jvp(triton_fn(mask, kw), (q, k, v, pk, pq), (t, *(torch.zeros_like(x) for x in (k, v, pk, pq))))
    with fwAD.dual_level():
        with pytest.raises(BackendUnavailableError, match="forward-mode AD"):
            triton_fn(mask, kw)(fwAD.make_dual(q, t), k, v, pk, pq)
        # auto: the kernel backends refuse, the torch backend serves
        out = disentangled_attention(fwAD.make_dual(q, t), k, v, pk, pq, attention_mask=mask, backend="auto", **kw)
        got = fwAD.unpack_dual(out).tangent
    assert got is not None and torch.allclose(got, want, atol=1e-5)
    # the memo does not carry a choice across: the same signature without a tangent runs the kernels again
    disentangled_attention(q, k, v, pk, pq, attention_mask=mask, backend="triton", **kw)


def test_reverse_mode_transforms_are_refused_by_name():
    """torch.func's reverse-mode transforms (``grad``, ``vjp``, ``jacrev``) cannot run the kernels' autograd functions:
    refused by name (not torch's message about ``setup_context``), and ``auto`` serves them with the torch backend;
    a packed call under ``vmap`` still checks its offsets (they are readable there)."""
    import deberta_fast
    from deberta_fast.dispatch import BackendUnavailableError

    q, k, v, pk, pq, mask, kw = make_inputs(1, 2, 13, 13, 16)

    def loss(backend):
        return lambda x: disentangled_attention(x, k, v, pk, pq, backend=backend, **kw).sum()

    want = torch.func.grad(loss("torch"))(q)
    with pytest.raises(BackendUnavailableError, match="reverse-mode transforms"):
        torch.func.grad(loss("triton"))(q)
    for transform in (torch.func.grad, torch.func.jacrev):
        got = transform(loss("auto"))(q)
        assert deberta_fast.last_backend() == "torch" and torch.allclose(got, want, atol=1e-6)
    a, b, c = (t.transpose(1, 2).reshape(13, 2, 16) for t in (q, k, v))
    bad = torch.tensor([0, 5, 9], dtype=torch.int32)  # ends at 9 of 13 tokens
    with pytest.raises(ValueError, match="invalid offsets"):
        torch.func.vmap(lambda x: deberta_fast.disentangled_attention_varlen(
            x, b, c, pk, pq, bad, bad, 13, 13, backend="triton", **kw))(torch.stack([a, a]))


def test_double_backward_refuses_clearly():
    """A backward that records a graph (``create_graph=True``) goes through the backward op: first-order gradients
    as without it, and a second-order gradient refuses (the op has no autograd formula) instead of a silent zero."""
    q, k, v, pk, pq, mask, kw = make_inputs(1, 2, 19, 19, 16, mask="key")
    ts = [t.requires_grad_() for t in (q, k, v, pk, pq)]
    f = triton_fn(mask, kw)
    gq, = torch.autograd.grad(f(*ts).square().sum(), ts[0], create_graph=True)
    want, = torch.autograd.grad(f(*ts).square().sum(), ts[0])
    assert torch.equal(gq.detach(), want)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(gq.sum(), ts[2])


@pytest.mark.parametrize("mask", ["key", "full"])
def test_default_device_mode_keeps_the_direct_path(monkeypatch, mask):
    """Under ``torch.set_default_device`` (here "meta": a constructor without a device would make a tensor no kernel
    can use) forward and backward take the direct path and stay exact: every constructor on it names its device."""
    from deberta_fast.backends import triton_backend

    calls = []
    real = triton_backend._direct
    monkeypatch.setattr(triton_backend, "_direct", lambda *t: calls.append(real(*t)) or calls[-1])
    q, k, v, pk, pq, m, kw = make_inputs(1, 2, 21, 21, 16, mask=mask)
    do = torch.randn(1, 2, 21, 16)
    ref = grads(reference_fn(m, kw), (q, k, v, pk, pq), torch.float64, do)
    prev = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        got = grads(triton_fn(m, kw), (q, k, v, pk, pq), torch.float32, do)
    finally:
        torch.set_default_device(None if prev.type == "cpu" else prev)
    assert calls == [True, True]
    for name, a, b in zip(NAMES, got, ref):
        assert a.device == q.device
        assert_close_fp32(a, b, tol=2e-5, what=name)



def test_kernels_follow_the_device_table_not_a_cpu_recomputation(perturb_slot_table):
    """The saturated tiles' band and the backward's runs are read off the slot table the kernels gather from (a
    host copy of the device's table), never recomputed from the bucket function on the CPU, whose ``log`` can round
    a bucket boundary differently from a GPU's.  Here the table differs from the function at d = -33 (slot 1 where
    the function gives 0): the 32x32 tile whose largest distance is -33 must not be taken as saturated."""
    from deberta_fast import positions as P

    perturb_slot_table(4, 8, 100, [-33], 1)
    assert P.table_band(100, 100, 4, 8, 4).lo == -34 and P.slot_band(4, 8, 4).lo == -8
    check_grads(1, 2, 100, 100, 16, buckets=(4, 8), mask="key")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_backward_reads_an_out_of_any_layout(packed):
    """The dq kernel reads ``out`` (``DELTA = rowsum(dO * O)``): an ``out`` whose head dim is strided (a direct
    caller of the op) gives the gradients of its contiguous copy, bitwise; so do statistics that are not contiguous
    (the kernels find their second plane from the first, ``_stat_planes``)."""
    q, k, v, pk, pq, _, kw = make_inputs(2, 2, 19, 19, 16, buckets=V3)
    c = build_call(q, k, v, pk, pq, attention_mask=None, scale=None, dropout_p=0.0, **kw)
    args = (c.position_buckets, c.max_relative_positions, c.span, c.scale, 0.0, None)
    out, stats = torch.ops.deberta_fast.triton_fwd(q, k, v, pk, pq, None, None, None, *args)
    if packed:  # two sequences of 19 tokens, [T, H, D]
        cu = torch.tensor([0, 19, 38], dtype=torch.int32)
        q, k, v = (t.transpose(1, 2).reshape(38, 2, 16) for t in (q, k, v))
        out, stats = torch.ops.deberta_fast.triton_varlen_fwd(q, k, v, pk, pq, cu, cu, 19, 19, *args)
        bwd = lambda o, st=stats: torch.ops.deberta_fast.triton_varlen_bwd(  # noqa
            do, q, k, v, pk, pq, o, st, cu, cu, 19, 19, *args)
    else:
        bwd = lambda o, st=stats: torch.ops.deberta_fast.triton_bwd(  # noqa
            do, q, k, v, pk, pq, o, st, None, None, None, *args)
    do = torch.randn_like(out)
    wide = torch.zeros(*out.shape[:-1], 2 * out.shape[-1])
    wide[..., ::2] = out
    assert wide[..., ::2].stride(-1) == 2
    planes_last = torch.empty(*stats.shape[1:], 2).movedim(-1, 0)  # [2, ...] with the planes interleaved
    planes_last.copy_(stats)
    assert not planes_last.is_contiguous()
    want = bwd(out)
    for got in (bwd(wide[..., ::2]), bwd(out, planes_last)):
        for a, b in zip(want, got):
            assert torch.equal(a, b)
