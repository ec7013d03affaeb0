"""The GPU launch configs' tile shapes (64x64 / 64x32 / 32x64 forward, 32x16 dK/dV, 32x64 backward at D=16, ...; those
of sm_90 and of sm_8x) run exactly under the interpreter.  The interpreter's own config is 32x32 everywhere, so without
this the non-square tiles the GPU launches would first run on a GPU.  (``num_warps`` / ``num_stages`` mean nothing to the interpreter.)"""
import pytest
import torch

from deberta_fast import disentangled_attention_varlen
from triton_cases import BUCKETED, V3, assert_close_fp32, grads, make_inputs, reference_fn, triton_fn

pytest.importorskip("triton")


@pytest.fixture(params=[90, 80], ids=["sm90", "sm80"])
def gpu_configs(monkeypatch, request):
    from deberta_fast._kernels import triton_attention_launch as launch

    used = []

    def gpu_config(pass_, q_len, k_len, head_dim, fp32_ieee=False, **kw):
        # the 16-bit configs of each architecture family (the tests' float32 would pick the IEEE float32 ones, all
        # 32x32 like the interpreter's)
        varlen = kw.get("varlen", False)
        full, aligned = kw.get("full_mask", False) and not varlen, not varlen and q_len % 16 == 0 and k_len % 16 == 0
        cfg = launch._gpu_config(pass_, max(16, launch._next_pow2(head_dim)), max(q_len, k_len) <= 64, False, False,
                                 request.param, varlen, kw.get("dropout", False), full, aligned)
        used.append(cfg)
        return cfg

    monkeypatch.setattr(launch, "launch_config", gpu_config)
    return used


def _check(B, H, L, D, buckets, mask="key"):
    q, k, v, pk, pq, m, kw = make_inputs(B, H, L, L, D, buckets=buckets, mask=mask)
    do = torch.randn(B, H, L, D)
    got = grads(triton_fn(m, kw), (q, k, v, pk, pq), torch.float32, do)
    ref = grads(reference_fn(m, kw), (q, k, v, pk, pq), torch.float64, do)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dpos_key", "dpos_query"), got, ref):
        assert_close_fp32(a, b, tol=2e-5, what=name)


@pytest.mark.parametrize("B,D,L", [(2, 64, 150), (1, 32, 110), (1, 128, 97), (2, 64, 45)],
                         ids=["D64", "D32", "D128", "D64-short"])
def test_gpu_tiles_padded(gpu_configs, B, D, L):
    """Tiny buckets: in-band and saturated tiles, ragged edges, key padding."""
    _check(B, 2, L, D, BUCKETED)
    assert len(gpu_configs) == 2  # the launcher asked the patched config for the forward and the backward


def test_gpu_tiles_v3_buckets(gpu_configs):
    _check(1, 2, 130, 64, V3)


@pytest.mark.parametrize("scale", [None, -0.125, 0.0], ids=["default-scale", "negative-scale", "zero-scale"])
def test_gpu_tiles_scattered_key_mask(gpu_configs, scale):
    """Keys masked at random inside the forward's 128-key saturated tiles (D = 64 without dropout), which read the
    p2c column under the key mask and select -inf for masked keys (``_rel_terms``; ``-inf * scale`` would be NaN or
    +inf at a scale <= 0), and a batch entry with every key masked (HF's uniform rows)."""
    B, H, L, D = 2, 1, 200, 64
    q, k, v, pk, pq, _, kw = make_inputs(B, H, L, L, D, buckets=BUCKETED)
    mask = torch.rand(B, L) > 0.3
    mask[0, :7] = False
    mask[1] = False
    do = torch.randn(B, H, L, D)
    kw = dict(kw, scale=scale)
    got = grads(triton_fn(mask, kw), (q, k, v, pk, pq), torch.float32, do)
    ref = grads(reference_fn(mask, kw), (q, k, v, pk, pq), torch.float64, do)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dpos_key", "dpos_query"), got, ref):
        assert_close_fp32(a, b, tol=2e-5, what=name)
    assert gpu_configs[0].sat_block_n == 128, gpu_configs[0]  # both families' D = 64 inference tiles


