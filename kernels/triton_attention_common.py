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
    """``a @ b`` accumulated in float32.  ``UPCAST``: operands to float32 first (the CPU
    interpreter mis-computes low-precision dots); ``PREC``: "ieee" or "tf32" for float32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _sequence(CU_Q, CU_K, TABLE, bh, H, Lq, Lk, MAXQ, MAXK, VARLEN: tl.constexpr):
    """Where the rows of program ``bh`` live: ``(q0, Lq, k0, Lk, qrow0, krow0, TABLE)``.

    Padded (``VARLEN`` False): ``q0 = k0 = 0``, lengths as given, and the per-``(b, h)`` rows of
    the row-major float32 buffers (tables, LSE, gradients) start at ``qrow0 = bh*Lq`` /
    ``krow0 = bh*Lk``.  Packed: ``Lq``/``Lk`` are the totals ``Tq``/``Tk``; sequence ``n = bh // H``
    occupies tokens ``q0 = CU_Q[n] .. CU_Q[n+1]`` (``k0`` likewise); the buffers are ``[H, T, ...]``
    so ``qrow0 = h*Tq + q0`` (int64).  ``TABLE`` (built for ``MAXQ`` x ``MAXK``) is shifted by
    ``MAXK - Lk`` so that ``TABLE[d + Lk - 1]`` keeps working with the per-sequence ``Lk``.
    Lengths are clamped to ``MAXQ``/``MAXK`` (the caller's max_seqlen): a wrong max_seqlen
    truncates a sequence instead of reading outside the table.
    """
    if VARLEN:
        n = bh // H
        h = bh % H
        q0 = tl.load(CU_Q + n)
        lq = tl.minimum(tl.load(CU_Q + n + 1) - q0, MAXQ)
        k0 = tl.load(CU_K + n)
        lk = tl.minimum(tl.load(CU_K + n + 1) - k0, MAXK)
        qrow0 = h.to(tl.int64) * Lq + q0
        krow0 = h.to(tl.int64) * Lk + k0
        table = TABLE + (MAXK - lk)
    else:
        q0 = bh * 0
        k0 = bh * 0
        lq = q0 + Lq
        lk = k0 + Lk
        qrow0 = bh.to(tl.int64) * Lq
        krow0 = bh.to(tl.int64) * Lk
        table = TABLE
    return q0, lq, k0, lk, qrow0, krow0, table


@triton.jit
def _bias_tile(C2P_bh, P2C_bh, TABLE, offs_m, offs_n, start_m, start_n, Lq, Lk, NSLOT,
               band_lo, band_hi, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``c2p[i, slot] + p2c[j, slot]`` of one tile, float32 ``[BLOCK_M, BLOCK_N]`` (unscaled)."""
    m_ok = offs_m < Lq
    n_ok = offs_n < Lk
    bias = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    d_min = start_m - (start_n + BLOCK_N - 1)
    d_max = start_m + BLOCK_M - 1 - start_n
    if (d_min >= band_hi) | (d_max <= band_lo):
        sat = tl.where(d_min >= band_hi, NSLOT - 1, 0)
        if HAS_C2P:
            c = tl.load(C2P_bh + offs_m.to(tl.int64) * NSLOT + sat, mask=m_ok, other=0.0)
            bias += c[:, None]
        if HAS_P2C:
            p = tl.load(P2C_bh + offs_n.to(tl.int64) * NSLOT + sat, mask=n_ok, other=0.0)
            bias += p[None, :]
    else:
        ok = m_ok[:, None] & n_ok[None, :]
        slot = tl.load(TABLE + (offs_m[:, None] - offs_n[None, :] + Lk - 1), mask=ok, other=0)
        if HAS_C2P:
            bias += tl.load(C2P_bh + offs_m.to(tl.int64)[:, None] * NSLOT + slot, mask=ok, other=0.0)
        if HAS_P2C:
            bias += tl.load(P2C_bh + offs_n.to(tl.int64)[None, :] * NSLOT + slot, mask=ok, other=0.0)
    return bias


@triton.jit
def _mask_tile(s2, b, h, offs_m, offs_n, Lq, Lk, KMASK, FMASK, UNI,
               s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh,
               MASK_KIND: tl.constexpr):
    """Apply the attention mask to log2-domain scores ``s2 [BLOCK_M, BLOCK_N]``.

    MASK_KIND 0: none; 1: key padding ``KMASK [B, Lk]``; 2: full ``FMASK [B|1, 1|H, Lq, Lk]``
    (broadcast dims have stride 0).  With a mask, rows flagged in ``UNI [B, 1|H, Lq]`` become
    uniform: every in-range key scores 0 (HF's fully masked rows).  Out-of-range keys get -inf.
    Returns ``(s2, uniform_rows)`` (``uniform_rows`` bool ``[BLOCK_M]``; all False without mask).
    """
    m_ok = offs_m < Lq
    n_ok = offs_n < Lk
    keep = n_ok[None, :] & m_ok[:, None]
    uni = offs_m < 0
    if MASK_KIND == 1:
        km = tl.load(KMASK + b * s_kmb + offs_n, mask=n_ok, other=0)
        keep = keep & (km != 0)[None, :]
    if MASK_KIND == 2:
        fm = tl.load(FMASK + b * s_fmb + h * s_fmh + offs_m.to(tl.int64)[:, None] * s_fmm + offs_n[None, :],
                     mask=m_ok[:, None] & n_ok[None, :], other=0)
        keep = keep & (fm != 0)
    s2 = tl.where(keep, s2, float("-inf"))
    if MASK_KIND != 0:
        uni = tl.load(UNI + b * s_unb + h * s_unh + offs_m, mask=m_ok, other=0) != 0
        s2 = tl.where(uni[:, None] & n_ok[None, :], 0.0, s2)
    return s2, uni


@triton.jit
def _scores(q, k, C2P_bh, P2C_bh, TABLE, offs_m, offs_n, start_m, start_n, b, h, Lq, Lk, NSLOT,
            band_lo, band_hi, qk_scale, KMASK, FMASK, UNI, s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh,
            HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, MASK_KIND: tl.constexpr,
            UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Masked log2-domain scores of one tile from ``q [BLOCK_M, BLOCK_D]`` and ``k [BLOCK_N, BLOCK_D]``."""
    s = _mm(q, tl.trans(k), UPCAST, PREC)
    if HAS_C2P or HAS_P2C:
        s += _bias_tile(C2P_bh, P2C_bh, TABLE, offs_m, offs_n, start_m, start_n, Lq, Lk, NSLOT,
                        band_lo, band_hi, HAS_C2P, HAS_P2C, BLOCK_M, BLOCK_N)
    return _mask_tile(s * qk_scale, b, h, offs_m, offs_n, Lq, Lk, KMASK, FMASK, UNI,
                      s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh, MASK_KIND)


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, p_drop):
    """Keep-mask ``[BLOCK_M, BLOCK_N]`` of attention dropout: Philox on the counters
    ``(j, i, b*H + h, 0)`` (each below 2**32 for any length), keep where ``u >= p_drop``."""
    zero = tl.zeros([offs_m.shape[0], offs_n.shape[0]], dtype=tl.uint32)
    c0 = offs_n.to(tl.uint32)[None, :] + zero
    c1 = offs_m.to(tl.uint32)[:, None] + zero
    c2 = bh.to(tl.uint32) + zero
    r, _, _, _ = tl.philox(seed, c0, c1, c2, zero)
    return tl.uint_to_uniform_float(r) >= p_drop


@triton.jit
def _segment_scan(ds, run, d, ok, has_prev, has_next, TABLE, START, END, rows, Lk, AXIS: tl.constexpr):
    """Deterministic per-slot sums of ``ds`` along ``AXIS`` without atomics.

    Along a row (``AXIS=1``, j increasing) or a column (``AXIS=0``, i increasing) the slot of
    ``d`` is monotone, so each slot covers one contiguous segment.  With ``incl`` the running
    inclusive prefix sum (``run`` carries it across tiles), the first element of a segment
    stores ``incl - ds`` to ``START[row, slot]`` and the last stores ``incl`` to
    ``END[row, slot]``; each location is written once, and ``END - START`` is the segment sum.
    ``ok``: in-range elements (``ds`` must be 0 elsewhere); ``has_prev`` / ``has_next``: the
    element has a neighbour before / after it along ``AXIS``; ``rows``: int64 offsets
    ``row * NSLOT`` of the other axis.  Returns the new ``run``.
    """
    # the neighbour before the element along AXIS has d + STEP, the one after d - STEP
    STEP: tl.constexpr = 2 * AXIS - 1
    slot = tl.load(TABLE + (d + Lk - 1), mask=ok, other=0)
    prev = tl.load(TABLE + (d + STEP + Lk - 1), mask=ok & has_prev, other=-1)
    nxt = tl.load(TABLE + (d - STEP + Lk - 1), mask=ok & has_next, other=-1)
    incl = tl.cumsum(ds, axis=AXIS) + tl.expand_dims(run, AXIS)
    ptr = tl.expand_dims(rows, AXIS) + slot
    tl.store(START + ptr, incl - ds, mask=ok & (prev != slot))
    tl.store(END + ptr, incl, mask=ok & (nxt != slot))
    return run + tl.sum(ds, axis=AXIS)
