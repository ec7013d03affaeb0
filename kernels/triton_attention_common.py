"""Inner-loop helpers shared by the Triton forward and backward kernels.

Conventions of every kernel (one program = one tile row of one ``(b, h)``):

* ``offs_m`` query rows ``[BLOCK_M]``, ``offs_n`` key columns ``[BLOCK_N]``; ``d = i - j``.
* ``C2P`` is ``Q @ pos_key^T`` and ``P2C`` is ``K @ pos_query^T``, float32 ``[B, H, L, NSLOT]``
  (``NSLOT = 2*span``), precomputed on the host; a tile gathers ``C2P[i, slot(d)]`` and
  ``P2C[j, slot(d)]`` with ``slot(d) = TABLE[d + Lk - 1]``.  Tiles whose every ``d`` lies at or
  beyond ``band_hi`` (slot ``NSLOT-1``) or at or below ``band_lo`` (slot 0) read one column of
  the tables instead (per-row / per-column constants, no gather): see :func:`_tile_regions`.  The
  backward's per-distance run sums: :func:`_advance_runs`.
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
def _block_tile(BASE, rows, s_row, offs_d, mask):
    """:func:`_tile` for rows within one ``(b, h)`` block (or one packed sequence) of ``BASE``: int32 offsets,
    which the launcher bounds (``int32_index_problem``); a loop's loads cost a multiply-add per row, not a 64-bit
    product."""
    return tl.load(BASE + (rows[:, None] * s_row + offs_d[None, :]), mask=mask, other=0.0)


@triton.jit
def _rows_desc(BASE, rows, cols, s_row, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """A tensor descriptor of ``BASE``'s ``[rows, cols]`` (row stride ``s_row``, columns contiguous) read in
    ``[BLOCK_R, BLOCK_C]`` blocks: a TMA load on sm_90, 0 outside (the values of :func:`_block_tile`'s masked load).
    The launcher guarantees a 16-byte aligned ``BASE`` and row stride (``tma_problem``); at least one row, so that the
    descriptor is valid where a packed sequence has none (its loops then load nothing)."""
    return tl.make_tensor_descriptor(BASE, shape=[tl.maximum(rows, 1), cols], strides=[s_row, 1],
                                     block_shape=[BLOCK_R, BLOCK_C])


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr, acc=None):
    """``a @ b`` (+ ``acc``) accumulated in float32.  ``UPCAST``: operands to float32 first (the CPU interpreter
    mis-computes low-precision dots); ``PREC``: "ieee" or "tf32" for float32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


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
def _stat_planes(STATS, Lq, H_ALL, VARLEN: tl.constexpr):
    """The two planes of a float32 contiguous ``[2, ...]`` buffer: the softmax statistics ``STATS`` (``(ROWMAX,
    LOGSUM)``), or the padded backward's ``DELTA`` (``(DELTA, the dq kernel's LOGSUM)``).  Padded: a launch's own ``[2,
    B, H, Lq]`` buffer (a plane holds the grid's ``B*H`` rows of ``Lq``; :func:`_sequence` leaves ``Lq`` as it is);
    packed: a view of the launch's heads in the call's ``[2, H_ALL, Tq]`` (``Lq`` = ``Tq``, the total: call with the
    launch's ``Lq``, before :func:`_sequence` narrows it).  (One pointer, not two: the host makes no views per call.)"""
    if VARLEN:  # (H_ALL = 1 is specialized to a constant, which has no .to: a tensor first)
        plane = (tl.program_id(1) * 0 + H_ALL).to(tl.int64) * Lq
    else:
        plane = tl.num_programs(1).to(tl.int64) * Lq
    return STATS, STATS + plane


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


# How a tile gets its relative terms (constexpr ``REGION``).
GENERAL = tl.constexpr(0)  # any tile: c2p / p2c gathered per element through the slot table
SAT = tl.constexpr(1)  # a tile whose every d has one slot (beyond the band): per-row / per-column constants
INNER = tl.constexpr(2)  # a GENERAL tile strictly inside the backward's run band (``_advance_runs``): no end runs

# Distance tables (the kernels' ``DIST``, the launcher's ``REL_SOURCE = "distance"``; 0: slot tables).
DIST_PREDICATED = tl.constexpr(1)  # band tiles load their table tiles under row / key predicates; the key term's -inf
# from the key column (:func:`_key_col`): packed calls, and padded ones at a scale not safely > 0
DIST_KEYED = tl.constexpr(2)  # padded: each (b, h) block has every row a tile reads (``TPAD``-row blocks, pad rows
# finite), and P2C holds -inf on the keys masked or past the length, so band tiles load both tables unpredicated and
# take the key term from P2C alone (the key column unused there: no key-mask load once compiled); saturated tiles keep
# their key column (the -inf in P2C adds to its own, or is not loaded)


KMASK_PAD = 256  # zero rows / columns the host appends to a full mask (FMASK): at least any tile's BLOCK_M / BLOCK_N


@triton.jit
def _key_col(KMASK, b, offs_n, Lk, s_kmb, MASK_KIND: tl.constexpr):
    """Per key: 0, or -inf out of range or masked (MASK_KIND 1 / 3: ``KMASK [B, Lk]`` the caller's key mask, nonzero
    = attend, any dtype); float32 ``[BLOCK_N]``."""
    if MASK_KIND == 1 or MASK_KIND == 3:
        keep = tl.load(KMASK + b.to(tl.int64) * s_kmb + offs_n, mask=offs_n < Lk, other=0) != 0
        col = tl.where(keep, 0.0, float("-inf"))
    else:
        col = tl.where(offs_n < Lk, 0.0, float("-inf"))
    return col  # one return: two trip Triton 3.7's ConvertTritonToTritonGPU ("unresolved materialization")


@triton.jit
def _widen(x, UPCAST: tl.constexpr):
    """A loaded table tile in float32 (exact).  16-bit entries on the GPU are widened one by one in inline PTX
    (``cvt.f32.f16``; bf16: the upper half of a float32): with ``.to``, both Triton 3.6 and 3.7 moved the keyed
    distance tables through shared memory into the accumulator layout (sm_90 inference in-band 26.4 / 27.9 per element
    against 17.4 / 17.2; static, NOTES).  ``UPCAST`` (the interpreter, which runs no PTX): ``.to``."""
    if x.dtype == tl.float32 or UPCAST:
        return x.to(tl.float32)
    elif x.dtype == tl.float16:
        return tl.inline_asm_elementwise("cvt.f32.f16 $0, $1;", "=r,h", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("{ .reg .b16 z; mov.b16 z, 0; mov.b32 $0, {z, $1}; }", "=r,h", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _gather(ptrs, PTX: tl.constexpr):
    """``tl.load(ptrs)``, no mask, 32- or 16-bit elements; ``PTX``: as inline PTX (``ld.global.nc``), which Triton
    neither pipelines nor gives a layout of its own: a ``tl.load`` of a tile is a layout anchor, its result computed
    in a blocked layout and moved into the accumulator's through shared memory (the backward's in-band loops: the key
    term and ``ROWMAX - row_term``, two tiles of float32, each way); the inline loads take their users' layout."""
    if not PTX:
        return tl.load(ptrs)
    elif ptrs.dtype.element_ty == tl.int32:
        return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptrs], dtype=tl.int32,
                                         is_pure=True, pack=1)
    elif ptrs.dtype.element_ty == tl.float32:
        return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptrs], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [ptrs],
                                         dtype=ptrs.dtype.element_ty, is_pure=True, pack=1)


