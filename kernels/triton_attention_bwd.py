"""Triton backward kernels of disentangled attention (flash-attention-2 structure, no atomics).

Both kernels recompute ``P = exp2((t - (ROWMAX - row_term)) - LOGSUM)`` (as the forward: see
``_rel_terms``) tile by tile, walking saturated, inner, in-band (with an end run) and saturated tiles in loops of
their own (``_tile_regions``, ``_inner_tiles``), from the forward's statistics ``STATS`` (exact at any score
magnitude; 0 on rows with no key, and on HF's uniform rows, whose scores are constants: their ``LOGSUM`` is taken
as +inf, and the dK/dV kernel adds their dV in a pass of its own, ``_uniform_dv``) and the dropout keep-mask from the
seed at ``SEED`` (int64 ``[1]`` on the device, read only with dropout: ``_dropout_seed``), and form
``dS = scale * P * (dP - DELTA)`` with ``DELTA = rowsum(dO * O)`` float32 ``[2,B,H,Lq]`` (plane 0; packed
``[H,Tq]``) and ``dP = keep/(1-p) * dO V^T``.  The dq kernel computes ``DELTA`` from its rows' ``dO`` and ``O`` tiles
(``O``: strides ``s_y*``) and stores it, and with a mask its ``LOGSUM`` with +inf on the uniform rows (plane 1, so
that the dK/dV kernel loads no flags per query tile); the launcher runs it first, and the dK/dV kernel reads both.
With ``KEEP_BITS`` (dropout; the launcher's ``DROPOUT_BITS``) the dq kernel also stores its dropout decisions, a byte
per Philox call (``KEEP``: int8 rows of ``LW`` bytes, ``RH`` per block, ``_keep_block``; ``_store_keep_bytes``), and
the dK/dV kernel reads them (``_keep_bytes``) instead of drawing them in its transposed tile, whose lanes hold a
call's 8 elements two by two.

* :func:`disentangled_bwd_dkdv_kernel`, grid ``(cdiv(Lk, BLOCK_N), B*H)``, after the dq kernel: ``DK = dS^T Q``
  (content part, ``[B,H,Lk,D]``), ``DV = P_drop^T dO``, and, with p2c, the
  column sums of ``dS`` per run, ``PSUM`` float32 ``[B,H,Lk16,RS1+1]`` (``Lk16``: ``Lk`` rounded up to 16).
* :func:`disentangled_bwd_dq_kernel`, grid ``(cdiv(Lq, BLOCK_M), B*H)``: ``DELTA``, ``DQ = dS K``
  (content part, ``[B,H,Lq,D]``) and, with c2p, the row sums per run, ``CSUM`` float32
  ``[B,H,Lq16,RS1+1]`` (the runs' columns of rows within the lengths written once, nothing else: padded;
  zero-filled by the launcher: packed, where tokens of no sequence have no program).  Column layout:
  :func:`.triton_attention_common._advance_runs` (the launcher's ``_sums_layout``).

The runs (``_advance_runs``, :func:`deberta_fast.positions.distance_runs`: one per distance inside the band, one
per constant end of the slot table) map onto position rows (``RUNROW``); each program adds its rows' relative share
``sums @ POS[RUNROW]`` to dQ / dK itself once its sums are stored (:func:`_run_products`; ``RUN_PRODUCTS`` False:
the launcher's ``REL_SHARE = "host"`` experiment, the host adds it), and the host turns the sums into the position
gradients (a reduction over rows: small GEMMs).  ``DQ`` / ``DK`` / ``DV`` are of the inputs' dtype (the stores
round once; float32 where the host adds a share).  Every output location has one writer:
deterministic.

``VARLEN``: packed sequences (layouts as in the forward kernel; grids over the longest
sequence's blocks and ``N*H``): ``STATS [2,H,Tq]``, ``DELTA [H,Tq]``, ``CSUM [H,Tq,RS1+1]``, ``PSUM
[H,Tk,RS1+1]`` (float32, zero-filled by the launcher), and ``DQ [Tq,H,D]``, ``DK``/``DV [Tk,H,D]`` as the inputs
(head stride ``s_gh``, token stride ``s_gm``; tokens of no sequence: the launcher's zero fill).
"""
import triton
import triton.language as tl

from .triton_attention_common import (GENERAL, INNER, LOG2E, SAT, _advance_runs, _dropout_keep, _dropout_seed,
                                      _keep_block, _keep_bytes, _keep_calls, _keep_tile, _store_keep_bytes,
                                      _inner_tiles, _k_axis, _kept, _key_col, _masked, _mm, _q_axis, _rel_terms,
                                      _rounded, _score_mm, _sequence, _stat_planes,
                                      _finish_runs, _sat_columns, _table_block, _tile, _tile_regions,
                                      _tile_start, _uniform_rows, _block_tile)


