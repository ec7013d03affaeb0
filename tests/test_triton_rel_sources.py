"""The Triton forward's experimental sources of relative terms (``REL_SOURCE``, the GPU A/B of
``benchmarks.breakdown``): ``"skew"``, no tables (band tiles from window products skewed through a per-program scratch,
saturated tiles from in-kernel per-row / per-key terms), and ``"distance"``, tables with a column per distance (band
tiles read them as unit-stride tiles, with no slot-table load).  Output and log-sum-exp against the float64
reference (every term, bucket config, mask kind, Lq != Lk, 4-D position tables, packed calls, head groups), the same
dropout keep-mask as the tables path, the backward from each forward's statistics (skew: with slot tables; distance:
with distance tables too), and the distance tables under the GPU launch configs' tiles.  Interpreter on CPU
(tests/conftest.py)."""
import pytest
import torch

from deberta_fast import disentangled_attention, disentangled_attention_varlen

from triton_cases import (BUCKETED, UNBUCKETED, V3, assert_close_fp32, assert_close_lowp, grads, make_inputs,
                          max_err, reference_fn, reference_forward_lse, triton_fn, triton_forward_lse)

pytest.importorskip("triton")
launch = pytest.importorskip("deberta_fast._kernels.triton_attention_launch")


class _Launches(list):
    source: str
    tables: list  # per table build (_tables): whether it had a column per distance

    def backward_tables_ok(self) -> bool:
        """Tables were built, all with a column per distance under "distance" (forward and backward), all with slot
        columns under "skew" (only its backward builds tables)."""
        return bool(self.tables) and all(t == (self.source == "distance") for t in self.tables)

    def clear(self):
        super().clear()
        self.tables.clear()


@pytest.fixture(params=["skew", "distance"])
def source(monkeypatch, request):
    """``REL_SOURCE`` set to one experiment; yields the list, per launch, of whether it took that path (``.source``:
    the experiment)."""
    monkeypatch.setattr(launch, "REL_SOURCE", request.param)
    used = _Launches()
    real = launch._rel_args

    def counting(*a):
        res = real(*a)
        # skew: its flag; distance: a window passed, and the tables made have its dist1 - dist0 + 1 columns
        used.append(res[4] if request.param == "skew" else
                    a[8] is not None and all(t.shape[-1] == a[8][1] - a[8][0] + 1 for t in res[:2] if t.dim() > 1))
        return res
    monkeypatch.setattr(launch, "_rel_args", counting)
    used.source, used.tables = request.param, []
    real_tables = launch._tables

    def tables(*a, **kw):
        used.tables.append((a[6] if len(a) > 6 else kw.get("columns")) is not None)
        return real_tables(*a, **kw)
    monkeypatch.setattr(launch, "_tables", tables)
    return used


@pytest.mark.parametrize("terms", ["both", "c2p", "p2c"])
@pytest.mark.parametrize("buckets,mask,Lq,Lk", [
    (BUCKETED, "key", 45, 70), (V3, "none", 70, 45), (UNBUCKETED, "full", 33, 33), (BUCKETED, "full_h1", 17, 100),
    (BUCKETED, "key", 200, 45)])
def test_forward_fp32(source, terms, buckets, mask, Lq, Lk):
    q, k, v, pk, pq, m, kw = make_inputs(2, 3, Lq, Lk, 16, terms=terms, buckets=buckets, mask=mask)
    out, lse = triton_forward_lse(q, k, v, pk, pq, m, kw)
    ref, ref_lse = reference_forward_lse(q, k, v, pk, pq, m, kw, torch.float64)
    assert source and all(source), f"the {source.source} path did not run"
    assert_close_fp32(out, ref, what="out")
    assert_close_fp32(lse, ref_lse, what="lse")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_forward_low_precision_batched_pos(source, dtype):
    q, k, v, pk, pq, m, kw = make_inputs(2, 2, 64, 40, 32, buckets=BUCKETED, pos_batched=True, mask="key")
    ts = [t.to(dtype) for t in (q, k, v, pk, pq)]
    out = disentangled_attention(*ts, attention_mask=m, backend="triton", **kw)
    ref = reference_fn(m, kw)(*[t.double() for t in (q, k, v, pk, pq)])
    low = reference_fn(m, kw)(*ts)
    assert all(source)
    assert_close_lowp(out, ref, low, what="out")


