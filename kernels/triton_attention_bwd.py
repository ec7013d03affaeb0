"""Triton backward kernels of disentangled attention (flash-attention-2 structure, no atomics).

Both kernels recompute ``P = exp2((s2 - ROWMAX) - LOGSUM)`` tile by tile from the forward's
statistics (exact at any score magnitude; 0 on rows with no key) and the dropout keep-mask from the
seed, and form ``dS = scale * P * (dP - DELTA)`` with ``DELTA = rowsum(dO * O)`` float32
``[B,H,Lq]`` and ``dP = keep/(1-p) * dO V^T``.

* :func:`disentangled_bwd_dkdv_kernel`, grid ``(cdiv(Lk, BLOCK_N), B*H)``: ``DK = dS^T Q``
  (content part, float32 ``[B,H,Lk,D]``), ``DV = P_drop^T dO`` (float32), and, with p2c, the
  column sums of ``dS`` per run of equal slot, ``PSUM`` float32 ``[B,H,Lk,NRUN]``.
* :func:`disentangled_bwd_dq_kernel`, grid ``(cdiv(Lq, BLOCK_M), B*H)``: ``DQ = dS K``
  (content part, float32 ``[B,H,Lq,D]``) and, with c2p, the row sums per run, ``CSUM`` float32
  ``[B,H,Lq,NRUN]``.

The runs (``RUNS``, see ``_segment_scan`` and :func:`deberta_fast.positions.relative_run_table`)
fold onto table rows on the host, which turns them into the position gradients with small
GEMMs.  Every output location has one writer: deterministic.

``VARLEN``: packed sequences (layouts as in the forward kernel; grids over the longest
sequence's blocks and ``N*H``): ``ROWMAX``/``LOGSUM``/``DELTA [H,Tq]``, ``DQ [H,Tq,D]``,
``DK``/``DV [H,Tk,D]``, ``CSUM [H,Tq,NRUN]``, ``PSUM [H,Tk,NRUN]``, all float32.
"""
import triton
import triton.language as tl

from .triton_attention_common import (LOG2E, _dropout_keep, _k_axis, _mm, _q_axis, _scores, _segment_scan,
                                      _sequence, _tile)


@triton.jit
def _probs_and_ds(q, k, v, do, rowmax, logsum, delta, C2P_bh, P2C_bh, TABLE, offs_m, offs_n, start_m, start_n,
                  b, h, bh, Lq, Lk, NSLOT, band_lo, band_hi, qk_scale, scale, p_drop, drop_thresh, seed,
                  KMASK, FMASK, UNI, s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh,
                  HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, MASK_KIND: tl.constexpr,
                  DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TRANS: tl.constexpr):
    """Recompute one tile: returns ``(p_drop, ds)``, ``[BLOCK_M, BLOCK_N]`` (``[BLOCK_N, BLOCK_M]`` if ``TRANS``),
    ``ds`` already times ``scale`` and zero outside the matrix and on uniform rows (their scores are constants)."""
    s2, uni = _scores(q, k, C2P_bh, P2C_bh, TABLE, offs_m, offs_n, start_m, start_n, b, h, Lq, Lk, NSLOT,
                      band_lo, band_hi, qk_scale, KMASK, FMASK, UNI, s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh,
                      HAS_C2P, HAS_P2C, MASK_KIND, UPCAST, PREC, BLOCK_M, BLOCK_N, TRANS)
    ok = _q_axis(offs_m < Lq, TRANS) & _k_axis(offs_n < Lk, TRANS)
    p = tl.where(ok, tl.exp2((s2 - _q_axis(rowmax, TRANS)) - _q_axis(logsum, TRANS)), 0.0)
    if TRANS:
        dp = _mm(v, tl.trans(do), UPCAST, PREC)
    else:
        dp = _mm(do, tl.trans(v), UPCAST, PREC)
    if DROPOUT:
        inv_keep = 1.0 / (1.0 - p_drop)
        keep = _dropout_keep(seed, bh, offs_m, start_n, drop_thresh, BLOCK_N, TRANS)
        pd = tl.where(keep, p * inv_keep, 0.0)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    else:
        pd = p
    ds = p * (dp - _q_axis(delta, TRANS)) * scale
    ds = tl.where(_q_axis(uni, TRANS), 0.0, ds)
    return pd, ds