@triton.jit
def _probs_and_ds(q, k, v, do, rowmax, logsum, dsc, C2P_bh, P2C_bh, TABLE, slot, offs_m,
                  offs_n, start_n, b, h, bh, Lq, Lk, NSLOT, qk_scale, dp_scale, drop_thresh, seed,
                  col, FMASK, s_fmb, s_fmh, s_fmm, dist, KEEP, LW, start_m,
                  HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                  REGION: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
                  TRANS: tl.constexpr, DIST: tl.constexpr, KEEP_BITS: tl.constexpr):
    """Recompute one tile: returns ``(pd, ds)``, ``[BLOCK_M, BLOCK_N]`` (``[BLOCK_N, BLOCK_M]`` if ``TRANS``):
    ``pd`` the kept probabilities (not yet times ``1 / (1 - p_drop)``), ``ds`` already times ``scale``, from the rows'
    ``dsc = DELTA * scale`` and ``dp_scale = scale / (1 - p_drop)`` (``scale`` without dropout).  ``REGION``:
    ``SAT`` (slot ``slot``; see ``_tile_regions``) or a per-element one (``_rel_terms``; ``dist``, ``DIST``: its
    distance tables).
    Probabilities are ``exp2((t - (ROWMAX - row_term)) - LOGSUM)``, as the forward computes them
    (:func:`_rel_terms`; ``col``: the keys' :func:`_key_col`).  No select for the matrix's edges: keys out of range
    score -inf (``col``), the callers load a ``logsum`` of +inf for rows out of range and for uniform rows, whose
    scores are constants (no gradient; their dV: :func:`_uniform_dv`), so ``p`` is 0 there, and so are ``dp`` and
    ``ds``."""
    if TRANS:
        s = _score_mm(k, tl.trans(q), UPCAST, PREC)
    else:
        s = _score_mm(q, tl.trans(k), UPCAST, PREC)
    kt, rt = _rel_terms(col, C2P_bh, P2C_bh, TABLE, slot, offs_m, offs_n, Lq, Lk, NSLOT, qk_scale,
                        HAS_C2P, HAS_P2C, REGION, TRANS, dist, DIST, UPCAST, q.dtype != tl.float32)
    if REGION == SAT:
        t = _masked(tl.fma(s, qk_scale, _k_axis(kt, TRANS)), b, h, offs_m, offs_n, FMASK,
                    s_fmb, s_fmh, s_fmm, MASK_KIND, TRANS)
        p = tl.exp2((t - _q_axis(rowmax - rt, TRANS)) - _q_axis(logsum, TRANS))
    else:
        t = _masked(tl.fma(s, qk_scale, kt), b, h, offs_m, offs_n, FMASK, s_fmb, s_fmh, s_fmm, MASK_KIND,
                    TRANS)
        p = tl.exp2((t - (_q_axis(rowmax, TRANS) - rt)) - _q_axis(logsum, TRANS))
    if TRANS:
        dp = _mm(v, tl.trans(do), UPCAST, PREC)
    else:
        dp = _mm(do, tl.trans(v), UPCAST, PREC)
    # ds = p * (keep / (1 - p_drop) * dp - delta) * scale as one fma and a product: ``dsc`` is ``delta * scale``,
    # ``dp_scale`` ``scale / (1 - p_drop)`` (``scale`` without dropout); pd leaves ``1 / (1 - p_drop)`` to the dK/dV
    # kernel's dV (once, before its store): with dropout a select per element, no product
    dsc = _q_axis(dsc, TRANS)
    if DROPOUT:
        if KEEP_BITS and TRANS:  # the dq kernel's decisions (KEEP: this program's block of its bytes)
            keep = _keep_bytes(KEEP, offs_n, offs_m, start_m, Lq, Lk, LW)
        elif KEEP_BITS:  # dq: also stored for the dK/dV kernel, launched next
            calls = _keep_calls(seed, bh, offs_m, start_n, drop_thresh, BLOCK_N)
            _store_keep_bytes(KEEP, calls, offs_m, start_n, LW, UPCAST)
            keep = _keep_tile(calls)
        else:
            keep = _dropout_keep(seed, bh, offs_m, start_n, drop_thresh, BLOCK_N, TRANS)
        pd = _kept(p, keep, UPCAST)
        ds = p * tl.where(keep, tl.fma(dp, dp_scale, -dsc), -dsc)
    else:
        pd = p
        ds = p * tl.fma(dp, dp_scale, -dsc)
    return pd, ds