@pytest.mark.parametrize("mask", ["key", "full"])
@pytest.mark.parametrize("D,L", [(64, 75), (64, 96), (128, 61),
                                 pytest.param(16, 300, marks=pytest.mark.slow)],  # (~21 s each under the interpreter)
                         ids=["D64", "D64-aligned", "D128", "D16-128-key-saturated"])
def test_gpu_tiles_dropout(gpu_configs, D, L, mask):
    """Dropout under the GPU tiles (the keep mask built per tile: 64-key forward tiles and their wider saturated ones,
    dK/dV's transposed mask on 16- and 32-key tiles), against the reference with the stream's mask
    (``philox_ref.keep_mask``); a length that ends inside a Philox call's block of 16 keys.  A full mask takes
    configs of its own (``launch_config(full_mask=True)``) and reads the mask's zero frame past the lengths."""
    from deberta_fast.backends.triton_backend import triton_attention
    from deberta_fast.dispatch import build_call
    from deberta_fast.reference import disentangled_attention_reference
    from philox_ref import keep_mask, keep_scale

    B, H, p, seed = 1, 2, 0.25, 4321
    kind = mask  # (the name is rebound to the mask tensor below)
    q, k, v, pk, pq, mask, kw = make_inputs(B, H, L, L, D, buckets=BUCKETED, mask=mask)
    c = build_call(q, k, v, pk, pq, attention_mask=mask, scale=None, dropout_p=p, **kw)
    keep = keep_mask(seed, 0, B, H, L, L, p)
    do = torch.randn(B, H, L, D)

    def kernel(q, k, v, pk, pq):
        return triton_attention(q, k, v, pk, pq, c.key_mask, c.full_mask, c.uniform_rows, span=c.span, scale=c.scale,
                                dropout_p=p, seed=seed, **kw)

    def reference(q, k, v, pk, pq):
        _, probs = disentangled_attention_reference(q, k, v, pk, pq, attention_mask=mask, return_probs=True, **kw)
        return torch.matmul(probs * keep * keep_scale(p), v)

    got = grads(kernel, (q, k, v, pk, pq), torch.float32, do)
    ref = grads(reference, (q, k, v, pk, pq), torch.float64, do)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dpos_key", "dpos_query"), got, ref):
        assert_close_fp32(a, b, tol=2e-5, what=name)
    from deberta_fast._kernels import triton_attention_launch as launch
    assert len(gpu_configs) == 2 and gpu_configs[0] != launch._INTERPRETER_CONFIG["fwd"]
    if kind == "full":  # the full-mask forward configs: saturated tiles as wide as the band's
        assert gpu_configs[0].sat_block_n in (0, gpu_configs[0].block_n), gpu_configs[0]
    elif D == 16:  # the 128-key saturated tiles, keep masks built 128 keys wide
        assert gpu_configs[0].sat_block_n == 128, gpu_configs[0]


def test_gpu_tiles_packed(gpu_configs):
    """Packed sequences of uneven lengths under the D=64 GPU tiles."""
    lens = [70, 3, 130]
    cu = torch.tensor([0, 70, 73, 203], dtype=torch.int32)
    H, D = 2, 64
    q, k, v = (torch.randn(203, H, D) for _ in range(3))
    pk, pq = torch.randn(H, 8, D), torch.randn(H, 8, D)
    kw = dict(position_buckets=4, max_relative_positions=8)
    do = torch.randn(203, H, D)

    def packed(q, k, v, pk, pq):
        return disentangled_attention_varlen(q, k, v, pk, pq, cu, cu, max(lens), max(lens), backend="triton", **kw)

    def per_sequence(q, k, v, pk, pq):
        outs = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            seq = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]
            outs.append(reference_fn(None, kw)(*seq, pk, pq)[0].transpose(0, 1))
        return torch.cat(outs)

    got = grads(packed, (q, k, v, pk, pq), torch.float32, do)
    ref = grads(per_sequence, (q, k, v, pk, pq), torch.float64, do)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dpos_key", "dpos_query"), got, ref):
        assert_close_fp32(a, b, tol=2e-5, what=name)
    fwd, bwd = gpu_configs[0], gpu_configs[1]
    assert (fwd.block_m, fwd.block_n) != (32, 32)  # the GPU forward tile, not the interpreter's
    assert (bwd.dq.block_m, bwd.dkdv.block_m) != (32, 32)  # the packed backward's (without dropout: 64x32, 16x64)