@triton.jit(do_not_specialize=["seed", "drop_thresh"])  # a fresh seed / rate per call must not recompile
def disentangled_bwd_dkdv_kernel(
    Q, K, V, DO, ROWMAX, LOGSUM, DELTA, C2P, P2C, TABLE, RUNS, CU_Q, CU_K, KMASK, FMASK, UNI, DK, DV, PSUM,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
    s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh,
    H, Lq, Lk, MAXQ, MAXK, D, NSLOT, NRUN, scale, band_lo, band_hi, p_drop, drop_thresh, seed,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q0, Lq, k0, Lk, qrow0, krow0, toff = _sequence(CU_Q, CU_K, bh, H, Lq, Lk, MAXQ, MAXK, VARLEN)
    TABLE = TABLE + toff
    RUNS = RUNS + toff
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    start_n = pid_n * BLOCK_N
    if start_n >= Lk:  # packed: this sequence is shorter than the longest one
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < Lk
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = _tile(K + b64 * s_kb + h64 * s_kh, k0 + offs_n, s_kn, offs_d, kv_ok)
    v = _tile(V + b64 * s_vb + h64 * s_vh, k0 + offs_n, s_vn, offs_d, kv_ok)
    Q_bh = Q + b64 * s_qb + h64 * s_qh + q0.to(tl.int64) * s_qm
    DO_bh = DO + b64 * s_ob + h64 * s_oh + q0.to(tl.int64) * s_om
    C2P_bh = C2P + qrow0 * NSLOT
    P2C_bh = P2C + krow0 * NSLOT
    PSUM_bh = PSUM + krow0 * NRUN
    rows = offs_n * NRUN  # int32 offsets within the (b, h) block (the launcher checks the size)
    qk_scale = scale * LOG2E

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    run = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Lq
        qo_ok = m_ok[:, None] & d_ok[None, :]
        q = _tile(Q_bh, offs_m, s_qm, offs_d, qo_ok)
        do = _tile(DO_bh, offs_m, s_om, offs_d, qo_ok)
        rowmax = tl.load(ROWMAX + qrow0 + offs_m, mask=m_ok, other=0.0)
        logsum = tl.load(LOGSUM + qrow0 + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + qrow0 + offs_m, mask=m_ok, other=0.0)
        # the transposed tile (keys as rows, as in the dK/dV loop of flash attention 2): dV and dK take it
        # without a transpose, and the p2c column sums become row sums (a scan inside each row)
        pd, ds = _probs_and_ds(q, k, v, do, rowmax, logsum, delta, C2P_bh, P2C_bh, TABLE, offs_m, offs_n,
                               start_m, start_n, b, h, bh, Lq, Lk, NSLOT, band_lo, band_hi, qk_scale, scale, p_drop,
                               drop_thresh, seed, KMASK, FMASK, UNI, s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh,
                               HAS_C2P, HAS_P2C, MASK_KIND, DROPOUT, UPCAST, PREC, BLOCK_M, BLOCK_N, True)
        dv += _mm(pd.to(do.dtype), do, UPCAST, PREC)
        dk += _mm(ds.to(q.dtype), q, UPCAST, PREC)
        if HAS_P2C:
            # sums over i per slot; interior tiles of a saturated region only advance the prefix
            d_min = start_m - (start_n + BLOCK_N - 1)
            d_max = start_m + BLOCK_M - 1 - start_n
            interior = (start_m > 0) & (start_m + BLOCK_M < Lq) & ((d_min > band_hi) | (d_max < band_lo))
            if interior:
                run += tl.sum(ds, 1)
            else:
                ok = n_ok[:, None] & m_ok[None, :]
                d = offs_m[None, :] - offs_n[:, None]
                run = _segment_scan(ds, run, d, ok, (offs_m > 0)[None, :], (offs_m < Lq - 1)[None, :],
                                    RUNS, PSUM_bh, rows, Lk, 1, -1)

    out = (krow0 + offs_n)[:, None] * D + offs_d[None, :]
    tl.store(DK + out, dk, mask=kv_ok)
    tl.store(DV + out, dv, mask=kv_ok)


@triton.jit(do_not_specialize=["seed", "drop_thresh"])  # a fresh seed / rate per call must not recompile
def disentangled_bwd_dq_kernel(
    Q, K, V, DO, ROWMAX, LOGSUM, DELTA, C2P, P2C, TABLE, RUNS, CU_Q, CU_K, KMASK, FMASK, UNI, DQ, CSUM,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
    s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh,
    H, Lq, Lk, MAXQ, MAXK, D, NSLOT, NRUN, scale, band_lo, band_hi, p_drop, drop_thresh, seed,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q0, Lq, k0, Lk, qrow0, krow0, toff = _sequence(CU_Q, CU_K, bh, H, Lq, Lk, MAXQ, MAXK, VARLEN)
    TABLE = TABLE + toff
    RUNS = RUNS + toff
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    if start_m >= Lq:  # packed: this sequence is shorter than the longest one
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Lq
    qo_ok = m_ok[:, None] & d_ok[None, :]
    q = _tile(Q + b64 * s_qb + h64 * s_qh, q0 + offs_m, s_qm, offs_d, qo_ok)
    do = _tile(DO + b64 * s_ob + h64 * s_oh, q0 + offs_m, s_om, offs_d, qo_ok)
    rowmax = tl.load(ROWMAX + qrow0 + offs_m, mask=m_ok, other=0.0)
    logsum = tl.load(LOGSUM + qrow0 + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + qrow0 + offs_m, mask=m_ok, other=0.0)
    K_bh = K + b64 * s_kb + h64 * s_kh + k0.to(tl.int64) * s_kn
    V_bh = V + b64 * s_vb + h64 * s_vh + k0.to(tl.int64) * s_vn
    C2P_bh = C2P + qrow0 * NSLOT
    P2C_bh = P2C + krow0 * NSLOT
    CSUM_bh = CSUM + qrow0 * NRUN
    rows = offs_m * NRUN  # int32 offsets within the (b, h) block (the launcher checks the size)
    qk_scale = scale * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    run = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = _tile(K_bh, offs_n, s_kn, offs_d, kv_ok)
        v = _tile(V_bh, offs_n, s_vn, offs_d, kv_ok)
        _, ds = _probs_and_ds(q, k, v, do, rowmax, logsum, delta, C2P_bh, P2C_bh, TABLE, offs_m, offs_n,
                              start_m, start_n, b, h, bh, Lq, Lk, NSLOT, band_lo, band_hi, qk_scale, scale, p_drop,
                              drop_thresh, seed, KMASK, FMASK, UNI, s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh,
                              HAS_C2P, HAS_P2C, MASK_KIND, DROPOUT, UPCAST, PREC, BLOCK_M, BLOCK_N, False)
        dq += _mm(ds.to(k.dtype), k, UPCAST, PREC)
        if HAS_C2P:
            d_min = start_m - (start_n + BLOCK_N - 1)
            d_max = start_m + BLOCK_M - 1 - start_n
            interior = (start_n > 0) & (start_n + BLOCK_N < Lk) & ((d_min > band_hi) | (d_max < band_lo))
            if interior:
                run += tl.sum(ds, 1)
            else:
                ok = m_ok[:, None] & n_ok[None, :]
                d = offs_m[:, None] - offs_n[None, :]
                run = _segment_scan(ds, run, d, ok, (offs_n > 0)[None, :], (offs_n < Lk - 1)[None, :],
                                    RUNS, CSUM_bh, rows, Lk, 1, 1)

    out = (qrow0 + offs_m)[:, None] * D + offs_d[None, :]
    tl.store(DQ + out, dq, mask=qo_ok)