@triton.jit
def _uniform_dv(dv, DO_bh, UNI, b, h, bh, offs_n, n_ok, offs_d, d_ok, start_n, Lq, Lk, s_om, s_unb, s_unh,
                drop_thresh, seed, KEEP, LW, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEEP_BITS: tl.constexpr):
    """Add the uniform rows' share to ``dv [BLOCK_N, BLOCK_D]`` (keys ``offs_n``): a uniform row's probability is
    ``1 / Lk`` on every in-range key (times ``keep``; the kernel rescales by ``1 / (1 - p)`` after); the score loops
    gave it 0.  Query tiles without a uniform row cost one load of their flags."""
    for start_m in tl.range(0, Lq, BLOCK_M, num_stages=1):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        uni = _uniform_rows(UNI, b, h, offs_m, Lq, s_unb, s_unh, MASK_KIND)
        if tl.max(uni.to(tl.int32), 0) != 0:
            do = _block_tile(DO_bh, offs_m, s_om, offs_d, (offs_m < Lq)[:, None] & d_ok[None, :])
            w = n_ok[:, None] & uni[None, :]
            if DROPOUT and KEEP_BITS:
                w = w & _keep_bytes(KEEP, offs_n, offs_m, start_m, Lq, Lk, LW)
            elif DROPOUT:
                w = w & _dropout_keep(seed, bh, offs_m, start_n, drop_thresh, BLOCK_N, True)
            pd = tl.where(w, 1.0 / Lk.to(tl.float32), 0.0)
            dv += _mm(pd.to(do.dtype), do, UPCAST, PREC)
    return dv


@triton.jit
def _dkdv_tiles(dk, dv, run_lo, run_hi, k, v, Q_bh, DO_bh, ROWMAX, LOGSUM, DELTA, C2P_bh, P2C_bh, TABLE,
                PSUM_bh, col, FMASK, offs_n, offs_d, d_ok, rows, cc, lo, hi, skip_a, skip_b, slot, run0, qrow0, start_n,
                b, h, bh, Lq, Lk, NSLOT, NRUN,
                qk_scale, scale, dp_scale, drop_thresh, seed, s_qm, s_om, s_fmb, s_fmh, s_fmm, dist, KEEP, LW,
                HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                REGION: tl.constexpr, HI: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIST: tl.constexpr, KEEP_BITS: tl.constexpr):
    """dK, dV and the p2c run sums over the query tiles ``[lo, hi)`` of one region (``_tile_regions``,
    ``_inner_tiles``; tile indices from ``skip_a`` on are moved to ``skip_b``: the in-band tiles on both sides of the
    inner ones in one loop), on the transposed tile (keys as rows, as in the dK/dV loop of flash attention 2): dV and
    dK take it without a transpose, and the p2c column sums become row sums.  ``HI``: a ``SAT`` region's end run
    (:func:`_advance_runs`)."""
    for it in range(lo, hi, BLOCK_M):
        start_m = _tile_start(tl.where(it < skip_a, it, it - skip_a + skip_b), BLOCK_M, DIST or HAS_P2C)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Lq
        qo_ok = m_ok[:, None] & d_ok[None, :]
        q = _block_tile(Q_bh, offs_m, s_qm, offs_d, qo_ok)
        do = _block_tile(DO_bh, offs_m, s_om, offs_d, qo_ok)
        rowmax = tl.load(ROWMAX + qrow0 + offs_m, mask=m_ok, other=0.0)
        logsum = tl.load(LOGSUM + qrow0 + offs_m, mask=m_ok, other=float("inf"))
        dsc = tl.load(DELTA + qrow0 + offs_m, mask=m_ok, other=0.0) * scale
        # (with a mask, LOGSUM is the dq kernel's copy, +inf on HF's uniform rows: probability 0 here, _uniform_dv
        # adds their dV; no flag loads per query tile)
        pd, ds = _probs_and_ds(q, k, v, do, rowmax, logsum, dsc, C2P_bh, P2C_bh, TABLE, slot,
                               offs_m, offs_n, start_n, b, h, bh, Lq, Lk, NSLOT, qk_scale, dp_scale, drop_thresh,
                               seed, col, FMASK, s_fmb, s_fmh, s_fmm, dist, KEEP, LW, start_m,
                               HAS_C2P, HAS_P2C, MASK_KIND, DROPOUT, REGION, UPCAST, PREC, BLOCK_N, True, DIST,
                               KEEP_BITS)
        dv += _mm(pd.to(do.dtype), do, UPCAST, PREC)
        dk += _mm(ds.to(q.dtype), q, UPCAST, PREC)
        if HAS_P2C:
            run_lo, run_hi = _advance_runs(ds, run_lo, run_hi, offs_m, offs_n, Lq, Lk, PSUM_bh, rows, cc, run0, NRUN,
                                           REGION, HI, True)
    return dk, dv, run_lo, run_hi


@triton.jit
def _grad_rows(row0, t0, h64, offs, offs_d, D, s_gh, s_gm, VARLEN: tl.constexpr):
    """Offsets of a program's gradient rows ``offs`` (``[BLOCK, BLOCK_D]``): padded, rows of ``D`` in ``[B, H, L, D]``
    from the block's first row ``row0``; packed, the inputs' ``[T, H, D]`` (head stride ``s_gh``, token stride
    ``s_gm``; the sequence's first token ``t0``), int64."""
    if VARLEN:
        return h64 * s_gh + (t0 + offs).to(tl.int64)[:, None] * s_gm + offs_d[None, :]
    else:
        return (row0 + offs)[:, None] * D + offs_d[None, :]


