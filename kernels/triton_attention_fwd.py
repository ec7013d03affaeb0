"""Triton forward kernel of disentangled attention (flash-style online softmax).

Grid ``(cdiv(Lq, BLOCK_M), B*H)``.  Inputs ``Q [B,H,Lq,D]``, ``K``/``V [B,H,Lk,D]`` (last dim
contiguous, other strides passed), ``C2P [B,H,Lq,NSLOT]`` / ``P2C [B,H,Lk,NSLOT]`` float32
(see :mod:`.triton_attention_common`), ``TABLE`` int32 ``[Lq+Lk-1]``.  Writes ``OUT [B,H,Lq,D]``
and the softmax statistics of the scaled masked log2-domain scores ``s2`` (without dropout), float32
``STATS [2,B,H,Lq]``, planes ``ROWMAX`` and ``LOGSUM`` (``_stat_planes``): ``ROWMAX = max_j s2`` and
``LOGSUM = log2 sum_j exp2(s2 - ROWMAX)`` (0 and +inf on a row with no key), with ``s2 = t + row_term``
(:func:`.triton_attention_common._rel_terms`).  The backward recomputes
``p = exp2((t - (ROWMAX - row_term)) - LOGSUM)``, the forward's own formula: kept apart, the two statistics lose
nothing at large scores, where a single log-sum-exp would round away the small ``LOGSUM``
(``lse = (ROWMAX + LOGSUM) * ln 2``).  Dropout multiplies the normalised probabilities by
``keep / (1 - p_drop)`` (a select per element; the ``1 / (1 - p_drop)`` once per row, on the output), the keep-mask
keyed by the int64 at ``SEED`` (on the device, read only with dropout: ``_dropout_seed``).  A program walks its
saturated key tiles (``SAT_N`` keys at a time), then those in the bucket band (``_tile_regions``, ``BLOCK_N`` keys);
with a mask, a program holding HF's uniform rows then walks the keys once more for them (``_uniform_out``: no
select per element in the loops).  ``KMASK``: the caller's key-padding mask ``[B, Lk]`` as given (nonzero = attend;
``_key_col``).  ``H`` is the launch's head count (the
grid's and the per-launch buffers'); a launcher running heads in groups passes views of its heads and ``H_ALL`` /
``H0``, the call's head count and the group's first head, which key the dropout stream (``b * H_ALL + H0 + h``).
``SKEW`` (the launcher's ``REL_SOURCE = "skew"`` experiment): no tables; ``C2P`` / ``P2C`` are the ``pos_key`` /
``pos_query`` rows the slot table indexes (strides ``s_pk*`` / ``s_pq*``), band tiles skew window products through
``SCR``, a float32 scratch of ``(BLOCK_M + BLOCK_N) * WIN`` per program (:func:`_skew_terms`).  ``DIST`` (the
``REL_SOURCE = "distance"`` experiment, in the backward kernels too): ``NSLOT`` columns, one per distance of
``[dist0, dist1]`` (``NSLOT1 = NSLOT - 1``; :func:`.triton_attention_common._rel_terms`), ``DIST_PREDICATED`` or
``DIST_KEYED`` (padded tables in blocks of a multiple of ``TPAD`` rows, P2C carrying the masked keys' -inf).
``TMA`` (the launcher's ``DEBERTA_FAST_TRITON_TMA=1`` experiment): ``Q`` and the saturated loop's ``K`` / ``V`` tiles
through tensor descriptors (``_rows_desc``: TMA loads on sm_90; 16-byte aligned bases and row strides).

``VARLEN``: packed sequences; grid ``(cdiv(max_seqlen_q, BLOCK_M), N*H)``, ``Q [Tq,H,D]``,
``K``/``V [Tk,H,D]`` (batch strides 0), ``C2P [H,Tq,NSLOT]``, ``P2C [H,Tk,NSLOT]``, ``TABLE``
``[max_seqlen_q+max_seqlen_k-1]``, ``OUT [Tq,H,D]``, ``STATS [2,H,Tq]``; ``Lq``/``Lk`` are the totals,
``CU_Q``/``CU_K`` int32 ``[N+1]``; programs past the end of their sequence return at once.
"""
import triton
import triton.language as tl

