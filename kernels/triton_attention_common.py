"""Inner-loop helpers shared by the Triton forward and backward kernels.

Conventions of every kernel (one program = one tile row of one ``(b, h)``):

* ``offs_m`` query rows ``[BLOCK_M]``, ``offs_n`` key columns ``[BLOCK_N]``; ``d = i - j``.
* ``C2P`` is ``Q @ pos_key^T`` and ``P2C`` is ``K @ pos_query^T``, float32 ``[B, H, L, NSLOT]``
  (``NSLOT = 2*span``), precomputed on the host; a tile gathers ``C2P[i, slot(d)]`` and
  ``P2C[j, slot(d)]`` with ``slot(d) = TABLE[d + Lk - 1]``.  Tiles whose every ``d`` lies at or
  beyond ``band_hi`` (slot ``NSLOT-1``) or at or below ``band_lo`` (slot 0) read one column of
  the tables instead (per-row / per-column constants, no gather).
* Scores are kept in the log2 domain: ``s2 = log2(e) * scale * (q.k + c2p + p2c)``.
* ``VARLEN`` (constexpr): packed sequences (see :func:`_sequence`); one program = one tile row of
  one ``(sequence n, head h)``, ``bh = n*H + h``; ``i``, ``j`` and ``d`` are positions *within* the
  sequence, so every helper below is shared unchanged by the padded and the packed kernels.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tile(BASE, rows, s_row, offs_d, mask):
    """Load ``BASE[rows, offs_d]`` (rows of stride ``s_row``, int64 offsets; 0 where masked)."""
    return tl.load(BASE + rows.to(tl.int64)[:, None] * s_row + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` accumulated in float32.  ``UPCAST``: operands to float32 first (the CPU interpreter
    mis-computes low-precision dots); ``PREC``: "ieee" or "tf32" for float32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _score_mm(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """The score product ``q k^T`` (or ``k q^T``): :func:`_mm`, except that the interpreter accumulates in float64
    and rounds once, so that ``a @ b`` and ``(b^T @ a^T)^T`` agree bit for bit, as they are expected to on the GPU
    (the same products summed in the same order over the inner dimension; checked by the large-score tests of
    tests/test_triton_exactness.py when they run on a GPU) and numpy's float32 matmul does not."""
    if UPCAST:
        return tl.dot(a.to(tl.float64), b.to(tl.float64), input_precision="ieee").to(tl.float32)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _sequence(CU_Q, CU_K, bh, H, Lq, Lk, MAXQ, MAXK, VARLEN: tl.constexpr):
    """Where the rows of program ``bh`` live: ``(q0, Lq, k0, Lk, qrow0, krow0, toff)``.

    Padded (``VARLEN`` False): ``q0 = k0 = 0``, lengths as given, and the per-``(b, h)`` rows of
    the row-major float32 buffers (tables, softmax statistics, gradients) start at ``qrow0 = bh*Lq``
    / ``krow0 = bh*Lk``.  Packed: ``Lq``/``Lk`` are the totals ``Tq``/``Tk``; sequence ``n = bh // H``
    occupies tokens ``q0 = CU_Q[n] .. CU_Q[n+1]`` (``k0`` likewise); the buffers are ``[H, T, ...]``
    so ``qrow0 = h*Tq + q0`` (int64).  The distance tables (built for ``MAXQ`` x ``MAXK``) are read at
    ``TABLE + toff`` with ``toff = MAXK - Lk``, so that ``TABLE[toff + d + Lk - 1]`` keeps working
    with the per-sequence ``Lk``.  Offsets are clamped into ``[0, T]`` and lengths to ``MAXQ``/``MAXK``:
    invalid ``cu_seqlens`` (which the host rejects before launching) can give wrong rows but never
    an access outside the tensors.
    """
    if VARLEN:
        n = bh // H
        h = bh % H
        q0 = tl.minimum(tl.maximum(tl.load(CU_Q + n), 0), Lq)
        q1 = tl.minimum(tl.maximum(tl.load(CU_Q + n + 1), q0), Lq)
        k0 = tl.minimum(tl.maximum(tl.load(CU_K + n), 0), Lk)
        k1 = tl.minimum(tl.maximum(tl.load(CU_K + n + 1), k0), Lk)
        lq = tl.minimum(q1 - q0, MAXQ)
        lk = tl.minimum(k1 - k0, MAXK)
        qrow0 = h.to(tl.int64) * Lq + q0
        krow0 = h.to(tl.int64) * Lk + k0
        toff = MAXK - lk
    else:
        q0 = bh * 0
        k0 = bh * 0
        lq = q0 + Lq
        lk = k0 + Lk
        qrow0 = bh.to(tl.int64) * Lq
        krow0 = bh.to(tl.int64) * Lk
        toff = q0
    return q0, lq, k0, lk, qrow0, krow0, toff


@triton.jit
def _q_axis(x, TRANS: tl.constexpr):
    """A per-query vector ``[BLOCK_M]`` spread over the tile's query axis: ``x[:, None]`` on a ``[BLOCK_M, BLOCK_N]``
    tile, ``x[None, :]`` on a transposed ``[BLOCK_N, BLOCK_M]`` one (keys as rows)."""
    if TRANS:
        return x[None, :]
    else:
        return x[:, None]