def test_dropout_keep_mask_is_the_tables_paths(monkeypatch, source):
    """Same seed, same keep-mask: the two paths differ by rounding only (a different mask differs by O(1))."""
    q, k, v, pk, pq, m, kw = make_inputs(2, 2, 50, 50, 16, buckets=BUCKETED, mask="key")
    outs = []
    for src in ("tables", source.source):
        monkeypatch.setattr(launch, "REL_SOURCE", src)
        torch.manual_seed(3)
        outs.append(disentangled_attention(q, k, v, pk, pq, attention_mask=m, backend="triton", dropout_p=0.3, **kw))
    assert max_err(outs[0], outs[1]) <= 1e-5 * outs[0].abs().max().item()


def test_backward_from_the_experimental_forward(source):
    q, k, v, pk, pq, m, kw = make_inputs(1, 2, 45, 70, 16, buckets=BUCKETED, mask="key")
    ts, do = (q, k, v, pk, pq), torch.randn(1, 2, 45, 16)
    got = grads(triton_fn(m, kw), ts, torch.float32, do)
    ref = grads(reference_fn(m, kw), ts, torch.float64, do)
    assert source.backward_tables_ok(), source.tables
    for g, r in zip(got, ref):
        assert_close_fp32(g, r, tol=2e-5)


def test_packed_and_head_groups(monkeypatch, source):
    H, D = 3, 16
    lens = [23, 1, 40, 9]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    T = sum(lens)
    q, k, v = torch.randn(T, H, D), torch.randn(T, H, D), torch.randn(T, H, D)
    pk, pq = torch.randn(H, 16, D), torch.randn(H, 16, D)
    kw = dict(position_buckets=BUCKETED[0], max_relative_positions=BUCKETED[1])
    monkeypatch.setattr(launch, "TABLE_BUDGET", 1)  # a launch per head
    out = disentangled_attention_varlen(q, k, v, pk, pq, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=40,
                                        max_seqlen_k=40, backend="triton", **kw)
    assert len(source) == H and all(source)
    for n in range(len(lens)):
        s = slice(cu[n].item(), cu[n + 1].item())
        one = [t[s].transpose(0, 1)[None] for t in (q, k, v)]
        ref = disentangled_attention(*one, pk, pq, backend="torch", **kw)[0].transpose(0, 1)
        assert_close_fp32(out[s], ref, what=f"sequence {n}")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_backward_with_dropout_and_head_groups(monkeypatch, source, packed):
    """Forward and backward with dropout, a launch per head (``TABLE_BUDGET``), a key mask / packed sequences of
    other lengths: the same values as the slot tables' path, seed for seed (rounding apart)."""
    monkeypatch.setattr(launch, "TABLE_BUDGET", 1)
    kw = dict(position_buckets=BUCKETED[0], max_relative_positions=BUCKETED[1], dropout_p=0.25)
    if packed:
        lens = [23, 1, 40, 9]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        ts = [torch.randn(sum(lens), 3, 16) for _ in range(3)] + [torch.randn(3, 16, 16), torch.randn(3, 16, 16)]
        do = torch.randn(sum(lens), 3, 16)

        def fn(q, k, v, pk, pq):
            return disentangled_attention_varlen(q, k, v, pk, pq, cu, cu, 40, 40, backend="triton", **kw)
    else:
        q, k, v, pk, pq, m, _ = make_inputs(2, 3, 37, 52, 16, buckets=BUCKETED, mask="key")
        ts, do = (q, k, v, pk, pq), torch.randn(2, 3, 37, 16)
        fn = triton_fn(m, {}, **kw)
    res = []
    for src in ("tables", source.source):
        monkeypatch.setattr(launch, "REL_SOURCE", src)
        source.clear()
        torch.manual_seed(5)
        res.append(grads(fn, ts, torch.float32, do))
    assert source and all(source) and source.backward_tables_ok(), source.tables
    for name, a, b in zip(("out", "dq", "dk", "dv", "dpos_key", "dpos_query"), *res):
        assert max_err(a, b) <= 2e-5 * b.abs().max().item(), name