@pytest.mark.parametrize("D,L", [(64, 70), (128, 53)], ids=["D64", "D128"])
def test_fp32_ieee_tiles(monkeypatch, D, L):
    """The IEEE float32 configs (32x16 / 16x16 forward, 16x16 backward tiles) under the interpreter."""
    from deberta_fast._kernels import triton_attention_launch as launch

    used = []

    def fp32_config(pass_, q_len, k_len, head_dim, fp32_ieee=False, **kw):
        assert fp32_ieee  # the tests' inputs are float32 and TF32 is off
        used.append(launch._gpu_config(pass_, max(16, launch._next_pow2(head_dim)), max(q_len, k_len) <= 64, True))
        return used[-1]

    monkeypatch.setattr(launch, "launch_config", fp32_config)
    _check(1, 2, L, D, BUCKETED)
    assert (used[1].dq.block_m, used[1].dq.block_n) == (16, 16) and used[0].block_n == 16


@pytest.mark.parametrize("case", ["D64-key", "D128-full", "D64-lq-lt-lk", "D64-lq-gt-lk", "D64-packed"])
def test_dropout_decisions_passed_as_bytes(gpu_configs, monkeypatch, case):
    """The dK/dV kernel's dropout decisions read from the dq kernel's bytes (``DROPOUT_BITS = "bits"``, shipped) are
    its own Philox draws (``"philox"``): output and every gradient bit for bit the same, under each architecture's
    tiles (dK/dV 16x64, 32x16, packed 32x32: 16 and 32 queries per tile), HF's uniform rows (dK/dV's pass over
    them), ragged lengths inside a 16-key call block, Lq != Lk both ways, packed sequences of uneven lengths."""
    from deberta_fast._kernels import triton_attention_launch as launch

    widths = []
    buffer = launch._keep_buffer

    def recording(rows, width, dummy):
        widths.append(width)
        return buffer(rows, width, dummy)

    monkeypatch.setattr(launch, "_keep_buffer", recording)
    D = 128 if case == "D128-full" else 64
    if case == "D64-packed":
        cu = torch.tensor([0, 37, 40, 141], dtype=torch.int32)
        q, k, v, do = (torch.randn(141, 2, D) for _ in range(4))
        pk, pq = torch.randn(2, 8, D), torch.randn(2, 8, D)

        def fn(q, k, v, pk, pq):
            return disentangled_attention_varlen(q, k, v, pk, pq, cu, cu, 101, 101, position_buckets=4,
                                                 max_relative_positions=8, dropout_p=0.3, backend="triton")
        tensors = (q, k, v, pk, pq)
    else:
        Lq, Lk = {"D64-lq-lt-lk": (45, 83), "D64-lq-gt-lk": (83, 45)}.get(case, (75, 75))
        q, k, v, pk, pq, mask, kw = make_inputs(2, 2, Lq, Lk, D, buckets=BUCKETED,
                                                mask="full" if case == "D128-full" else "key")
        if case.startswith("D64-lq"):
            mask = torch.rand(2, Lk) > 0.3
            mask[1] = False  # every key masked: uniform rows
        elif case == "D64-key":
            mask[1] = False
        do = torch.randn(2, 2, Lq, D)
        fn, tensors = triton_fn(mask, kw, dropout_p=0.3), (q, k, v, pk, pq)
    results = {}
    for source in ("philox", "bits"):
        monkeypatch.setattr(launch, "DROPOUT_BITS", source)
        torch.manual_seed(7)  # the same seed, drawn by the call
        results[source] = grads(fn, tensors, torch.float32, do)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dpos_key", "dpos_query"), results["bits"], results["philox"]):
        assert torch.equal(a, b), name
    assert widths.count(0) == 1 and len(widths) == 2, widths  # one backward each way, the bytes in the second
    # dK/dV query tiles of 16 (padded D = 64) and of 32 (D = 128, packed): one int32 per byte row and 16 queries
    assert gpu_configs[1].dkdv.block_m == (32 if case in ("D128-full", "D64-packed") else 16), gpu_configs[1]