@triton.jit
def _k_axis(x, TRANS: tl.constexpr):
    """A per-key vector ``[BLOCK_N]`` spread over the tile's key axis (see :func:`_q_axis`)."""
    if TRANS:
        return x[:, None]
    else:
        return x[None, :]


@triton.jit
def _bias_tile(C2P_bh, P2C_bh, TABLE, offs_m, offs_n, start_m, start_n, Lq, Lk, NSLOT,
               band_lo, band_hi, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TRANS: tl.constexpr):
    """``c2p[i, slot] + p2c[j, slot]`` of one tile, float32 ``[BLOCK_M, BLOCK_N]`` (``[BLOCK_N, BLOCK_M]`` if
    ``TRANS``), unscaled; the same value per element in either orientation."""
    m_ok = offs_m < Lq
    n_ok = offs_n < Lk
    if TRANS:
        bias = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        bias = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    d_min = start_m - (start_n + BLOCK_N - 1)
    d_max = start_m + BLOCK_M - 1 - start_n
    if (d_min >= band_hi) | (d_max <= band_lo):
        sat = tl.where(d_min >= band_hi, NSLOT - 1, 0)
        if HAS_C2P:
            c = tl.load(C2P_bh + offs_m * NSLOT + sat, mask=m_ok, other=0.0)
            bias += _q_axis(c, TRANS)
        if HAS_P2C:
            p = tl.load(P2C_bh + offs_n * NSLOT + sat, mask=n_ok, other=0.0)
            bias += _k_axis(p, TRANS)
    else:
        ok = _q_axis(m_ok, TRANS) & _k_axis(n_ok, TRANS)
        slot = tl.load(TABLE + (_q_axis(offs_m, TRANS) - _k_axis(offs_n, TRANS) + Lk - 1), mask=ok, other=0)
        if HAS_C2P:
            bias += tl.load(C2P_bh + _q_axis(offs_m, TRANS) * NSLOT + slot, mask=ok, other=0.0)
        if HAS_P2C:
            bias += tl.load(P2C_bh + _k_axis(offs_n, TRANS) * NSLOT + slot, mask=ok, other=0.0)
    return bias


@triton.jit
def _scale_and_mask(s, qk_scale, b, h, offs_m, offs_n, Lq, Lk, KMASK, FMASK, UNI,
                    s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh, MASK_KIND: tl.constexpr, TRANS: tl.constexpr):
    """Log2-domain scores ``s2 = s * qk_scale`` of one tile with the attention mask applied.

    Key columns out of range and, for MASK_KIND 1 (key padding ``KMASK [B, Lk]``), masked keys get -inf through a
    per-column term added with the scale (one fused multiply-add per element, no per-element select).  MASK_KIND 2:
    full ``FMASK [B|1, 1|H, Lq, Lk]`` (broadcast dims have stride 0), read per element.  With a mask, rows flagged
    in ``UNI [B, 1|H, Lq]`` become uniform: every in-range key scores 0 (HF's fully masked rows).  Rows out of
    range are left unmasked (the forward never stores them, the backward zeroes them).  Returns
    ``(s2, uniform_rows)`` (bool ``[BLOCK_M]``; all False without mask).  ``TRANS``: ``s`` is the transposed
    tile (keys as rows); "per column" above then means per row.
    """
    m_ok = offs_m < Lq
    n_ok = offs_n < Lk
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    col = tl.where(n_ok, 0.0, float("-inf"))
    if MASK_KIND == 1:
        km = tl.load(KMASK + b64 * s_kmb + offs_n, mask=n_ok, other=0)
        col = tl.where(km != 0, col, float("-inf"))
    s2 = s * qk_scale + _k_axis(col, TRANS)
    uni = offs_m < 0
    if MASK_KIND == 2:
        fm = tl.load(FMASK + b64 * s_fmb + h64 * s_fmh + _q_axis(offs_m.to(tl.int64), TRANS) * s_fmm
                     + _k_axis(offs_n, TRANS), mask=_q_axis(m_ok, TRANS) & _k_axis(n_ok, TRANS), other=0)
        s2 = tl.where(fm != 0, s2, float("-inf"))
    if MASK_KIND != 0:
        uni = tl.load(UNI + b64 * s_unb + h64 * s_unh + offs_m, mask=m_ok, other=0) != 0
        s2 = tl.where(_q_axis(uni, TRANS) & _k_axis(n_ok, TRANS), 0.0, s2)
    return s2, uni