#: Runs per product of :func:`_run_products` (each a ``[rows, RUN_CHUNK] x [RUN_CHUNK, BLOCK_D]`` MMA)
RUN_CHUNK = tl.constexpr(32)


@triton.jit
def _sums_block(SUMS, SUMS_bh, L, RS1, VARLEN: tl.constexpr):
    """``SUMS_bh`` (:func:`_table_block`'s padded run-sum block) computed again for :func:`_run_products` in another
    form (the block's first row in int32: ``B * H * L16 < 2**31`` rows, or the inputs alone would not fit in
    memory), so that the compiler does not keep the 64-bit one live through the loops: under triton 3.6.0 that value
    spilled 4 B in the sm_90 dq kernel at a ragged length.  Packed: ``SUMS_bh`` as it is."""
    if VARLEN:
        return SUMS_bh
    else:
        return SUMS + (tl.program_id(1) * ((L + 15) // 16 * 16)).to(tl.int64) * (RS1 + 1)


@triton.jit
def _run_products(acc, SUMS, POS, RUNROW, idx, last, RS1, d_lo, d_hi, k0, sgn, run0, NRUN, H, s_pb, s_ph, s_pr,
                  offs_d, d_ok, UPCAST: tl.constexpr, PREC: tl.constexpr, RC: tl.constexpr):
    """``acc [BLOCK, BLOCK_D] + sums @ POS[RUNROW[r]]`` over the runs ``r`` of the program's distances
    ``[d_lo, d_hi]`` (``clamp(d + run0, 0, NRUN - 1)``), ``RC`` runs per product: the relative share of dQ (c2p:
    the run sums of rows ``idx``, ``pos_key``'s rows) or of dK (p2c: of keys ``idx``, ``pos_query``'s).  ``SUMS``:
    rows of ``RS1 + 1`` columns, run ``r`` in column ``k0 + sgn * r`` (:func:`_finish_runs`), each run column of a
    row up to ``last`` written (zeros where the row has no such distance); ``RUNROW`` int32 ``[NRUN]``: each run's
    row of ``POS`` (the position rows, ``[H, R, D]`` or ``[B, H, R, D]``: strides ``s_pb`` (0 for the former),
    ``s_ph``, ``s_pr``; unit column stride; the program's ``(b, h)`` found again from its id, so that nothing for
    this epilogue stays live through the loops: under triton 3.6.0 the sm_90 dq kernel spilled 4 B otherwise).
    No predicate per element: rows past ``last`` read row ``last`` (their results are not stored) and columns past
    the runs the last run's (their position rows are zeros, so those add 0 as long as the sums stay finite in the
    product's type).  Products: bfloat16 sums (rounded as ``dS`` is for ``dS K``; float32's range) by bfloat16 rows;
    float16 inputs in TF32 (the same 11 significant bits as float16, float32's range: a sum of many dS can exceed
    65504 where no element does, and inf * 0 would then reach every row of the block as NaN); float32 as the
    kernel's ``PREC``.  The sums must be read by plain loads after the barrier (never ``ld.global.nc`` /
    :func:`_gather`: the non-coherent path need not see this program's own stores)."""
    tl.debug_barrier()  # the run sums other threads of this program stored are visible
    bh = tl.program_id(1)
    POS = POS + (bh // H).to(tl.int64) * s_pb + (bh % H).to(tl.int64) * s_ph
    r_lo = tl.minimum(tl.maximum(d_lo + run0, 0), NRUN - 1)
    r_hi = tl.minimum(tl.maximum(d_hi + run0, 0), NRUN - 1)
    c_lo = k0 + tl.minimum(sgn * r_lo, sgn * r_hi)
    c_hi = k0 + tl.maximum(sgn * r_lo, sgn * r_hi)
    rows = tl.minimum(idx, last) * (RS1 + 1)
    for c0 in tl.range(c_lo, c_hi + 1, RC, num_stages=1):
        cols = c0 + tl.arange(0, RC)
        c_ok = cols <= c_hi
        s = tl.load(SUMS + (rows[:, None] + tl.minimum(cols, c_hi)[None, :]))
        prow = tl.load(RUNROW + (tl.minimum(cols, c_hi) - k0) * sgn)
        p = tl.load(POS + (prow.to(tl.int64) * s_pr)[:, None] + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if POS.dtype.element_ty == tl.float16:  # (a sum can exceed float16's range where no dS element does)
            acc += _mm(s, p.to(tl.float32), UPCAST, "tf32")
        else:
            acc += _mm(s.to(p.dtype), p, UPCAST, PREC)
    return acc


@triton.jit
def _dq_tiles(dq, run_lo, run_hi, q, do, rowmax, logsum, dsc, K_bh, V_bh, C2P_bh, P2C_bh, TABLE, CSUM_bh,
              KMASK, FMASK, offs_m, offs_d, d_ok, rows, cc, lo, hi, skip_a, skip_b, slot, run0, b, h, bh, Lq, Lk, NSLOT,
              NRUN,
              qk_scale, dp_scale, drop_thresh, seed, s_kn, s_vn, s_kmb, s_fmb, s_fmh, s_fmm, dist, KEEP, LW,
              HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
              REGION: tl.constexpr, HI: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
              BLOCK_N: tl.constexpr, DIST: tl.constexpr, KEEP_BITS: tl.constexpr):
    """dQ and the c2p run sums over the key tiles ``[lo, hi)`` of one region (``_tile_regions``, ``_inner_tiles``;
    ``skip_a`` / ``skip_b`` and ``HI`` as in :func:`_dkdv_tiles`)."""
    m_ok = offs_m < Lq
    for it in range(lo, hi, BLOCK_N):
        start_n = _tile_start(tl.where(it < skip_a, it, it - skip_a + skip_b), BLOCK_N, DIST or HAS_C2P)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = _block_tile(K_bh, offs_n, s_kn, offs_d, kv_ok)
        v = _block_tile(V_bh, offs_n, s_vn, offs_d, kv_ok)
        col = _key_col(KMASK, b, offs_n, Lk, s_kmb, MASK_KIND)
        _, ds = _probs_and_ds(q, k, v, do, rowmax, logsum, dsc, C2P_bh, P2C_bh, TABLE, slot,
                              offs_m, offs_n, start_n, b, h, bh, Lq, Lk, NSLOT, qk_scale, dp_scale, drop_thresh,
                              seed, col, FMASK, s_fmb, s_fmh, s_fmm, dist, KEEP, LW, 0,
                              HAS_C2P, HAS_P2C, MASK_KIND, DROPOUT, REGION, UPCAST, PREC, BLOCK_N, False, DIST,
                              KEEP_BITS)
        dq += _mm(ds.to(k.dtype), k, UPCAST, PREC)
        if HAS_C2P:
            run_lo, run_hi = _advance_runs(ds, run_lo, run_hi, offs_m, offs_n, Lq, Lk, CSUM_bh, rows, cc, run0, NRUN,
                                           REGION, HI, False)
    return dq, run_lo, run_hi


# a fresh seed / rate per call, or another head group, must not recompile
@triton.jit(do_not_specialize=["SEED", "drop_thresh", "H0"])
def disentangled_bwd_dkdv_kernel(
    Q, K, V, DO, STATS, DELTA, C2P, P2C, TABLE, CU_Q, CU_K, KMASK, FMASK, UNI, DK, DV, PSUM, POS, RUNROW, KEEP,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
    s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh,
    H, H_ALL, H0, Lq, Lk, MAXQ, MAXK, D, NSLOT, NRUN, scale, band_lo, band_hi, run0, p_drop, drop_thresh,
    SEED, dist0, dist1, NSLOT1, RS1, RCC, RCP, s_pb, s_ph, s_pr, s_gh, s_gm, LW, RH,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DIST: tl.constexpr = 0,
    TPAD: tl.constexpr = 16, RUN_PRODUCTS: tl.constexpr = True, KEEP_BITS: tl.constexpr = False,
    KEEP_KT: tl.constexpr = 64,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    ROWMAX, LOGSUM = _stat_planes(STATS, Lq, H_ALL, VARLEN)
    if MASK_KIND != 0:  # the dq kernel's LOGSUM with +inf on HF's uniform rows (padded calls only take a mask)
        tl.static_assert(not VARLEN, "packed calls take no mask: DELTA has one plane there")
        DELTA, LOGSUM = _stat_planes(DELTA, Lq, H_ALL, VARLEN)
    q0, Lq, k0, Lk, qrow0, krow0, toff = _sequence(CU_Q, CU_K, bh, H, Lq, Lk, MAXQ, MAXK, VARLEN)
    bh = b * H_ALL + H0 + h  # the dropout stream's (b, h): global when the launcher runs heads in groups
    TABLE = TABLE + toff
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    start_n = pid_n * BLOCK_N
    if start_n >= Lk:  # packed: this sequence is shorter than the longest one
        return
    seed = _dropout_seed(SEED, DROPOUT)
    if KEEP_BITS:  # dq's dropout decisions, passed to dK/dV as bytes (the launcher's DROPOUT_BITS)
        KEEP = _keep_block(KEEP, b, h, k0, RH, LW, KEEP_KT, VARLEN)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < Lk
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = _tile(K + b64 * s_kb + h64 * s_kh, k0 + offs_n, s_kn, offs_d, kv_ok)
    v = _tile(V + b64 * s_vb + h64 * s_vh, k0 + offs_n, s_vn, offs_d, kv_ok)
    Q_bh = Q + b64 * s_qb + h64 * s_qh + q0.to(tl.int64) * s_qm
    DO_bh = DO + b64 * s_ob + h64 * s_oh + q0.to(tl.int64) * s_om
    C2P_bh = _table_block(C2P, qrow0, Lq, NSLOT, DIST, VARLEN, TPAD)
    P2C_bh = _table_block(P2C, krow0, Lk, NSLOT, DIST, VARLEN, TPAD)
    PSUM_bh = _table_block(PSUM, krow0, Lk, RS1 + 1, True, VARLEN, 16)
    rows = offs_n * RS1  # int32 offsets within the (b, h) block (the launcher checks the size); _advance_runs
    qk_scale = scale * LOG2E

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    run_lo = tl.zeros([BLOCK_N], dtype=tl.float32)
    run_hi = tl.zeros([BLOCK_N], dtype=tl.float32)
    col = _key_col(KMASK, b, offs_n, Lk, s_kmb, MASK_KIND)  # the program's keys: once, not per query tile
    args = (k, v, Q_bh, DO_bh, ROWMAX, LOGSUM, DELTA, C2P_bh, P2C_bh, TABLE, PSUM_bh, col, FMASK,
            offs_n, offs_d, d_ok, rows, RCP)
    col_lo, col_hi, dist = _sat_columns(band_lo, band_hi, NSLOT, dist0, dist1, NSLOT1, DIST)
    dp_scale = scale
    if DROPOUT:
        dp_scale = scale / (1.0 - p_drop)  # (as the dq kernel's)
    rest = (qrow0, start_n, b, h, bh, Lq, Lk, NSLOT, NRUN, qk_scale, scale, dp_scale, drop_thresh, seed, s_qm, s_om,
            s_fmb, s_fmh, s_fmm, dist, KEEP, LW)
    if HAS_C2P | HAS_P2C:
        # query tiles far ahead of the key tile (slot 0), inside the run band, with an end run (both sides of the
        # inner ones, in one loop), far behind (slot NSLOT-1); the run sums do not depend on the order
        a, c = _tile_regions(start_n, BLOCK_N, band_lo, band_hi, Lq, BLOCK_M, False)
        i1, i2 = _inner_tiles(start_n, BLOCK_N, 1 - run0, NRUN - 2 - run0, a, c, BLOCK_M, False)
        dk, dv, run_lo, run_hi = _dkdv_tiles(dk, dv, run_lo, run_hi, *args, 0, a, a, a, col_lo, run0, *rest, HAS_C2P,
                                             HAS_P2C, MASK_KIND, DROPOUT, SAT, False, UPCAST, PREC, BLOCK_M, BLOCK_N,
                                             DIST, KEEP_BITS)
        dk, dv, run_lo, run_hi = _dkdv_tiles(dk, dv, run_lo, run_hi, *args, i1, i2, i2, i2, 0, run0, *rest, HAS_C2P,
                                             HAS_P2C, MASK_KIND, DROPOUT, INNER, False, UPCAST, PREC, BLOCK_M, BLOCK_N,
                                             DIST, KEEP_BITS)
        dk, dv, run_lo, run_hi = _dkdv_tiles(dk, dv, run_lo, run_hi, *args, a, i1 + c - i2, i1, i2, 0, run0, *rest,
                                             HAS_C2P, HAS_P2C, MASK_KIND, DROPOUT, GENERAL, False, UPCAST, PREC,
                                             BLOCK_M, BLOCK_N, DIST, KEEP_BITS)
        dk, dv, run_lo, run_hi = _dkdv_tiles(dk, dv, run_lo, run_hi, *args, c, Lq, Lq, Lq, col_hi, run0, *rest,
                                             HAS_C2P, HAS_P2C, MASK_KIND, DROPOUT, SAT, True, UPCAST, PREC, BLOCK_M,
                                             BLOCK_N, DIST, KEEP_BITS)
    else:  # no relative terms: the SAT path has nothing to add but the key term
        dk, dv, run_lo, run_hi = _dkdv_tiles(dk, dv, run_lo, run_hi, *args, 0, Lq, Lq, Lq, 0, run0, *rest, HAS_C2P,
                                             HAS_P2C, MASK_KIND, DROPOUT, SAT, False, UPCAST, PREC, BLOCK_M, BLOCK_N,
                                             DIST, KEEP_BITS)

    out = _grad_rows(krow0, k0, h64, offs_n, offs_d, D, s_gh, s_gm, VARLEN)
    if HAS_P2C:
        # key j's distances run from -j (query 0) to Lq - 1 - j; then dK's relative share from the finished sums
        _finish_runs(run_lo, run_hi, n_ok, -offs_n, Lq - 1 - offs_n, PSUM_bh, rows + offs_n, RCP - run0, 1, run0,
                     NRUN, not VARLEN, BLOCK_M)
    if HAS_P2C and RUN_PRODUCTS:
        dk = _run_products(dk, _sums_block(PSUM, PSUM_bh, Lk, RS1, VARLEN), POS, RUNROW, offs_n, Lk - 1, RS1,
                           1 - tl.minimum(start_n + BLOCK_N, Lk), Lq - 1 - start_n, RCP - run0, 1, run0, NRUN, H,
                           s_pb, s_ph, s_pr, offs_d, d_ok, UPCAST, PREC, RUN_CHUNK)
    tl.store(DK + out, _rounded(dk, DK, UPCAST), mask=kv_ok)
    if MASK_KIND != 0:
        dv = _uniform_dv(dv, DO_bh, UNI, b, h, bh, offs_n, n_ok, offs_d, d_ok, start_n, Lq, Lk, s_om, s_unb, s_unh,
                         drop_thresh, seed, KEEP, LW, MASK_KIND, DROPOUT, UPCAST, PREC, BLOCK_M, BLOCK_N,
                         KEEP_BITS)
    if DROPOUT:  # the kept probabilities' 1 / (1 - p): once here, not per element
        dv = dv * (1.0 / (1.0 - p_drop))
    tl.store(DV + out, _rounded(dv, DV, UPCAST), mask=kv_ok)


# a fresh seed / rate per call, or another head group, must not recompile
@triton.jit(do_not_specialize=["SEED", "drop_thresh", "H0"])
def disentangled_bwd_dq_kernel(
    Q, K, V, DO, STATS, DELTA, C2P, P2C, TABLE, CU_Q, CU_K, KMASK, FMASK, UNI, DQ, CSUM, O, POS, RUNROW, KEEP,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
    s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh,
    H, H_ALL, H0, Lq, Lk, MAXQ, MAXK, D, NSLOT, NRUN, scale, band_lo, band_hi, run0, p_drop, drop_thresh,
    SEED, dist0, dist1, NSLOT1, RS1, RCC, RCP, s_yb, s_yh, s_ym, s_pb, s_ph, s_pr, s_gh, s_gm, LW, RH,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DIST: tl.constexpr = 0,
    TPAD: tl.constexpr = 16, RUN_PRODUCTS: tl.constexpr = True, KEEP_BITS: tl.constexpr = False,
    KEEP_KT: tl.constexpr = 64,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    ROWMAX, LOGSUM = _stat_planes(STATS, Lq, H_ALL, VARLEN)
    q0, Lq, k0, Lk, qrow0, krow0, toff = _sequence(CU_Q, CU_K, bh, H, Lq, Lk, MAXQ, MAXK, VARLEN)
    bh = b * H_ALL + H0 + h  # the dropout stream's (b, h): global when the launcher runs heads in groups
    TABLE = TABLE + toff
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    if start_m >= Lq:  # packed: this sequence is shorter than the longest one
        return
    seed = _dropout_seed(SEED, DROPOUT)
    if KEEP_BITS:  # dq's dropout decisions, passed to dK/dV as bytes (the launcher's DROPOUT_BITS)
        KEEP = _keep_block(KEEP, b, h, k0, RH, LW, KEEP_KT, VARLEN)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Lq
    qo_ok = m_ok[:, None] & d_ok[None, :]
    q = _tile(Q + b64 * s_qb + h64 * s_qh, q0 + offs_m, s_qm, offs_d, qo_ok)
    do = _tile(DO + b64 * s_ob + h64 * s_oh, q0 + offs_m, s_om, offs_d, qo_ok)
    rowmax = tl.load(ROWMAX + qrow0 + offs_m, mask=m_ok, other=0.0)
    logsum = tl.load(LOGSUM + qrow0 + offs_m, mask=m_ok, other=float("inf"))
    o = _tile(O + b64 * s_yb + h64 * s_yh, q0 + offs_m, s_ym, offs_d, qo_ok)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # 16-bit products are exact in float32
    tl.store(DELTA + qrow0 + offs_m, delta, mask=m_ok)  # for the dK/dV kernel, launched next
    K_bh = K + b64 * s_kb + h64 * s_kh + k0.to(tl.int64) * s_kn
    V_bh = V + b64 * s_vb + h64 * s_vh + k0.to(tl.int64) * s_vn
    C2P_bh = _table_block(C2P, qrow0, Lq, NSLOT, DIST, VARLEN, TPAD)
    P2C_bh = _table_block(P2C, krow0, Lk, NSLOT, DIST, VARLEN, TPAD)
    CSUM_bh = _table_block(CSUM, qrow0, Lq, RS1 + 1, True, VARLEN, 16)
    rows = offs_m * RS1  # int32 offsets within the (b, h) block (the launcher checks the size); _advance_runs
    qk_scale = scale * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    run_lo = tl.zeros([BLOCK_M], dtype=tl.float32)
    run_hi = tl.zeros([BLOCK_M], dtype=tl.float32)
    # uniform rows: their scores are constants, so no gradient flows through them (probability 0 in the loops)
    if MASK_KIND != 0:
        tl.static_assert(not VARLEN, "packed calls take no mask: DELTA has one plane there")
        logsum = tl.where(_uniform_rows(UNI, b, h, offs_m, Lq, s_unb, s_unh, MASK_KIND), float("inf"), logsum)
        # the dK/dV kernel's LOGSUM: DELTA's second plane (a mask: padded, where Lq is the launch's)
        tl.store(_stat_planes(DELTA, Lq, H_ALL, VARLEN)[1] + qrow0 + offs_m, logsum, mask=m_ok)
    args = (q, do, rowmax, logsum, delta * scale, K_bh, V_bh, C2P_bh, P2C_bh, TABLE, CSUM_bh, KMASK, FMASK,
            offs_m, offs_d, d_ok, rows, RCC)
    col_lo, col_hi, dist = _sat_columns(band_lo, band_hi, NSLOT, dist0, dist1, NSLOT1, DIST)
    dp_scale = scale
    if DROPOUT:
        dp_scale = scale / (1.0 - p_drop)
    rest = (b, h, bh, Lq, Lk, NSLOT, NRUN, qk_scale, dp_scale, drop_thresh, seed, s_kn, s_vn,
            s_kmb, s_fmb, s_fmh, s_fmm, dist, KEEP, LW)
    if HAS_C2P | HAS_P2C:
        # key tiles far behind the query tile (slot NSLOT-1), inside the run band, with an end run (both sides of the
        # inner ones, in one loop), far ahead (slot 0); the run sums do not depend on the order
        a, c = _tile_regions(start_m, BLOCK_M, band_lo, band_hi, Lk, BLOCK_N, True)
        i1, i2 = _inner_tiles(start_m, BLOCK_M, 1 - run0, NRUN - 2 - run0, a, c, BLOCK_N, True)
        dq, run_lo, run_hi = _dq_tiles(dq, run_lo, run_hi, *args, 0, a, a, a, col_hi, run0, *rest, HAS_C2P,
                                       HAS_P2C, MASK_KIND, DROPOUT, SAT, True, UPCAST, PREC, BLOCK_N, DIST,
                                       KEEP_BITS)
        dq, run_lo, run_hi = _dq_tiles(dq, run_lo, run_hi, *args, i1, i2, i2, i2, 0, run0, *rest, HAS_C2P, HAS_P2C,
                                       MASK_KIND, DROPOUT, INNER, False, UPCAST, PREC, BLOCK_N, DIST,
                                       KEEP_BITS)
        dq, run_lo, run_hi = _dq_tiles(dq, run_lo, run_hi, *args, a, i1 + c - i2, i1, i2, 0, run0, *rest, HAS_C2P,
                                       HAS_P2C, MASK_KIND, DROPOUT, GENERAL, False, UPCAST, PREC, BLOCK_N, DIST,
                                       KEEP_BITS)
        dq, run_lo, run_hi = _dq_tiles(dq, run_lo, run_hi, *args, c, Lk, Lk, Lk, col_lo, run0, *rest, HAS_C2P, HAS_P2C,
                                       MASK_KIND, DROPOUT, SAT, False, UPCAST, PREC, BLOCK_N, DIST,
                                       KEEP_BITS)
    else:  # no relative terms: the SAT path has nothing to add but the key term
        dq, run_lo, run_hi = _dq_tiles(dq, run_lo, run_hi, *args, 0, Lk, Lk, Lk, 0, run0, *rest, HAS_C2P, HAS_P2C,
                                       MASK_KIND, DROPOUT, SAT, False, UPCAST, PREC, BLOCK_N, DIST,
                                       KEEP_BITS)

    out = _grad_rows(qrow0, q0, h64, offs_m, offs_d, D, s_gh, s_gm, VARLEN)
    if HAS_C2P:
        # query i's distances run from i - (Lk - 1) (the last key) to i; then dQ's relative share from the sums
        _finish_runs(run_lo, run_hi, m_ok, offs_m - (Lk - 1), offs_m, CSUM_bh, rows + offs_m, RCC + run0, -1, run0,
                     NRUN, not VARLEN, BLOCK_N)
    if HAS_C2P and RUN_PRODUCTS:
        dq = _run_products(dq, _sums_block(CSUM, CSUM_bh, Lq, RS1, VARLEN), POS, RUNROW, offs_m, Lq - 1, RS1,
                           start_m - (Lk - 1), tl.minimum(start_m + BLOCK_M, Lq) - 1, RCC + run0, -1, run0, NRUN, H,
                           s_pb, s_ph, s_pr, offs_d, d_ok, UPCAST, PREC, RUN_CHUNK)
    tl.store(DQ + out, _rounded(dq, DQ, UPCAST), mask=qo_ok)