@pytest.mark.parametrize("arch", [90, 80], ids=["sm90", "sm80"])
@pytest.mark.parametrize("buckets,L,Lk,packed", [(BUCKETED, 200, 200, False), (V3, 130, 130, False),
                                                 (BUCKETED, 77, 150, False), (BUCKETED, 300, 100, False),
                                                 (BUCKETED, 0, 0, True)],
                         ids=["tiny-200", "v3-130", "tiny-77x150", "tiny-300x100", "packed"])
def test_distance_tables_under_gpu_tiles(monkeypatch, arch, buckets, L, Lk, packed):
    """``REL_SOURCE = "distance"`` under the GPU forward configs (64-row tiles, 128-key saturated tiles with the margin
    :func:`_dist_window` gives them; the interpreter's own tiles are 32 x 32): output and all five gradients against
    float64, keys masked at random (a batch entry with every key masked), Lq != Lk (query blocks with every key
    beyond the band: the saturated loop takes a partial last tile), packed sequences with other query and key
    lengths.  Every table sits between NaN guards (a read outside it would reach an output or a gradient); padded
    calls' P2C (``DIST_KEYED``) is -inf on exactly the masked keys and the rows appended to a block, C2P finite."""
    monkeypatch.setattr(launch, "REL_SOURCE", "distance")
    seen = []

    def gpu_config(pass_, q_len, k_len, head_dim, fp32_ieee=False, **kw):
        cfg = launch._gpu_config(pass_, max(16, launch._next_pow2(head_dim)), max(q_len, k_len) <= 64, False, False,
                                 arch, kw.get("varlen", False), kw.get("dropout", False), False, False)
        seen.append(cfg)
        return cfg

    monkeypatch.setattr(launch, "launch_config", gpu_config)
    real_tables, columns = launch._tables, []
    monkeypatch.setattr(launch, "_tables", lambda *a: columns.append(a[6] if len(a) > 6 else None) or real_tables(*a))
    real_gemm, built = launch._table_gemm, []

    def guarded(x, pos, keep_batch=True):
        t = real_gemm(x, pos, keep_batch)
        guard = 256 * t.shape[-1]  # rows of NaN: more than any tile
        buf = torch.full((t.numel() + 2 * guard,), float("nan"), dtype=t.dtype)
        buf[guard:-guard] = t.flatten()
        built.append(t)
        return buf[guard:-guard].view(t.shape)
    monkeypatch.setattr(launch, "_table_gemm", guarded)
    real_layout, tpads = launch._table_layout, []
    monkeypatch.setattr(launch, "_table_layout", lambda *a: tpads.append(real_layout(*a)[0]) or real_layout(*a))
    H, D = 2, 64
    if packed:
        lq, lk = [70, 3, 130], [20, 50, 30]
        cq, ck = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32) for n in (lq, lk))
        ts = [torch.randn(sum(lq), H, D)] + [torch.randn(sum(lk), H, D) for _ in range(2)]
        ts += [torch.randn(H, 8, D), torch.randn(H, 8, D)]
        kw = dict(position_buckets=4, max_relative_positions=8)
        do = torch.randn(sum(lq), H, D)

        def run(q, k, v, pk, pq):
            return disentangled_attention_varlen(q, k, v, pk, pq, cq, ck, max(lq), max(lk), backend="triton", **kw)

        def ref(q, k, v, pk, pq):
            outs = [disentangled_attention(q[cq[n]:cq[n + 1]].transpose(0, 1)[None],
                                           *[t[ck[n]:ck[n + 1]].transpose(0, 1)[None] for t in (k, v)], pk, pq,
                                           backend="torch", **kw)[0].transpose(0, 1) for n in range(len(lq))]
            return torch.cat(outs)
        got, want = grads(run, ts, torch.float32, do), grads(ref, ts, torch.float64, do)
    else:
        q, k, v, pk, pq, _, kw = make_inputs(2, H, L, Lk, D, buckets=buckets)
        mask = torch.rand(2, Lk) > 0.3
        mask[1] = False
        ts, do = (q, k, v, pk, pq), torch.randn(2, H, L, D)
        got = grads(triton_fn(mask, kw), ts, torch.float32, do)
        want = grads(reference_fn(mask, kw), ts, torch.float64, do)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dpos_key", "dpos_query"), got, want):
        assert_close_fp32(a, b, tol=2e-5, what=name)
    assert len(built) == 2 * len(columns)  # (C2P, P2C) per build
    assert all(torch.equal(a, b) for a, b in zip(built[:2], built[2:4]))  # the backward's tables: the forward's bits
    for c2p, p2c in zip(built[::2], built[1::2]):
        assert torch.isfinite(c2p).all()
        if packed:
            assert torch.isfinite(p2c).all() and not tpads
            continue
        rows, tpad = p2c.shape[-2], tpads[0]
        assert tpads == [tpad] * 2 and tpad >= 64 and tpad % 16 == 0  # forward, backward; a multiple of every tile
        assert rows == -(-Lk // tpad) * tpad and c2p.shape[-2] == -(-L // tpad) * tpad
        kept = torch.zeros(2, rows, dtype=torch.bool)
        kept[:, :Lk] = mask
        kept = kept[:, None, :, None].expand(p2c.shape)
        assert torch.isfinite(p2c[kept]).all() and (p2c[~kept] == float("-inf")).all()
    assert len(columns) >= 2 and all(c is not None for c in columns), "a pass built slot tables"  # fwd and bwd
    # one window for both passes: the backward's tables are the forward's GEMM, bit for bit
    assert all(torch.equal(c[1], columns[0][1]) for c in columns)
    fwd = seen[0]
    assert fwd != launch._INTERPRETER_CONFIG["fwd"] and (fwd.sat_block_n or 0) > fwd.block_n, fwd


def test_distance_window_covers_every_band_tile():
    """:func:`_dist_window` against a replay of the kernels' tile walks (``_tile_regions``; the forward's ``SAT_N``
    rounding; the backward's dq walk of key tiles and dK/dV walk of query tiles, one window for both): every distance
    of every band tile, rows and keys past the lengths included, lies in ``[dist0, dist1]``, both multiples of 16
    (the kernel's aligned tile loads), C2P's columns P2C's reversed, and its rows within the ``TPAD``-row blocks of
    ``DIST_KEYED``'s tables; random lengths (Lq far from Lk too), bucket
    configs and GPU tile shapes."""
    from deberta_fast._kernels.triton_attention_launch import LaunchConfig
    from deberta_fast.positions import attention_span

    g = torch.Generator().manual_seed(0)
    configs = [LaunchConfig(64, 64, 4, 2, 128), LaunchConfig(64, 32, 4, 3, 64), LaunchConfig(32, 64, 4, 3, 128),
               LaunchConfig(32, 32, 4, 2, 0), LaunchConfig(64, 16, 4, 3, 64)]
    bwd = [(LaunchConfig(32, 32, 4, 2), LaunchConfig(32, 32, 4, 1)), (LaunchConfig(16, 16, 4, 1), LaunchConfig(64, 64,
           4, 1)), (LaunchConfig(64, 64, 4, 1), LaunchConfig(16, 16, 4, 1))]

    def band_tiles(lo, hi, own, walk, own_len, walk_len, rows, sat=0):
        """(start of the program's block, start of a band tile) of one kernel's walk."""
        for s0 in range(0, own_len, own):
            if rows:
                a = min(max(s0 - hi + 1, 0) // walk * walk, walk_len)
                c = min(max(-(-max(s0 + own - 1 - lo, 0) // walk) * walk, a), walk_len)
            else:
                a = min(max(s0 + lo + 1, 0) // walk * walk, walk_len)
                c = min(max(-(-max(s0 + own - 1 + hi, 0) // walk) * walk, a), walk_len)
            if sat:
                a = a if a == walk_len else a // sat * sat
            for t0 in range(a, c, walk):
                yield (s0, t0) if rows else (t0, s0)

    for n in range(300):
        Lq, Lk = (int(x) for x in torch.randint(1, 700, (2,), generator=g))
        pb, mr = ((4, 8), (32, 64), (256, 512), (8, 256))[n % 4]
        lay = launch._layout(Lq, Lk, pb, mr, attention_span(pb, mr), torch.device("cpu"), True, False)

        class _Pr:  # what _dist_window reads
            band, table = lay.band, lay.table
        lo, hi = lay.band
        cfg = configs[n % len(configs)]
        dq, dkdv = bwd[n % len(bwd)]
        tpad = max(16, *(x for c in (cfg, dq, dkdv) for x in (c.block_m, c.block_n)))
        walks = [(cfg.block_m, cfg.block_n, band_tiles(lo, hi, cfg.block_m, cfg.block_n, Lq, Lk, True,
                                                       cfg.sat_block_n or cfg.block_n)),
                 (dq.block_m, dq.block_n, band_tiles(lo, hi, dq.block_m, dq.block_n, Lq, Lk, True)),
                 (dkdv.block_m, dkdv.block_n, band_tiles(lo, hi, dkdv.block_n, dkdv.block_m, Lk, Lq, False))]
        for cfgs, tiles in ((cfg,), walks[:1]), ((dq, dkdv), walks[1:]):
            d0, d1, c2p_rows, rows = launch._dist_window(_Pr, Lq, Lk, *cfgs)
            assert d0 % 16 == 0 and d1 % 16 == 0 and rows.shape == (d1 - d0 + 1,)
            assert torch.equal(c2p_rows, rows.flip(0))
            d = torch.arange(d0, d1 + 1).clamp(-(Lk - 1), Lq - 1)
            assert torch.equal(rows, lay.table.long()[d + Lk - 1])
            for bm, bn, walk in tiles:  # every element of a band tile (in range or not)
                for m0, k0 in walk:
                    assert d0 <= m0 - (k0 + bn - 1) and m0 + bm - 1 - k0 <= d1, (Lq, Lk, pb, mr, bm, bn, m0, k0, d0,
                                                                                 d1)
                    # DIST_KEYED's unpredicated loads: inside the (b, h) block of TPAD-padded rows (_dist_plan)
                    assert m0 + bm <= -(-Lq // tpad) * tpad and k0 + bn <= -(-Lk // tpad) * tpad, (Lq, Lk, m0, k0)


@pytest.mark.parametrize("scale", [-0.3, 0.0, 1e-46, 0.2])
def test_distance_tables_at_any_scale(monkeypatch, scale):
    """``DIST_KEYED`` multiplies P2C's -inf by the scale: at a scale <= 0, or one that is 0 in float32 (the kernels'
    -inf * 0 would be NaN on a GPU; the interpreter keeps it in float64), the launcher builds the same padded tables
    without the -inf and launches ``DIST_PREDICATED`` (``_dist_kwargs``), in both passes; output and five gradients
    against float64 with a key mask (a batch entry with every key masked) at each scale."""
    monkeypatch.setattr(launch, "REL_SOURCE", "distance")
    kinds, tables = [], []
    real = launch._dist_kwargs
    monkeypatch.setattr(launch, "_dist_kwargs", lambda kw, s: kinds.append(real(kw, s)["DIST"]) or real(kw, s))
    real_gemm = launch._table_gemm
    monkeypatch.setattr(launch, "_table_gemm", lambda *a: tables.append(real_gemm(*a)) or tables[-1])
    q, k, v, pk, pq, _, kw = make_inputs(2, 2, 37, 37, 16, buckets=BUCKETED)
    mask = torch.rand(2, 37) > 0.3
    mask[1] = False
    kw["scale"] = scale
    ts, do = (q, k, v, pk, pq), torch.randn(2, 2, 37, 16)
    got = grads(triton_fn(mask, kw), ts, torch.float32, do)
    want = grads(reference_fn(mask, kw), ts, torch.float64, do)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dpos_key", "dpos_query"), got, want):
        assert_close_fp32(a, b, tol=2e-5, what=name)
    keyed = launch.DIST_KEYED.value if scale > 1e-30 else launch.DIST_PREDICATED.value
    assert kinds == [keyed] * 3, kinds  # the forward, and the backward's two kernels
    assert len(tables) == 4 and all(t.shape[-2] % 32 == 0 for t in tables)  # padded blocks either way
    assert any(torch.isinf(t).any() for t in tables) == (keyed == launch.DIST_KEYED.value)