@triton.jit
def _scores(q, k, C2P_bh, P2C_bh, TABLE, offs_m, offs_n, start_m, start_n, b, h, Lq, Lk, NSLOT,
            band_lo, band_hi, qk_scale, KMASK, FMASK, UNI, s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh,
            HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, MASK_KIND: tl.constexpr,
            UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            TRANS: tl.constexpr):
    """Masked log2-domain scores of one tile from ``q [BLOCK_M, BLOCK_D]`` and ``k [BLOCK_N, BLOCK_D]``:
    ``[BLOCK_M, BLOCK_N]``, or its transpose ``k q^T`` ``[BLOCK_N, BLOCK_M]`` if ``TRANS`` (the same values: the
    backward must recompute the forward's scores exactly, the softmax statistics come from them; see
    :func:`_score_mm`)."""
    if TRANS:
        s = _score_mm(k, tl.trans(q), UPCAST, PREC)
    else:
        s = _score_mm(q, tl.trans(k), UPCAST, PREC)
    if HAS_C2P or HAS_P2C:
        s += _bias_tile(C2P_bh, P2C_bh, TABLE, offs_m, offs_n, start_m, start_n, Lq, Lk, NSLOT,
                        band_lo, band_hi, HAS_C2P, HAS_P2C, BLOCK_M, BLOCK_N, TRANS)
    return _scale_and_mask(s, qk_scale, b, h, offs_m, offs_n, Lq, Lk, KMASK, FMASK, UNI,
                           s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh, MASK_KIND, TRANS)


@triton.jit
def _dropout_keep(seed, bh, offs_m, start_n, drop_thresh, BLOCK_N: tl.constexpr, TRANS: tl.constexpr):
    """Keep-mask ``[BLOCK_M, BLOCK_N]`` (``TRANS``: its transpose) of attention dropout, the CUDA kernels'
    stream: key ``seed``, counter ``(j // 4, i, b*H + h, 0)``, word ``j % 4`` of Philox4x32-10, kept iff the word is
    ``>= drop_thresh = round(p * 2**32)`` (int32 bit pattern of the uint32 threshold).  One Philox call
    serves 4 keys (``start_n`` and ``BLOCK_N`` are multiples of 4)."""
    zero = tl.zeros([offs_m.shape[0], BLOCK_N // 4], dtype=tl.uint32)
    c0 = (start_n // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)[None, :] + zero
    c1 = offs_m.to(tl.uint32)[:, None] + zero
    c2 = bh.to(tl.uint32) + zero
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, zero)
    # [M, N/4, 2, 2] -> [M, N]: position 4g + 2a + b holds word 2a + b of group g
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [offs_m.shape[0], BLOCK_N])
    keep = words >= drop_thresh.to(tl.uint32, bitcast=True)
    if TRANS:
        return tl.trans(keep)
    else:
        return keep


@triton.jit
def _seg_add(a, a_start, b, b_start):
    """Combine of a segmented sum: a segment start in ``b`` drops what came before it."""
    return tl.where(b_start != 0, b, a + b), a_start | b_start


@triton.jit
def _segment_scan(ds, run, d, ok, has_prev, has_next, RUNS, SUMS, rows, Lk, AXIS: tl.constexpr,
                  STEP: tl.constexpr):
    """Deterministic per-run sums of ``ds`` along ``AXIS`` without atomics.

    ``RUNS[d + Lk - 1]`` numbers the maximal runs of distances ``d`` with one slot
    (:func:`deberta_fast.positions.relative_run_table`).  Along ``AXIS`` ``d`` changes by ``-STEP`` per step
    (``STEP = 1`` when j increases along the axis, ``-1`` when i does) and takes each value once, so
    each run covers one contiguous segment, whatever the shape of the bucket function.  A segmented
    inclusive scan restarts at every segment start (``RUNS`` differs from the neighbour before);
    ``run`` carries the open segment's sum across tiles.  The last element of a segment stores the
    segment's sum to ``SUMS[row, run id]``: one writer per location, and every sum adds only its
    own elements (no difference of large prefix sums).  ``ok``: in-range elements (``ds`` must be 0
    elsewhere; an out-of-range element extends the open segment by 0); ``has_prev`` / ``has_next``:
    the element has a neighbour before / after it along ``AXIS``; ``rows``: offsets ``row * NRUN`` of the other axis
    from ``SUMS``.
    Returns the new ``run`` (the open segment's sum at the end of the tile).
    """
    # the neighbour before the element along AXIS has d + STEP, the one after d - STEP
    rid = tl.load(RUNS + (d + Lk - 1), mask=ok, other=0)
    prev = tl.load(RUNS + (d + STEP + Lk - 1), mask=ok & has_prev, other=-1)
    nxt = tl.load(RUNS + (d - STEP + Lk - 1), mask=ok & has_next, other=-1)
    starts = (ok & (prev != rid)).to(tl.int32)
    seg, _ = tl.associative_scan((ds, starts), AXIS, _seg_add)
    opened = tl.cumsum(starts, axis=AXIS) > 0
    incl = tl.where(opened, seg, seg + tl.expand_dims(run, AXIS))
    tl.store(SUMS + tl.expand_dims(rows, AXIS) + rid, incl, mask=ok & (nxt != rid))
    LAST: tl.constexpr = ds.shape[AXIS] - 1
    is_last = tl.expand_dims(tl.arange(0, ds.shape[AXIS]), 1 - AXIS) == LAST
    return tl.sum(tl.where(is_last, incl, 0.0), axis=AXIS)