@triton.jit
def _rel_terms(col, C2P_bh, P2C_bh, TABLE, slot, offs_m, offs_n, Lq, Lk, NSLOT, qk_scale,
               HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, REGION: tl.constexpr, TRANS: tl.constexpr,
               dist, DIST: tl.constexpr, UPCAST: tl.constexpr, PTX_GATHER: tl.constexpr):
    """The relative terms of one tile, in log2 units: ``(key_term, row_term)``::

        key_term = fma(p2c, qk_scale, col)      row_term = c2p * qk_scale      (0 without the term)

    (Saturated tiles of 128 keys or more compute the key term as ``p2c * qk_scale`` on kept keys and select -inf on
    the others: the same values, ``fma(x, s, +0) = x * s`` but for the sign of a zero product, which no probability
    sees; a select, not ``-inf * qk_scale``, which is NaN or +inf at a scale <= 0.)

    One formula for every tile, so that a score has the same bits whichever tile (forward, dq or dK/dV tiling,
    either region) computes it; the backward recomputes the forward's probabilities from its statistics (see
    :func:`_score_mm`).  A score is ``t + row_term`` with ``t = fma(q.k, qk_scale, key_term)``, and every kernel
    computes a probability as ``exp2(t - (m - row_term))`` (``m``: the row's max), so that on saturated tiles the
    row term costs per row, not per element.

    ``GENERAL``: ``c2p = C2P[i, slot(d)]`` and ``p2c = P2C[j, slot(d)]`` (float32, or 16-bit widened: the
    launcher's ``TABLE_DTYPE``) gathered per element (``slot(d) = TABLE[d + Lk - 1]``), as tiles (``[BLOCK_M,
    BLOCK_N]``, ``[BLOCK_N, BLOCK_M]`` if ``TRANS``), unpredicated: a row past ``Lq`` reads row ``Lq - 1``'s
    entries and a key past ``Lk`` key ``Lk - 1``'s, finite values no result uses (such a key's term is the key
    column's -inf; such a row is never stored in the forward, and has probability 0 in the backward, whose
    ``LOGSUM`` there is +inf); ``PTX_GATHER`` (the backward's 16-bit kernels): as inline PTX loads
    (:func:`_gather`), which a multi-stage loop does not prefetch.  Tiles run only where both lengths are > 0.
    ``DIST`` (the launcher's ``REL_SOURCE = "distance"`` experiment, ``dist = (dist0, dist1, NSLOT - 1)``): the
    tables have a column per distance of ``[dist0, dist1]`` (every distance a tile of the launch reaches; ``NSLOT =
    dist1 - dist0 + 1``, all three multiples of 16 but ``NSLOT``), P2C's in increasing order, ``P2C[j, d - dist0]``,
    C2P's in decreasing order, ``C2P[i, dist1 - d]``: an element's addresses are then ``j (NSLOT - 1) + i - dist0``
    and ``i (NSLOT - 1) + j + dist1``, unit-stride along a tile's queries / keys, 16-byte aligned where the tile
    starts (so both load as vectors, like the K / V tiles); no slot-table load, and a row / key predicate only
    (constant along the vector); ``DIST_KEYED`` (padded calls at a scale > 0) no predicate either and, with P2C, no
    key column: ``key_term = p2c * qk_scale``, P2C being -inf on the keys masked or past the length (the launcher's
    tables), the same values. ``SAT``: every element has slot ``slot``: ``key_term [BLOCK_N]`` and ``row_term
    [BLOCK_M]``.  ``col``: :func:`_key_col`.

    HF's uniform rows (:func:`_uniform_rows`) are no special case here: the forward computes their output in a pass
    of its own, the backward gives them a ``LOGSUM`` of +inf (probability 0, no score gradient) and their dV a pass
    of its own."""
    m_ok = offs_m < Lq
    n_ok = offs_n < Lk
    zero = tl.zeros(offs_m.shape, dtype=tl.float32)
    if REGION == SAT:
        kt = col
        rt = zero
        if HAS_P2C:
            # (DIST_KEYED: P2C's -inf on masked keys is not read here, or adds to the key column's: the same values;
            # a key term from P2C alone cost +1.2 instructions per element in the sm_90 inference forward, the
            # product and the select then per element in the accumulator layout; static, NOTES)
            if offs_n.shape[0] >= 128:
                # the key mask as the load's predicate: the compare then stays in the load's layout (one per key and
                # thread there, not per key held in the accumulator layout: -2.3 instructions per element; narrower
                # tiles moved the load into the accumulator layout instead: +1 to +4; static, NOTES)
                keep = n_ok & (col == 0.0)
                p2c = tl.load(P2C_bh + offs_n * NSLOT + slot, mask=keep, other=0.0)
                kt = tl.where(keep, p2c.to(tl.float32) * qk_scale, float("-inf"))
            else:
                p2c = tl.load(P2C_bh + offs_n * NSLOT + slot, mask=n_ok, other=0.0)
                kt = tl.fma(p2c.to(tl.float32), qk_scale, col)
        if HAS_C2P:
            c2p_col = NSLOT - 1 - slot if DIST else slot  # (DIST: C2P's columns run down in distance)
            rt = tl.load(C2P_bh + offs_m * NSLOT + c2p_col, mask=m_ok, other=0.0).to(tl.float32) * qk_scale
    elif DIST and (HAS_C2P | HAS_P2C):
        dist0, dist1, nslot1 = dist
        kt, rt = tl.broadcast(_k_axis(col, TRANS), _q_axis(zero, TRANS))
        p2c_at = P2C_bh + (_k_axis(offs_n * nslot1, TRANS) + _q_axis(offs_m - dist0, TRANS))
        c2p_at = C2P_bh + (_q_axis(offs_m * nslot1, TRANS) + _k_axis(offs_n + dist1, TRANS))
        if DIST == DIST_KEYED:  # every row there (finite), the keys' -inf in P2C: no predicate, no key column
            if HAS_P2C:
                kt = _widen(tl.load(p2c_at), UPCAST) * qk_scale
            if HAS_C2P:
                rt = _widen(tl.load(c2p_at), UPCAST) * qk_scale
        else:
            if HAS_P2C:
                p2c = tl.load(p2c_at, mask=_k_axis(n_ok, TRANS), other=0.0)
                kt = tl.fma(p2c.to(tl.float32), qk_scale, kt)
            if HAS_C2P:
                rt = tl.load(c2p_at, mask=_q_axis(m_ok, TRANS), other=0.0).to(tl.float32) * qk_scale
    elif HAS_C2P | HAS_P2C:
        # rows / keys past the lengths read the last one's entries (finite, unused: see the docstring): no
        # predicate and no zero fill on the three gathers
        mc = tl.minimum(offs_m, Lq - 1)
        nc = tl.minimum(offs_n, Lk - 1)
        d = _q_axis(mc, TRANS) - _k_axis(nc, TRANS)
        ptx = PTX_GATHER and not UPCAST  # (the interpreter runs no PTX)
        slots = _gather(TABLE + (d + Lk - 1), ptx)
        kt, rt = tl.broadcast(_k_axis(col, TRANS), _q_axis(zero, TRANS))
        if HAS_P2C:
            p2c = _gather(P2C_bh + _k_axis(nc, TRANS) * NSLOT + slots, ptx)
            kt = tl.fma(p2c.to(tl.float32), qk_scale, kt)
        if HAS_C2P:
            rt = _gather(C2P_bh + _q_axis(mc, TRANS) * NSLOT + slots, ptx).to(tl.float32) * qk_scale
    else:
        kt, rt = tl.broadcast(_k_axis(col, TRANS), _q_axis(zero, TRANS))
    return kt, rt


