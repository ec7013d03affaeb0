"""Host overhead of one attention call: the triton backend's whole Python path (argument checks, dispatch,
autograd, custom op, launcher: position tables, allocations, launch arguments) with the kernel launches
stubbed out, at a tiny shape (B=1, H=2, L=24, D=16) where tensor work is negligible.  Forward, and forward +
backward; padded, and packed (``disentangled_attention_varlen`` as a patched model calls it: two sequences of 24
and 16 tokens, offsets unchecked).  This is the time a small-batch inference call spends before the GPU has work
(issue target: <= 50 us per call).  On CPU the stubbed launcher runs on CPU tensors (TRITON_INTERPRET=1 lets the backend
accept them; no kernel runs); on a GPU on CUDA tensors.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host

# a round times CALLS_PER_ROUND calls back to back (warm caches: the harness's per-round cache flush and per-call
# device sync would time a cold path and the device)
WARM_CALLS, CALLS_PER_ROUND, ROUNDS = 30, 40, 25


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def stubbed_triton(monkeypatch):
    from deberta_fast.backends import BACKENDS

    why = BACKENDS["triton"].unavailable()
    if why:
        pytest.skip(f"deberta_fast backend='triton' unavailable: {why}")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the backend accepts CPU tensors; nothing is interpreted
    from deberta_fast._kernels import triton_attention_launch as launch

    for name in ("disentangled_fwd_kernel", "disentangled_bwd_dkdv_kernel", "disentangled_bwd_dq_kernel"):
        monkeypatch.setattr(launch, name, _NoLaunch())
    yield "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("buckets,mask_dtype,dropout_p", [((256, 512), torch.long, 0.0), ((4, 8), torch.long, 0.0),
                                                          ((256, 512), torch.bool, 0.0), ((256, 512), torch.bool, 0.1)],
                         ids=["v3-buckets", "tiny-buckets", "v3-buckets-bool-mask", "v3-buckets-bool-mask-dropout"])
def bench_host(benchmark, stubbed_triton, mode, buckets, mask_dtype, dropout_p):
    """An HF padding mask (int64, as tokenizers give it), and the bool mask a patched encoder passes its layers (in
    training, with DeBERTa's attention dropout 0.1: the seed drawn on the device)."""
    import deberta_fast as df

    dev = stubbed_triton
    benchmark.group = f"host {mode} (kernel launches stubbed)"
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dev).requires_grad_(mode != "fwd")  # noqa: E731
    span = df.positions.attention_span(*buckets)
    q, k, v, pk, pq = mk(1, 2, 24, 16), mk(1, 2, 24, 16), mk(1, 2, 24, 16), mk(2, 2 * span, 16), mk(2, 2 * span, 16)
    mask = torch.ones(1, 24, dtype=mask_dtype, device=dev)
    dout = torch.ones(1, 2, 24, 16, device=dev)

    def fn():
        out = df.disentangled_attention(q, k, v, pk, pq, position_buckets=buckets[0],
                                        max_relative_positions=buckets[1], attention_mask=mask, dropout_p=dropout_p,
                                        backend="triton")
        if mode != "fwd":
            out.backward(dout)
        return out

    drop = f", dropout {dropout_p}" if dropout_p else ""
    _time(benchmark, fn, f"deberta_fast-triton buckets {buckets[0]}/{buckets[1]}, {str(mask_dtype)[6:]} mask{drop}",
          mode, L=24)