from .triton_attention_common import (GENERAL, LOG2E, SAT, _dropout_keep, _dropout_seed, _kept, _key_col,
                                      _masked, _mm, _rel_terms, _rows_desc, _sat_columns, _score_mm, _sequence,
                                      _table_block, _stat_planes, _tile, _tile_regions, _tile_start, _uniform_rows,
                                      _block_tile)


@triton.jit
def _skew_terms(col, q, k, C2P, P2C, s_pkr, s_pqr, TABLE, SCR, start_m, start_n, offs_m, offs_n, offs_d, d_ok,
                Lq, Lk, qk_scale, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, UPCAST: tl.constexpr,
                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIN: tl.constexpr):
    """``(key_term, row_term)`` of one band tile without tables (the ``SKEW`` experiment; :func:`_rel_terms`'
    formulas): the tile spans the ``BLOCK_M + BLOCK_N - 1`` distances ``d = start_m - start_n - (BLOCK_N - 1) + w``;
    their position rows (``C2P`` / ``P2C`` are then ``pos_key`` / ``pos_query`` rows of one ``(b, h)``, row stride
    ``s_pkr`` / ``s_pqr``) times the tile's queries / keys on tensor cores (``[BLOCK_M, WIN]`` / ``[BLOCK_N, WIN]``,
    float32) go to the program's scratch ``SCR``; after a barrier each element reads its two values back on its
    diagonal ``w = r - c + BLOCK_N - 1`` (the skew)."""
    w = tl.arange(0, WIN)
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    t = tl.minimum(tl.maximum(start_m - start_n - (BLOCK_N - 1) + w + Lk - 1, 0), Lq + Lk - 2)
    slots = tl.load(TABLE + t)
    widx = r[:, None] - c[None, :] + (BLOCK_N - 1)
    kt, rt = tl.broadcast(col[None, :], tl.zeros([BLOCK_M, 1], dtype=tl.float32))
    tl.debug_barrier()  # the previous tile's reads of the scratch are done
    # one product at a time (its accumulator dead before the next): fewer live registers
    if HAS_C2P:
        kr = tl.load(C2P + slots[:, None] * s_pkr + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        tl.store(SCR + r[:, None] * WIN + w[None, :], _mm(q, tl.trans(kr), UPCAST, PREC))
        tl.debug_barrier()
        rt = tl.load(SCR + r[:, None] * WIN + widx) * qk_scale
    if HAS_P2C:
        qr = tl.load(P2C + slots[:, None] * s_pqr + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        tl.store(SCR + BLOCK_M * WIN + c[:, None] * WIN + w[None, :], _mm(k, tl.trans(qr), UPCAST, PREC))
        tl.debug_barrier()
        kt = tl.fma(tl.load(SCR + BLOCK_M * WIN + c[None, :] * WIN + widx), qk_scale, kt)
    return kt, rt


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, K_bh, V_bh, C2P_bh, P2C_bh, TABLE, KMASK, FMASK, offs_m, offs_d, d_ok,
               lo, hi, a, c, b, h, bh, Lq, Lk, NSLOT, qk_scale, inv_keep, drop_thresh, seed,
               s_kn, s_vn, s_kmb, s_fmb, s_fmh, s_fmm, skew, dist, descs,
               HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
               REGION: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
               SKEW: tl.constexpr, WIN: tl.constexpr, DIST: tl.constexpr, TMA: tl.constexpr,
               RSUM: tl.constexpr = False):
    """Online softmax over key tiles of one kind.  ``GENERAL``: the tiles ``[lo, hi)``.  ``SAT``: both saturated
    ranges of ``_tile_regions`` in one loop (one loop per range would give each its own shared-memory pipeline
    buffers): ``[0, a)`` (slot ``NSLOT-1``) then ``[c, Lk)`` (slot 0), over ``[lo, hi) = [0, a + Lk - c)``.
    ``m_i`` is the max of the scores ``t + row_term`` (:func:`_rel_terms`); probabilities are
    ``exp2(t - (m - row_term))``: on saturated tiles, one subtraction per row.  ``SKEW``: no tables (``skew`` =
    ``(s_pkr, s_pqr, SCR, start_m, rt_lo, rt_hi)``): band tiles by :func:`_skew_terms`, saturated ones from per-row
    terms computed once per program and one position row per key tile.  ``dist = (dist0, dist1, NSLOT - 1, col_lo,
    col_hi)``: the ``DIST`` experiment's window (:func:`_rel_terms`) and P2C's columns of the two saturated slots (else
    ``(0, 0, 0, 0, NSLOT - 1)``).  ``TMA``: the ``SAT`` loop reads its K / V tiles through ``descs``' tensor
    descriptors (``BLOCK_N`` rows each).  ``RSUM`` (16-bit inputs without dropout): ``l_i`` is ``[BLOCK_M, 16]``,
    every column the rows' sum of ``p`` as rounded for the ``P V`` product (so that the output's weights sum to 1),
    from a product with a tile of ones instead of a float add per element; else ``[BLOCK_M]``, the float32 sums of
    ``p`` before the keep mask."""
    dist0, dist1, nslot1, col_lo, col_hi = dist
    for it in range(lo, hi, BLOCK_N):
        if REGION == SAT:
            start_n = tl.where(it < a, it, it - a + c)
            slot = tl.where(it < a, col_hi, col_lo)
        else:
            start_n = _tile_start(it, BLOCK_N, DIST)
            slot = 0
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n < Lk)[:, None] & d_ok[None, :]
        if TMA and REGION == SAT:
            k = descs[0].load([start_n, 0])
        else:
            k = _block_tile(K_bh, offs_n, s_kn, offs_d, kv_ok)
        s = _score_mm(q, tl.trans(k), UPCAST, PREC)
        col = _key_col(KMASK, b, offs_n, Lk, s_kmb, MASK_KIND)
        if not SKEW:
            kt, rt = _rel_terms(col, C2P_bh, P2C_bh, TABLE, slot, offs_m, offs_n, Lq, Lk, NSLOT, qk_scale,
                                HAS_C2P, HAS_P2C, REGION, False, (dist0, dist1, nslot1), DIST,
                                UPCAST, False)  # (tl.load: the 2- and 3-stage loops prefetch the gathers)
        elif REGION == SAT:
            s_pkr, s_pqr, SCR, start_m, rt_lo, rt_hi = skew
            kt = col
            if HAS_P2C:  # the keys' term at the tile's slot: one position row, on tensor cores (column 0 of 16)
                prow = tl.load(P2C_bh + slot * s_pqr + offs_d, mask=d_ok, other=0.0)
                pm = tl.where(tl.arange(0, 16)[None, :] == 0, prow[:, None], 0.0).to(k.dtype)
                kt = tl.fma(tl.sum(_mm(k, pm, UPCAST, PREC), 1), qk_scale, col)
            rt = tl.where(it < a, rt_hi, rt_lo)
        else:
            s_pkr, s_pqr, SCR, start_m, rt_lo, rt_hi = skew
            kt, rt = _skew_terms(col, q, k, C2P_bh, P2C_bh, s_pkr, s_pqr, TABLE, SCR, start_m, start_n, offs_m, offs_n,
                                 offs_d, d_ok, Lq, Lk, qk_scale, HAS_C2P, HAS_P2C, UPCAST, PREC, offs_m.shape[0],
                                 BLOCK_N, WIN)
        if REGION == SAT:
            t = tl.fma(s, qk_scale, kt[None, :])
        else:
            t = tl.fma(s, qk_scale, kt)
        t = _masked(t, b, h, offs_m, offs_n, FMASK, s_fmb, s_fmh, s_fmm, MASK_KIND, False)
        if REGION == SAT:
            m_new = tl.maximum(m_i, tl.max(t, 1) + rt)
        else:
            m_new = tl.maximum(m_i, tl.max(t + rt, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        if REGION == SAT:
            p = tl.exp2(t - (m_use - rt)[:, None])
        else:
            p = tl.exp2(t - (m_use[:, None] - rt))
        alpha = tl.exp2(m_i - m_use)
        if RSUM:  # the rows' sums of p as the P V product rounds it, on tensor cores: an n-tile of ones
            pv = p.to(V_bh.dtype.element_ty)
            l_i = _mm(pv, tl.full([BLOCK_N, 16], 1.0, tl.float32).to(pv.dtype), UPCAST, PREC, l_i * alpha[:, None])
        else:
            l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # (the kept probabilities' 1 / (1 - p): once, on the output)
            keep = _dropout_keep(seed, bh, offs_m, start_n, drop_thresh, BLOCK_N, False)
            p = _kept(p, keep, UPCAST)
        if TMA and REGION == SAT:
            v = descs[1].load([start_n, 0])
        else:
            v = _block_tile(V_bh, offs_n, s_vn, offs_d, kv_ok)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, UPCAST, PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _uniform_out(V_bh, offs_m, offs_d, d_ok, Lk, s_vn, bh, inv_keep, drop_thresh, seed, DROPOUT: tl.constexpr,
                 UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """The output of a uniform row (every in-range key scores 0): ``sum_j keep_ij v_j / ((1 - p) Lk)``, with the
    keep mask and rounding of :func:`_fwd_tiles` (its probability there is 1, its statistics ``ROWMAX`` 0 and
    ``LOGSUM`` ``log2 Lk``); float32 ``[BLOCK_M, BLOCK_D]``.  Only programs holding a uniform row run it."""
    acc = tl.zeros([offs_m.shape[0], offs_d.shape[0]], dtype=tl.float32)
    vsum = tl.zeros([offs_d.shape[0]], dtype=tl.float32)
    for start_n in tl.range(0, Lk, BLOCK_N, num_stages=1):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        v = _block_tile(V_bh, offs_n, s_vn, offs_d, n_ok[:, None] & d_ok[None, :])
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, start_n, drop_thresh, BLOCK_N, False)
            p = tl.where(keep & n_ok[None, :], 1.0, 0.0)
            acc += _mm(p.to(v.dtype), v, UPCAST, PREC)
        else:
            vsum += tl.sum(v.to(tl.float32), 0)
    if not DROPOUT:
        acc += vsum[None, :]
    if DROPOUT:
        return acc * (inv_keep / Lk.to(tl.float32))
    return acc / Lk.to(tl.float32)


# a fresh seed / rate per call, or another head group, must not recompile
@triton.jit(do_not_specialize=["SEED", "drop_thresh", "H0"])
def disentangled_fwd_kernel(
    Q, K, V, C2P, P2C, TABLE, CU_Q, CU_K, KMASK, FMASK, UNI, OUT, STATS, SCR,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
    s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh, s_pkb, s_pkh, s_pkr, s_pqb, s_pqh, s_pqr,
    H, H_ALL, H0, Lq, Lk, MAXQ, MAXK, D, NSLOT, scale, band_lo, band_hi, p_drop, drop_thresh, SEED,
    dist0, dist1, NSLOT1,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SAT_N: tl.constexpr,
    SKEW: tl.constexpr = False, WIN: tl.constexpr = 1, DIST: tl.constexpr = 0, TPAD: tl.constexpr = 16,
    TMA: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    ROWMAX, LOGSUM = _stat_planes(STATS, Lq, H_ALL, VARLEN)
    q0, Lq, k0, Lk, qrow0, krow0, toff = _sequence(CU_Q, CU_K, bh, H, Lq, Lk, MAXQ, MAXK, VARLEN)
    bh = b * H_ALL + H0 + h  # the dropout stream's (b, h): global when the launcher runs heads in groups
    TABLE = TABLE + toff
    start_m = pid_m * BLOCK_M
    if start_m >= Lq:  # packed: this sequence is shorter than the longest one
        return
    seed = _dropout_seed(SEED, DROPOUT)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Lq
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    K_bh = K + b64 * s_kb + h64 * s_kh + k0.to(tl.int64) * s_kn
    V_bh = V + b64 * s_vb + h64 * s_vh + k0.to(tl.int64) * s_vn
    if TMA:  # Q and the saturated loop's K / V tiles through tensor descriptors (TMA loads on sm_90)
        Q_bh = Q + b64 * s_qb + h64 * s_qh + q0.to(tl.int64) * s_qm
        q = _rows_desc(Q_bh, Lq, D, s_qm, BLOCK_M, BLOCK_D).load([start_m, 0])
    else:
        q = _tile(Q + b64 * s_qb + h64 * s_qh, q0 + offs_m, s_qm, offs_d, m_ok[:, None] & d_ok[None, :])
    qk_scale = scale * LOG2E
    if SKEW:  # C2P / P2C: pos_key / pos_query rows (the slot table's first row on), strides s_pk* / s_pq*
        C2P_bh = C2P + b64 * s_pkb + h64 * s_pkh
        P2C_bh = P2C + b64 * s_pqb + h64 * s_pqh
        SCR_p = SCR + (tl.program_id(1).to(tl.int64) * tl.num_programs(0) + pid_m) * ((BLOCK_M + BLOCK_N) * WIN)
        # the rows' terms at the saturated slots (NSLOT - 1: far behind, 0: far ahead)
        rt_lo = tl.zeros([BLOCK_M], dtype=tl.float32)
        rt_hi = rt_lo
        if HAS_C2P:
            qf = q.to(tl.float32)
            row = tl.load(C2P_bh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            rt_lo = tl.sum(qf * row[None, :], 1) * qk_scale
            row = tl.load(C2P_bh + (NSLOT - 1) * s_pkr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            rt_hi = tl.sum(qf * row[None, :], 1) * qk_scale
        skew = (s_pkr, s_pqr, SCR_p, start_m, rt_lo, rt_hi)
    else:
        C2P_bh = _table_block(C2P, qrow0, Lq, NSLOT, DIST, VARLEN, TPAD)
        P2C_bh = _table_block(P2C, krow0, Lk, NSLOT, DIST, VARLEN, TPAD)
        skew = (0, 0, SCR, start_m, m_ok, m_ok)
    inv_keep = 1.0 / (1.0 - p_drop)
    col_lo, col_hi, win = _sat_columns(band_lo, band_hi, NSLOT, dist0, dist1, NSLOT1, DIST)
    d0, d1, n1 = win  # (flat: nested tuple targets break triton's dependency finder)
    dist = (d0, d1, n1, col_lo, col_hi)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # the rows' sums on tensor cores (_fwd_tiles' RSUM): with dropout they are of p before the keep mask (a float add
    # per element), and float32 inputs have no tensor-core product to ride
    RSUM: tl.constexpr = (not DROPOUT) and V.dtype.element_ty != tl.float32
    if RSUM:
        l_i = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    else:
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if TMA:  # (made here, not with Q's: the inference forward then kept 4 B in local memory, static profile)
        descs = (_rows_desc(K_bh, Lk, D, s_kn, SAT_N, BLOCK_D), _rows_desc(V_bh, Lk, D, s_vn, SAT_N, BLOCK_D))
    else:
        descs = (K_bh, V_bh)
    # uniform rows (HF's fully masked rows) are not special in the loops (no select per element): they get
    # whatever the masked scores give there, and their output from _uniform_out below
    args = (q, K_bh, V_bh, C2P_bh, P2C_bh, TABLE, KMASK, FMASK, offs_m, offs_d, d_ok)
    rest = (b, h, bh, Lq, Lk, NSLOT, qk_scale, inv_keep, drop_thresh, seed, s_kn, s_vn, s_kmb, s_fmb, s_fmh, s_fmm,
            skew, dist, descs)
    if HAS_C2P | HAS_P2C:
        # key tiles far behind the query tile (slot NSLOT-1) and far ahead (slot 0), then those in the band
        # (in SAT_N-key tiles, a multiple of BLOCK_N: the saturated BLOCK_N-tiles below the band that do not fill
        # one are left to the band loop, which computes any tile; above the band, [c, Lk) is saturated whatever
        # the step)
        a, c = _tile_regions(start_m, BLOCK_M, band_lo, band_hi, Lk, BLOCK_N, True)
        if DIST:  # every key beyond the band (a == Lk): the saturated loop takes them all, its last tile partial
            a = tl.where(a == Lk, a, (a // SAT_N) * SAT_N)  # (the band loop's distances stay in _dist_window's)
        else:
            a = (a // SAT_N) * SAT_N
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, *args, 0, a + Lk - c, a, c, *rest, HAS_C2P, HAS_P2C, MASK_KIND,
                                   DROPOUT, SAT, UPCAST, PREC, SAT_N, SKEW, WIN, DIST, TMA, RSUM)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, *args, a, c, a, c, *rest, HAS_C2P, HAS_P2C, MASK_KIND, DROPOUT,
                                   GENERAL, UPCAST, PREC, BLOCK_N, SKEW, WIN, DIST, TMA, RSUM)
    else:  # no relative terms: the SAT path has nothing to add but the key term
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, *args, 0, Lk, Lk, Lk, *rest, HAS_C2P, HAS_P2C, MASK_KIND, DROPOUT,
                                   SAT, UPCAST, PREC, SAT_N, SKEW, WIN, DIST, TMA, RSUM)

    # read here, not before the loops: kept live through them (or a branch around them skipping the tiles of
    # padded rows only) made the sm_8x training forward spill 16-24 B
    if RSUM:
        l_i = tl.max(l_i, 1)  # (its columns are equal)
    uni = _uniform_rows(UNI, b, h, offs_m, Lq, s_unb, s_unh, MASK_KIND)
    n_uni = tl.sum(uni.to(tl.int32), 0)
    empty = l_i == 0.0  # no key in range (a packed sequence without keys)
    if DROPOUT:  # the kept probabilities' 1 / (1 - p) (_fwd_tiles)
        out = acc * (inv_keep / tl.where(empty, 1.0, l_i))[:, None]
    else:
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
    O_bh = OUT + b64 * s_ob + h64 * s_oh
    ok = m_ok & (uni == 0)  # uniform rows: stored below, by other threads maybe: no location is stored twice
    tl.store(ROWMAX + qrow0 + offs_m, tl.where(empty, 0.0, m_i), mask=ok)
    tl.store(LOGSUM + qrow0 + offs_m, tl.where(empty, float("inf"), tl.log2(tl.where(empty, 1.0, l_i))), mask=ok)
    tl.store(O_bh + (q0 + offs_m).to(tl.int64)[:, None] * s_om + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=ok[:, None] & d_ok[None, :])
    if MASK_KIND != 0:
        if n_uni != 0:  # after the stores: nothing of the loops stays live through this pass
            u_out = _uniform_out(V_bh, offs_m, offs_d, d_ok, Lk, s_vn, bh, inv_keep, drop_thresh, seed, DROPOUT,
                                 UPCAST, PREC, BLOCK_N)
            ok = m_ok & uni
            tl.store(ROWMAX + qrow0 + offs_m, tl.zeros([BLOCK_M], dtype=tl.float32), mask=ok)
            tl.store(LOGSUM + qrow0 + offs_m, tl.zeros([BLOCK_M], dtype=tl.float32) + tl.log2(Lk.to(tl.float32)),
                     mask=ok)
            tl.store(O_bh + (q0 + offs_m).to(tl.int64)[:, None] * s_om + offs_d[None, :],
                     u_out.to(OUT.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])