@triton.jit
def _tile_start(start, BLOCK: tl.constexpr, ROUND: tl.constexpr):
    """A walked tile's first row / key: every loop of ``_tile_regions`` / ``_inner_tiles`` that runs starts at a
    multiple of ``BLOCK`` (their bounds are multiples of it, or the length, where a loop is empty), which Triton cannot
    prove when the length is not a multiple of 16; with ``ROUND`` (distance tables, or the backward's run sums) it is
    rounded down to one (the same value), so that the tile loads and stores along the walked axis are vectors; were it
    not one, the tile would move and the exactness tests fail.  (``tl.multiple_of`` does not reach a loop's induction
    variable; rounding where nothing uses it cost ptxas registers: 8 B spilled by the D = 128 dq kernels, static.)"""
    if ROUND:
        start = start // BLOCK * BLOCK
    return start


@triton.jit
def _table_block(T, row0, L, NSLOT, BLOCKS: tl.constexpr, VARLEN: tl.constexpr, TPAD: tl.constexpr):
    """The first row of a ``(b, h)``'s rows in a per-row buffer of ``NSLOT`` columns (the C2P / P2C tables, the
    backward's run sums): ``row0`` (:func:`_sequence`), or with ``BLOCKS`` (padded distance tables, padded run sums)
    the launch's ``(b, h)`` index times ``L`` rounded up to ``TPAD`` rows (a multiple of 16, for the tables also of
    every tile of the launcher's plan, which pads each block so): Triton can prove it 16-byte aligned, so
    unit-stride addresses are vector loads and stores at any ``L``, and no tile reads past its block (packed rows
    start at any token: neither holds)."""
    if BLOCKS and not VARLEN:
        return T + tl.program_id(1).to(tl.int64) * ((L + TPAD - 1) // TPAD * TPAD) * NSLOT
    else:
        return T + row0 * NSLOT


@triton.jit
def _sat_columns(band_lo, band_hi, NSLOT, dist0, dist1, NSLOT1, DIST: tl.constexpr):
    """``(col_lo, col_hi, dist)``: the table columns (P2C's; C2P's under ``DIST`` mirrored, :func:`_rel_terms`) that
    saturated tiles read, at or below ``band_lo`` / at or beyond ``band_hi`` (slots 0 / ``NSLOT - 1``, or with
    distance tables those distances' columns), and :func:`_rel_terms`' ``dist`` (zeros without distance tables)."""
    if DIST:
        return (tl.minimum(tl.maximum(band_lo - dist0, 0), NSLOT - 1),
                tl.minimum(tl.maximum(band_hi - dist0, 0), NSLOT - 1), (dist0, dist1, NSLOT1))
    else:
        return 0, NSLOT - 1, (0, 0, 0)


@triton.jit
def _uniform_rows(UNI, b, h, offs_m, Lq, s_unb, s_unh, MASK_KIND: tl.constexpr):
    """HF's uniform rows (with a mask): bool ``[BLOCK_M]``, all False without mask.  MASK_KIND 1 / 2: the rows
    flagged (nonzero) in ``UNI [B, 1|H, Lq]``; 3 (a key mask, ``Lq == Lk``): the rows of the keys masked (0) in ``UNI``,
    the key mask itself.  Their every in-range key scores 0 (HF's fully masked rows: HF's softmax over constant
    scores)."""
    uni = offs_m < 0
    if MASK_KIND == 3:
        uni = tl.load(UNI + b.to(tl.int64) * s_unb + offs_m, mask=offs_m < Lq, other=1) == 0
    elif MASK_KIND != 0:
        uni = tl.load(UNI + b.to(tl.int64) * s_unb + h.to(tl.int64) * s_unh + offs_m, mask=offs_m < Lq, other=0) != 0
    return uni


@triton.jit
def _masked(t, b, h, offs_m, offs_n, FMASK, s_fmb, s_fmh, s_fmm, MASK_KIND: tl.constexpr, TRANS: tl.constexpr):
    """The mask not folded into the key term: MASK_KIND 2, full ``FMASK [B|1, 1|H, Lq + KMASK_PAD, >= Lk + KMASK_PAD]``
    uint8 (broadcast dims have stride 0; 0 beyond ``(Lq, Lk)``, so a tile reads it without range predicates), read
    per element: -inf on ``t`` where it is 0.  Returns ``t``."""
    if MASK_KIND == 2:
        fm = tl.load(FMASK + b.to(tl.int64) * s_fmb + h.to(tl.int64) * s_fmh
                     + _q_axis(offs_m.to(tl.int64), TRANS) * s_fmm + _k_axis(offs_n, TRANS))
        t = tl.where(fm != 0, t, float("-inf"))
    return t


@triton.jit
def _tile_regions(start, span_other, band_lo, band_hi, lim, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """Split a program's walk over tiles ``[0, lim)`` (step ``BLOCK``) at ``(a, b)``: ``[0, a)`` and ``[b, lim)``
    are saturated (``SAT``), ``[a, b)`` is ``GENERAL``.

    ``ROWS`` True: the program owns query rows ``[start, start+span_other)`` and walks key tiles (forward, dq):
    ``[0, a)`` has ``d >= band_hi`` (slot ``NSLOT-1``, small j), ``[b, lim)`` ``d <= band_lo`` (slot 0).  False: it
    owns keys ``[start, start+span_other)`` and walks query tiles (dK/dV): ``[0, a)`` has slot 0 (small i),
    ``[b, lim)`` slot ``NSLOT-1``."""
    if ROWS:
        # d >= band_hi: (t+1)*BLOCK <= start - band_hi + 1
        # d <= band_lo: t*BLOCK >= start + span_other - 1 - band_lo
        a = (tl.maximum(start - band_hi + 1, 0) // BLOCK) * BLOCK
        b = ((tl.maximum(start + span_other - 1 - band_lo, 0) + BLOCK - 1) // BLOCK) * BLOCK
    else:
        # d_max = t*BLOCK + BLOCK - 1 - start <= band_lo;  d_min = t*BLOCK - (start + span_other - 1) >= band_hi
        a = (tl.maximum(start + band_lo + 1, 0) // BLOCK) * BLOCK
        b = ((tl.maximum(start + span_other - 1 + band_hi, 0) + BLOCK - 1) // BLOCK) * BLOCK
    a = tl.minimum(a, lim)
    b = tl.minimum(tl.maximum(b, a), lim)
    return a, b


@triton.jit
def _inner_tiles(start, span_other, d_lo, d_hi, a, b, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """The tiles ``[e1, e2)`` (within ``[a, b)``, the ``GENERAL`` ones of :func:`_tile_regions`) whose every
    distance lies in ``[d_lo, d_hi]`` (the backward's ``INNER`` tiles, :func:`_advance_runs`).  ``ROWS``: as in
    :func:`_tile_regions`."""
    if ROWS:
        # d_max = start + span_other - 1 - t*BLOCK <= d_hi;  d_min = start - (t+1)*BLOCK + 1 >= d_lo
        e1 = ((tl.maximum(start + span_other - 1 - d_hi, 0) + BLOCK - 1) // BLOCK) * BLOCK
        e2 = (tl.maximum(start + 1 - d_lo, 0) // BLOCK) * BLOCK
    else:
        # d_min = t*BLOCK - (start + span_other - 1) >= d_lo;  d_max = (t+1)*BLOCK - 1 - start <= d_hi
        e1 = ((tl.maximum(start + span_other - 1 + d_lo, 0) + BLOCK - 1) // BLOCK) * BLOCK
        e2 = (tl.maximum(start + 1 + d_hi, 0) // BLOCK) * BLOCK
    e1 = tl.minimum(tl.maximum(e1, a), b)
    e2 = tl.minimum(tl.maximum(e2, e1), b)
    return e1, e2


@triton.jit
def _advance_runs(ds, run_lo, run_hi, offs_m, offs_n, Lq, Lk, SUMS, rows, cc, run0, NRUN,
                  REGION: tl.constexpr, HI: tl.constexpr, TRANS: tl.constexpr):
    """The run sums of one tile along its walking axis (axis 1: keys for dq, queries for dK/dV with ``TRANS``;
    runs of :func:`deberta_fast.positions.distance_runs`: run ``clamp(d + run0, 0, NRUN - 1)``).  Along a row
    ``d`` takes every value once, so a run strictly inside ``(0, NRUN - 1)`` holds one element of the row: it is
    stored as it is (one writer per location, no scan, no atomic).  The two end runs (the constant ends of the slot
    table) are sums, carried per row in ``run_lo`` / ``run_hi`` and stored by :func:`_finish_runs`: a ``SAT``
    tile adds its row sums to one of them (``HI``: the end of slot ``NSLOT - 1``), a ``GENERAL`` tile adds its
    elements beyond the band to them, an ``INNER`` tile has none.  Returns ``(run_lo, run_hi)``.

    Layout: rows of ``RS1 + 1`` columns (``rows``: the tile's rows times ``RS1``, a multiple of 16), run ``r`` of a
    row in column ``cc + run0 - r`` (dq's ``CSUM``: runs descending) or ``cc - run0 + r`` (dK/dV's ``PSUM``), so that
    an element's location is ``row * RS1 + (its index along the walk) + cc``: unit-stride along the walk (keys in dq,
    queries in dK/dV) and 16-byte aligned where a tile starts (``cc`` a multiple of 16), so the stores are vectors
    (the launcher's ``_sums_layout``; with runs in columns ``r`` the stores went element by element, each with its
    own 64-bit address: static, NOTES)."""
    if REGION == SAT:
        if HI:
            run_hi += tl.sum(ds, 1)
        else:
            run_lo += tl.sum(ds, 1)
    else:
        ok = _q_axis(offs_m < Lq, TRANS) & _k_axis(offs_n < Lk, TRANS)
        rid = _q_axis(offs_m, TRANS) - _k_axis(offs_n, TRANS) + run0
        at = SUMS + (rows[:, None] + (offs_m if TRANS else offs_n)[None, :] + cc)
        if REGION == INNER:
            tl.store(at, ds, mask=ok)
        else:
            tl.store(at, ds, mask=ok & (rid > 0) & (rid < NRUN - 1))
            run_lo += tl.sum(tl.where(rid <= 0, ds, 0.0), 1)  # ds is 0 outside the matrix
            run_hi += tl.sum(tl.where(rid >= NRUN - 1, ds, 0.0), 1)
    return run_lo, run_hi


@triton.jit
def _finish_runs(run_lo, run_hi, ok, d_first, d_last, SUMS, rows, k0, sgn, run0, NRUN, FILL: tl.constexpr,
                 CH: tl.constexpr):
    """Store the end runs of :func:`_advance_runs` (``ok``: rows in range; ``rows``: the rows' first locations, run
    ``r`` in column ``k0 + sgn * r``); 0 where a row has no such distance.
    ``FILL``: also store 0 to the in-band runs a row has no element for, the distances below ``d_first`` / above
    ``d_last`` (per row: its first and last distance), so that the launcher need not zero-fill ``SUMS`` (every
    location of the row is then written once: by a tile, by this fill or as an end run).  Only rows near the
    sequence's ends have such distances; ``CH`` columns per store."""
    tl.store(SUMS + rows + k0, run_lo, mask=ok)
    tl.store(SUMS + rows + (k0 + sgn * (NRUN - 1)), run_hi, mask=ok)
    if FILL:
        zero = tl.zeros([rows.shape[0], CH], dtype=tl.float32)
        first = tl.where(ok, d_first + run0, 0)  # runs [1, first) and (last, NRUN - 1) are missing
        last = tl.where(ok, d_last + run0, NRUN)
        for c0 in range(1, tl.minimum(tl.max(first, 0), NRUN - 1), CH):
            cols = c0 + tl.arange(0, CH)
            tl.store(SUMS + rows[:, None] + (k0 + sgn * cols)[None, :], zero,
                     mask=(cols[None, :] < first[:, None]) & (cols[None, :] < NRUN - 1))
        for c0 in range(tl.maximum(tl.min(last, 0) + 1, 1), NRUN - 1, CH):
            cols = c0 + tl.arange(0, CH)
            tl.store(SUMS + rows[:, None] + (k0 + sgn * cols)[None, :], zero,
                     mask=(cols[None, :] > last[:, None]) & (cols[None, :] < NRUN - 1))


@triton.jit
def _rounded(x, OUT, UPCAST: tl.constexpr):
    """Float32 ``x`` in the element type of pointer ``OUT``, rounded to nearest even as ``Tensor.to`` rounds: on a GPU
    the conversion's own ``cvt.rn``; under the interpreter (``UPCAST``), whose float32 -> bfloat16 conversion
    truncates, bfloat16 by integer arithmetic (a NaN stays a quiet NaN)."""
    if UPCAST and OUT.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(x != x, bits | 0x400000, bits + 0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(OUT.dtype.element_ty)


@triton.jit
def _dropout_seed(SEED, DROPOUT: tl.constexpr):
    """The call's Philox key: the int64 at ``SEED``, read only with dropout.  A device tensor, not a launch argument,
    so that a captured CUDA graph reads the seed each replay draws."""
    if DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0
    return seed


@triton.jit
def _philox(seed, c0, c1, c2, c3):
    """Philox4x32-10 of counters ``c0..c3`` (uint32 tensors of one shape) under key ``seed`` (int64: low, high
    word), the words ``tl.philox`` returns; each round's two 32x32-bit products as one 64-bit product: ptxas makes
    most of them one ``IMAD.WIDE.U32`` where ``tl.philox``'s ``umulhi`` and ``mul`` are two instructions (sm_90 SASS,
    2026-12-06; benchmarks/NOTES.md "Dropout: Philox on 64-bit products, then a stream the accumulator layout
    holds")."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(10):
        p0 = c0.to(tl.uint64) * 0xD2511F53
        p1 = c2.to(tl.uint64) * 0xCD9E8D57
        c0, c1, c2, c3 = ((p1 >> 32).to(tl.uint32) ^ c1 ^ k0, p1.to(tl.uint32),
                          (p0 >> 32).to(tl.uint32) ^ c3 ^ k1, p0.to(tl.uint32))
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _kept(x, keep, UPCAST: tl.constexpr):
    """``where(keep, x, 0)`` for a float32 ``x`` headed for a 16-bit MMA operand, as a select the compiler cannot
    move: after ``tl.where`` LLVM sinks the select past the conversion and selects 16-bit halves of the packed pairs
    (two byte permutes per pair to take the halves out and one to pack them: sm_90 fp16 D = 64 training forward
    25.19 -> 23.94 instructions per element on saturated tiles with this; static, NOTES).  ``UPCAST`` (the
    interpreter, which runs no PTX): ``tl.where``."""
    if UPCAST:
        return tl.where(keep, x, 0.0)
    else:
        return tl.inline_asm_elementwise("selp.f32 $0, $1, 0f00000000, $2;", "=r,r,b", [x, keep], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _call_counters(offs_m, start_n, drop_thresh, BLOCK_N: tl.constexpr):
    """:func:`_dropout_keep`'s thresholds and Philox counters: ``(lo, hi, qc [IB, 8], kc [JB, 4])``, ``lo`` the
    threshold of a low half, ``hi`` of a high half (a high half ``h >= t`` iff its word ``>= t * 2**16``: no shift
    per element), ``qc`` the query counters of the tile's row blocks of 16, ``kc`` the key counters."""
    IB: tl.constexpr = offs_m.shape[0] // 16
    JB: tl.constexpr = BLOCK_N // 16
    lo = drop_thresh.to(tl.uint32)
    m16 = tl.max(tl.reshape(offs_m, [IB, 16]) // 16, 1).to(tl.uint32)  # the row blocks of 16
    qc = (m16 * 8)[:, None] + tl.arange(0, 8)[None, :].to(tl.uint32)
    kc = ((start_n // 16 + tl.arange(0, JB)) * 4)[:, None].to(tl.uint32) + tl.arange(0, 4)[None, :].to(tl.uint32)
    return lo, lo << 16, qc, kc


@triton.jit
def _dropout_keep(seed, bh, offs_m, start_n, drop_thresh, BLOCK_N: tl.constexpr, TRANS: tl.constexpr):
    """Keep-mask ``[BLOCK_M, BLOCK_N]`` (``TRANS``: its transpose, built in that orientation) of attention dropout,
    the CUDA kernels' stream (``tests/philox_ref.py``): one Philox4x32-10 call, key ``seed``, counter ``(4 (j // 16)
    + (j // 2) % 4, 8 (i // 16) + i % 8, b*H + h, 0)``, serves queries ``i, i + 8`` by keys ``j, j + 1, j + 8, j +
    9``, the 8 elements one thread holds in the MMA accumulator layout; element ``(i, j)`` takes word ``2 ((i // 8) %
    2) + (j // 8) % 2``, 16-bit half ``j % 2`` (low for even ``j``), kept iff the half is ``>= drop_thresh = round(p
    * 2**16)``.  ``offs_m``: 16-aligned runs of 16 rows (``start + arange``); ``start_n``, ``BLOCK_N``: multiples
    of 16."""
    BM: tl.constexpr = offs_m.shape[0]
    if TRANS:  # calls [JB, 4, IB, 8]; rows j = 16 jb + 8 c + 2 jt + h, columns i = 16 ib + 8 hh + ir
        hi, qc, kc = _call_counters(offs_m, start_n, drop_thresh, BLOCK_N)[1:]
        zero = tl.zeros([BLOCK_N // 16, 4, BM // 16, 8], dtype=tl.uint32)
        w0, w1, w2, w3 = tl.philox(seed, kc[:, :, None, None] + zero, qc[None, None, :, :] + zero,
                                   bh.to(tl.uint32) + zero, zero)
        words = tl.join(tl.join(w0, w1), tl.join(w2, w3))  # [JB, 4, IB, 8, c, hh]: word 2 hh + c
        # [..., h]: the element's 16 bits on top, compared after the permute (in-band 63.75 -> 60.5 per element,
        # sm_90 fp16 D = 64 training, against comparing before it; the same in the forward's orientation gained none)
        halves = tl.join(words << 16, words)
        keep = tl.reshape(tl.permute(halves, (0, 4, 1, 6, 2, 5, 3)), [BLOCK_N, BM]) >= hi
    else:
        keep = _keep_tile(_keep_calls(seed, bh, offs_m, start_n, drop_thresh, BLOCK_N))
    return keep


@triton.jit
def _keep_tile(calls):
    """:func:`_keep_calls`' decisions as the ``[BM, BLOCK_N]`` tile."""
    BM: tl.constexpr = calls.shape[0] * 16
    BN: tl.constexpr = calls.shape[2] * 16
    return tl.reshape(tl.permute(calls, (0, 5, 1, 2, 4, 3, 6)), [BM, BN])


@triton.jit
def _keep_calls(seed, bh, offs_m, start_n, drop_thresh, BLOCK_N: tl.constexpr):
    """:func:`_dropout_keep`'s decisions by Philox call, ``[IB, 8, JB, 4, c, hh, h]`` (``IB = BM / 16``, ``JB =
    BLOCK_N / 16``): call ``(ib, ir, jb, jt)`` serves rows ``i = 16 ib + 8 hh + ir`` by columns ``j = 16 jb + 8 c + 2
    jt + h``, one thread's 8 elements in the MMA accumulator layout (the forward's and dq's orientation)."""
    lo, hi, qc, kc = _call_counters(offs_m, start_n, drop_thresh, BLOCK_N)
    zero = tl.zeros([offs_m.shape[0] // 16, 8, BLOCK_N // 16, 4], dtype=tl.uint32)
    w0, w1, w2, w3 = _philox(seed, kc[None, None, :, :] + zero, qc[:, :, None, None] + zero,
                             bh.to(tl.uint32) + zero, zero)
    words = tl.join(tl.join(w0, w1), tl.join(w2, w3))  # [IB, 8, JB, 4, c, hh]: word 2 hh + c
    return tl.join((words & 0xFFFF) >= lo, words >= hi)  # [..., h]


@triton.jit
def _store_keep_bytes(KB, calls, offs_m, start_n, LWB, UPCAST: tl.constexpr):
    """Store the dq kernel's decisions ``calls`` (:func:`_keep_calls`) for the dK/dV kernel (:func:`_keep_bytes`):
    a byte per call, bit ``4 c + 2 hh + h``, at ``KB[r * LWB + cq]`` with key row ``r = 4 (j // 16) + (j % 8) // 2``
    and query column ``cq = 8 (i // 16) + i % 8`` (``KB``: the ``(b, h)``'s block, :func:`_keep_block`, whose rows
    reach every key tile the dq kernel walks: no mask).  On a GPU as inline PTX (``st.global.u8``), which takes the
    calls' own layout (each thread stores its calls' bytes; a ``tl.store`` would move them through shared memory
    into a coalesced layout first); under the interpreter (``UPCAST``) ``tl.store``."""
    IB: tl.constexpr = calls.shape[0]
    JB: tl.constexpr = calls.shape[2]
    k_lo, k_hi = tl.split(calls)  # [..., c, hh] each: h = 0 / 1
    p0, p1 = tl.split(k_lo.to(tl.int32) + 2 * k_hi.to(tl.int32))  # [..., c]: hh = 0 / 1
    q0, q1 = tl.split(p0 + 4 * p1)  # c = 0 / 1
    byte = q0 + 16 * q1  # [IB, 8, JB, 4]
    m16 = tl.max(tl.reshape(offs_m, [IB, 16]) // 16, 1)
    cq = (m16 * 8)[:, None] + tl.arange(0, 8)[None, :]  # [IB, 8]
    r = ((start_n // 16 + tl.arange(0, JB)) * 4)[:, None] + tl.arange(0, 4)[None, :]  # [JB, 4]
    ptrs = KB + (r[None, None, :, :] * LWB + cq[:, :, None, None])
    if UPCAST:
        tl.store(ptrs, byte.to(tl.int8))
    else:
        tl.inline_asm_elementwise("st.global.u8 [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r", [ptrs, byte],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _keep_bytes(KB, offs_n, offs_m, start_m, Lq, Lk, LWB):
    """The dK/dV tile's dropout decisions ``[BN, BM]`` (keys ``offs_n`` by queries ``offs_m = start_m + arange(BM)``,
    16-aligned) from the dq kernel's bytes (:func:`_store_keep_bytes`), no Philox call: per key and 16 queries the 8
    bytes of its key row (``ir = 0 .. 7``) as two int32 vectors over the keys, then per element a select, an and and
    a compare in the accumulator layout.  Keys past ``Lk`` and groups of 16 queries past ``Lq`` (a dK/dV query tile
    wider than dq's reaches bytes dq never wrote): not kept (their probability is 0 anyway), not read."""
    BM: tl.constexpr = offs_m.shape[0]
    KW = KB.to(tl.pointer_type(tl.int32), bitcast=True)  # (LWB and each block's first byte: multiples of 4)
    n_ok = offs_n < Lk
    row = KW + ((offs_n // 16) * 4 + (offs_n % 8) // 2) * (LWB // 4) + (start_m // 16) * 2
    bit = (4 * ((offs_n // 8) % 2) + offs_n % 2)[:, None] + (8 * (offs_m % 4) + 2 * ((offs_m // 8) % 2))[None, :]
    upper = (offs_m % 8 >= 4)[None, :]  # bytes ir = 4 .. 7: the second int32
    group = (offs_m - start_m)[None, :] // 16
    word = tl.where(upper, tl.load(row + 1, mask=n_ok, other=0)[:, None], tl.load(row, mask=n_ok, other=0)[:, None])
    for g in tl.static_range(1, BM // 16):
        ok = n_ok & (start_m + 16 * g < Lq)
        w = tl.where(upper, tl.load(row + 2 * g + 1, mask=ok, other=0)[:, None],
                     tl.load(row + 2 * g, mask=ok, other=0)[:, None])
        word = tl.where(group == g, w, word)
    return (word & (1 << bit)) != 0


@triton.jit
def _keep_block(KB, b, h, k0, RH, LWB, KT: tl.constexpr, VARLEN: tl.constexpr):
    """The first byte of a program's dropout decisions (:func:`_store_keep_bytes`): rows of ``LWB`` bytes, ``RH``
    per ``(b, h)`` (padded: ``Lk`` rounded up to ``KT`` keys, a 4th of those), or packed ``RH`` per head and sequence
    ``b``'s from row ``(k0 + KT b) // 4`` (so at least ``KT ceil(Lk / KT) / 4`` rows before the next sequence's).
    ``KT``: a multiple of the dq kernel's key tiles."""
    if VARLEN:
        row0 = h.to(tl.int64) * RH + (k0 + KT * b) // 4
    else:
        row0 = tl.program_id(1).to(tl.int64) * RH
    return KB + row0 * LWB