def _time(benchmark, fn, candidate: str, mode: str, backend: str = "triton", **shape):
    import deberta_fast as df

    fn()
    assert df.last_backend() == backend
    for _ in range(WARM_CALLS):  # caches, allocator, first-call work
        fn()

    # back to back, as a model's layers call it: no cache flush, no device sync; pytest-benchmark reports per call
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=CALLS_PER_ROUND, warmup_rounds=1)
    benchmark.extra_info.update({"candidate": candidate, "suite": "host", "kind": "deberta_fast", "mode": mode,
                                 "B": 1, **shape, "calls_per_round": CALLS_PER_ROUND, "rounds": ROUNDS,
                                 "parity": "n/a (launches stubbed: nothing is computed)"})


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def bench_host_packed(benchmark, stubbed_triton, mode):
    import deberta_fast as df

    dev = stubbed_triton
    benchmark.group = f"host {mode} (kernel launches stubbed)"
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dev).requires_grad_(mode != "fwd")  # noqa: E731
    q, k, v, pk, pq = mk(40, 2, 16), mk(40, 2, 16), mk(40, 2, 16), mk(2, 512, 16), mk(2, 512, 16)
    cu = torch.tensor([0, 24, 40], dtype=torch.int32, device=dev)
    dout = torch.ones(40, 2, 16, device=dev)

    def fn():
        out = df.disentangled_attention_varlen(q, k, v, pk, pq, cu, cu, 24, 24, position_buckets=256,
                                               max_relative_positions=512, backend="triton", check_offsets=False)
        if mode != "fwd":
            out.backward(dout)
        return out

    _time(benchmark, fn, "deberta_fast-triton packed 24+16 tokens, buckets 256/512", mode, L=24, tokens=40)


@pytest.fixture
def stubbed_cuda(monkeypatch):
    """The cuda backend with its launches stubbed: on CPU the simulator build of the extension (the same host code,
    compiled -O2) in dry-run mode (each launch checks its configuration and runs no block); on a GPU the real
    extension, whose launches are asynchronous (not stubbed: the host's time per call as long as the device keeps
    up, which it does at this size)."""
    from deberta_fast import _cuda_ext
    from deberta_fast.backends import BACKENDS

    if torch.cuda.is_available():
        why = BACKENDS["cuda"].unavailable()
        if why:
            pytest.skip(f"deberta_fast backend='cuda' unavailable: {why}")
        yield "cuda"
        return
    monkeypatch.setenv("DEBERTA_FAST_CUDA_SIM", "1")
    why = BACKENDS["cuda"].unavailable()
    if why:
        pytest.skip(f"deberta_fast backend='cuda' unavailable: {why}")
    sim = _cuda_ext.simulator()
    prev = sim.sim_dry_run(True)
    try:
        yield "cpu"
    finally:
        sim.sim_dry_run(prev)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def bench_host_cuda(benchmark, stubbed_cuda, mode, packed):
    """The cuda backend (``backend="auto"``'s first choice) on the calls of :func:`bench_host` (bool mask) and
    :func:`bench_host_packed`, in bf16 with D = 32 (its types and head dims)."""
    import deberta_fast as df

    dev = stubbed_cuda
    benchmark.group = f"host {mode} (kernel launches stubbed)"
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dev, torch.bfloat16).requires_grad_(mode != "fwd")  # noqa: E731
    kw = dict(position_buckets=256, max_relative_positions=512, backend="cuda")
    pk, pq = mk(2, 512, 32), mk(2, 512, 32)
    if packed:
        q, k, v = mk(40, 2, 32), mk(40, 2, 32), mk(40, 2, 32)
        cu = torch.tensor([0, 24, 40], dtype=torch.int32, device=dev)
        call = lambda: df.disentangled_attention_varlen(q, k, v, pk, pq, cu, cu, 24, 24, check_offsets=False,  # noqa
                                                        **kw)
    else:
        q, k, v = mk(1, 2, 24, 32), mk(1, 2, 24, 32), mk(1, 2, 24, 32)
        mask = torch.ones(1, 24, dtype=torch.bool, device=dev)
        call = lambda: df.disentangled_attention(q, k, v, pk, pq, attention_mask=mask, **kw)  # noqa: E731
    dout = torch.ones(q.shape, device=dev, dtype=torch.bfloat16)

    def fn():
        out = call()
        if mode != "fwd":
            out.backward(dout)
        return out

    what = "packed 24+16 tokens" if packed else "bool mask"
    _time(benchmark, fn, f"deberta_fast-cuda {what}, buckets 256/512, bf16", mode, backend="cuda", L=24,
          **({"tokens": 40} if packed else {}))
