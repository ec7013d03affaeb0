"""Host launch functions of the Triton disentangled-attention kernels (no autograd here).

:func:`attention_forward` -> ``(out [B,H,Lq,D], stats float32 [2,B,H,Lq])``;
:func:`attention_backward` -> ``(dq, dk, dv, dpos_key | None, dpos_query | None)``.
``stats`` are the softmax statistics the backward needs (row max and log2 row sum of the log2-domain
scores, see :mod:`.triton_attention_fwd`); :func:`lse_from_stats` gives the natural log-sum-exp.
Masks: ``key_mask`` ``[B,Lk]`` as the caller gave it (nonzero = attend; read by the kernels, a non-bool one after
one ``!= 0``), with ``uniform_rows`` bool ``[B,1|H,Lq]`` or, when ``Lq == Lk``, None (the kernels read HF's uniform
rows from the key mask); or ``full_mask`` bool ``[B|1,1|H,Lq,Lk]`` plus ``uniform_rows``
(:func:`deberta_fast.reference.normalize_mask`).

Packed sequences (same kernels with ``VARLEN=True``): :func:`attention_forward_varlen` ->
``(out [Tq,H,D], stats float32 [2,H,Tq])``; :func:`attention_backward_varlen` -> the same five
gradients.  ``cu_seqlens_q``/``cu_seqlens_k`` int32 ``[N+1]`` (contiguous) must start at 0, never
decrease, end at the token counts, and every sequence must fit ``max_seqlen_q``/``max_seqlen_k``:
:func:`deberta_fast.dispatch.check_varlen_offsets` checks that before these run (no check here: no
device sync).  The kernels clamp offsets into the tensors and lengths to the max_seqlen values, so
invalid offsets that reach them give wrong rows but never an access out of bounds.

Calls whose tables would exceed :data:`TABLE_BUDGET` run their heads in groups (:func:`head_groups`).
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, replace

import torch
import triton

from deberta_fast._env import getenv, interpreting, switch
from deberta_fast._linalg import add_product_
from deberta_fast.positions import distance_runs, table_band, trimmed_slot_table

from .triton_attention_bwd import disentangled_bwd_dkdv_kernel, disentangled_bwd_dq_kernel
from .triton_attention_common import DIST_KEYED, DIST_PREDICATED, KMASK_PAD
from .triton_attention_fwd import disentangled_fwd_kernel


_TF32_GETTER = getattr(torch._C, "_get_cublas_allow_tf32", None)


def _allow_tf32() -> bool:
    """``torch.backends.cuda.matmul.allow_tf32``, through the getter it returns (the attribute's ``__getattr__``
    costs ~0.6 us a call, measured on the 2-core CPU machine, 2026-12-05)."""
    return _TF32_GETTER() if _TF32_GETTER is not None else torch.backends.cuda.matmul.allow_tf32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (``triton.next_power_of_2`` / ``triton.cdiv`` are constexpr functions
    costing ~6 us of host time per call, measured on the 2-core CPU machine, 2026-12-02; this path runs on every
    attention call)."""
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class LaunchConfig:
    """``sat_block_n``: the forward's saturated loop walks key tiles this wide (a multiple of ``block_n``; 0:
    ``block_n``); its tiles need fewer registers than the band's gathers, and a wider tile spreads the loop's fixed
    cost over more scores.  The backward kernels ignore it.  ``max_regs``: ptxas's register limit per thread
    (Triton's ``maxnreg``; 0: ptxas's own choice, which for some kernels is 168 registers with a few bytes spilled
    where 255 would hold them: static profile, NOTES "Spills at ptxas's own register target")."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    sat_block_n: int = 0
    max_regs: int = 0


@dataclass(frozen=True)
class BackwardConfig:
    """The backward's two kernels tile independently: ``dq`` (a program owns ``BLOCK_M`` query rows and walks
    key tiles) and ``dkdv`` (a program owns ``BLOCK_N`` keys and walks query tiles)."""
    dq: LaunchConfig
    dkdv: LaunchConfig


def launch_config(pass_: str, q_len: int, k_len: int, head_dim: int, fp32_ieee: bool = False, *, tf32: bool = False,
                  arch: int = 90, varlen: bool = False, dropout: bool = False, full_mask: bool = False):
    """Tile sizes keyed on the pass, padded head dim, bucketed lengths, the precision (``fp32_ieee``: float32
    inputs without TF32: FMA products, no tensor cores, tiles of twice the registers; ``tf32``: float32 tiles on
    tensor cores), the GPU architecture (``arch``: compute capability as ``10*major + minor``; sm_8x and sm_9x+ get
    configs of their own: mma.sync and wgmma code differ in registers, and sm_86 / sm_89 have 99 KB of shared
    memory per block), packed sequences, dropout and a full mask (all three add registers): a :class:`LaunchConfig`
    for ``"fwd"``, a :class:`BackwardConfig` for ``"bwd"``.  One fixed config under the interpreter (autotuning
    does not run there).
    GPU values: spill-free starting points from the static profile, timed on an H200 only for the sm_90 padded
    forward at D = 64, L = 512 so far (benchmarks/NOTES.md)."""
    if interpreting():
        return _INTERPRETER_CONFIG[pass_]
    # aligned: both lengths multiples of 16, which the launch specialization marks (a kernel of its own)
    aligned = not varlen and q_len % 16 == 0 and k_len % 16 == 0
    return _gpu_config(pass_, max(16, _next_pow2(head_dim)), max(q_len, k_len) <= 64, bool(fp32_ieee), bool(tf32),
                       90 if arch >= 90 else 80, bool(varlen), bool(dropout), bool(full_mask) and not varlen, aligned)


_SHIPPED_LAUNCH_CONFIG = launch_config  # _fwd_plan caches plans only while this is the launch config

# (major, minor) of the compiler: a few configs spill under one version and not the other (``_fp32_config``)
_TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])

_INTERPRETER_CONFIG = {"fwd": LaunchConfig(32, 32, 1, 1, 64),
                       "bwd": BackwardConfig(LaunchConfig(32, 32, 1, 1), LaunchConfig(32, 32, 1, 1))}

_TARGET_ARCH = [90]  # the arch of launches on non-CUDA tensors (the compile check's captures): see target_arch
_DEVICE_ARCH: dict = {}


def device_arch(device: torch.device) -> int:
    """``10*major + minor`` of a CUDA device (cached: host time), else the compile check's target (default 90)."""
    if device.type != "cuda":
        return _TARGET_ARCH[0]
    arch = _DEVICE_ARCH.get(device)
    if arch is None:
        major, minor = torch.cuda.get_device_capability(device)
        arch = _DEVICE_ARCH[device] = 10 * major + minor
    return arch


@contextlib.contextmanager
def target_arch(arch: int):
    """Within the block, launches on non-CUDA tensors pick the configs of ``arch`` (the compile check captures the
    launches of each target it compiles for)."""
    old = _TARGET_ARCH[0]
    _TARGET_ARCH[0] = int(arch)
    try:
        yield
    finally:
        _TARGET_ARCH[0] = old


@functools.lru_cache(maxsize=None)
def _gpu_config(pass_: str, bd: int, short: bool, fp32_ieee: bool = False, tf32: bool = False, family: int = 90,
                varlen: bool = False, dropout: bool = False, full_mask: bool = False, aligned: bool = True):
    """The GPU configs, from the static profile (sm_80 for ``family`` 80, sm_90 for 90; DeBERTa launches: c2p+p2c,
    key mask or packed, with and without dropout; benchmarks/results/2026-12-02-static and NOTES "Spill-free configs
    per architecture").  Every one compiles with 0 spill bytes there unless its comment says otherwise; which is
    fastest is a GPU measurement (``benchmarks.tune_configs``), made so far for the sm_90 padded forward at D = 64,
    L = 512 only (2 stages, see below)."""
    if fp32_ieee:
        return _fp32_config(pass_, bd, family)
    if pass_ == "fwd":
        cfg = _fwd_config(bd, tf32, family, varlen, dropout)
        if family == 90 and not tf32 and not varlen and 16 < bd <= 64 and (bd == 32 or not aligned):
            # the measured 64x64 tiles on 2 stages (D = 64, lengths multiples of 16, key mask) spilled 32 - 72 B
            # at D = 32 and at ragged lengths (static, 2026-12-05: 68 B at L = 200 without dropout); 64x32 on 2
            # stages with the same saturated tiles: 0 B, at +0 - 25 % in-band instructions per element (not timed)
            cfg = LaunchConfig(64, 32, 4, 2, cfg.sat_block_n)
        if family == 80 and not tf32 and not varlen and 16 < bd <= 64 and dropout and not aligned:
            # sm_8x at ragged lengths with dropout: 64-key saturated tiles spilled 4 B (triton 3.7.1) / 8 B (3.6.0);
            # 32-key ones none, +2 instructions per element there (2026-12-05)
            cfg = replace(cfg, sat_block_n=0)
        return _full_mask_fwd(cfg, bd, tf32, family, dropout, aligned) if full_mask else cfg
    cfg = _bwd_config(bd, tf32, family, varlen, dropout)
    if full_mask and family == 90 and not tf32 and 16 < bd <= 64:
        # sm_90 dK/dV with a full mask at 32x32: 8-52 B spilled with dropout (2026-12-04); 32x16 (sm_8x's) none,
        # but 4 B without dropout at ptxas's own 168 registers since the aligned run sums (2026-12-05): up to 255
        return BackwardConfig(dq=cfg.dq, dkdv=LaunchConfig(32, 16, 4, 2, 0, 255))
    if full_mask and family == 80 and cfg.dq.block_m == 64:
        # sm_8x with a full mask, with or without dropout, at any length: the spills were found with dropout at
        # ragged lengths (2026-12-05: dq 64x32 24 B (3.7.1), dK/dV 16x64 12 B (3.6.0); the 32x32 / 32x16 tiles
        # none), and the smaller tiles serve the rest too (untimed).  (dq with c2p + p2c: 4 B at ptxas's own
        # register target since the 64-bit Philox products, 2026-12-06: up to 255; dK/dV at a ragged length with
        # dropout: 4 B at its own target since it reads the dq kernel's dropout bytes, 2026-12-07: up to 255)
        return BackwardConfig(dq=LaunchConfig(32, 32, 4, 2, 0, 255), dkdv=LaunchConfig(32, 16, 4, 2, 0, 255))
    if dropout and family == 90 and not tf32 and not full_mask and bd > 32:
        return _sm90_dropout_bwd(cfg, bd, aligned, varlen)
    return cfg


def _sm90_dropout_bwd(cfg: BackwardConfig, bd: int, aligned: bool, varlen: bool) -> BackwardConfig:
    # sm_90 16-bit backward with dropout (8 keys per Philox call; the compile check's tiers, 2026-12-04).  These
    # kernels sit at 255 registers, and which stage count spills flips with the length specialization (lengths
    # multiples of 16 or not; packed lengths are runtime values) and the tile; spill-free, at about the same
    # instructions per element:
    #   D = 64 dK/dV 32x32: 1 stage aligned and packed (2 stages: 8 B), 2 stages at ragged lengths (1 stage: 12 B);
    #     since 2026-12-05 16x64 (_bwd_config), 0 B on 1 stage at every length;
    #   D = 128 dq 16x32: 2 stages aligned (1 stage: 4 B), 1 stage at ragged lengths and packed (2 stages: 4 B);
    #     since the aligned run sums (2026-12-05) 1 stage at ragged lengths spilled 8 B at ptxas's own 168
    #     registers: up to 255 allowed (0 B);
    #   D = 128 dK/dV 32x16: 1 stage (2 stages: 16 B);
    #   D = 256 dq: 32x32 / 2 stages at ragged lengths, 32x16 aligned (32x32: 4 B; +60 % instructions).
    if bd <= 64:  # padded: _bwd_config's 16x64 dK/dV, 0 B on 1 stage at every length; packed 32x32: 1 stage
        # spilled 4 B under triton 3.6.0, 2 stages 0 B under both (2026-12-05).  With the dropout stream in 2 x 4
        # blocks (2026-12-06) the 16x64 dK/dV on 1 stage spilled 4 B at ragged lengths under 3.6.0: 2 stages there
        # (0 B under both, key mask or none; a full mask has its own tiles)
        return cfg if aligned or varlen else BackwardConfig(dq=cfg.dq, dkdv=replace(cfg.dkdv, num_stages=2))
    if bd <= 128:  # (dK/dV: 8 B at ptxas's own 168 registers at ragged lengths since the backward's inline-PTX
        # gathers, 2026-12-07: up to 255, 0 B under both compilers)
        return BackwardConfig(dq=replace(cfg.dq, num_stages=2 if aligned else 1, max_regs=255),
                              dkdv=replace(cfg.dkdv, num_stages=1, max_regs=255))
    return BackwardConfig(dq=LaunchConfig(32, 16, 8, 2) if aligned else cfg.dq, dkdv=cfg.dkdv)


def _full_mask_fwd(cfg: LaunchConfig, bd: int, tf32: bool, family: int, dropout: bool, aligned: bool) -> LaunchConfig:
    # A full mask adds a byte per score to each tile: the wider saturated tiles spilled 2.4-3.2 KB at a ragged length
    # (L = 200, no dropout; sm_80 and sm_90), tiles of BLOCK_N none.  sm_90 D = 64 with dropout: 64x64 spilled 4 B at
    # L = 200, 64x32 none.  D = 16: 32-key tiles have no 16-byte copies; sm_8x 64x64 spilled 4 B (static profile,
    # 2026-12-04)
    if bd <= 16 and not tf32:
        return LaunchConfig(64, 64, 4, 3) if family == 90 else LaunchConfig(32, 64, 4, 3)
    if tf32 and family == 80 and bd <= 32:  # 3 stages spilled 4 B at D = 32 with dropout (2026-12-04)
        return LaunchConfig(cfg.block_m, cfg.block_n, cfg.num_warps, 2)
    if family == 90 and dropout and not tf32 and 32 < bd <= 64:
        return LaunchConfig(64, 32, 4, 3)
    if family == 90 and not tf32 and 16 < bd <= 64:  # 64x64 on 2 stages spilled 40 B without dropout (2026-12-05)
        return LaunchConfig(64, 32, 4, 2)
    if family == 80 and not tf32 and 16 < bd <= 64 and not aligned and not dropout:  # 64x32: 12 B at L = 200
        # under triton 3.6.0 (2026-12-05); 32x64 0 B under both compilers.  D = 32 on 3 stages: 14 B at 255
        # registers since the unpredicated band gathers (2026-12-07); 2 stages 0 B
        return LaunchConfig(32, 64, 4, 2 if bd <= 32 else 3)
    if family == 80 and not tf32 and 64 < bd <= 128:  # 32x32 at ptxas's own 168 registers spilled 4 B with
        # dropout (2026-12-05); up to 255: 0 B at 191
        return replace(cfg, sat_block_n=0, max_regs=255)
    return replace(cfg, sat_block_n=0)


def _fwd_config(bd: int, tf32: bool, family: int, varlen: bool, dropout: bool) -> LaunchConfig:
    # The saturated loop walks key tiles twice the band's (``sat_block_n``): 9-32 % fewer instructions per score
    # there, spill-free, within sm_86 / sm_89's 99 KB of shared memory on sm_8x and two CTAs per SM on sm_90 (static
    # profile, 2026-12-03, benchmarks/NOTES.md "Wider saturated tiles"); where that did not hold, as noted.
    if bd <= 16 and not tf32:
        # sm_8x: 64x64 spilled 14-56 B (with the 128-key saturated tiles: 14-24 B); 64x32 none.  Packed: 64x64
        # spilled 188 B, 32x64 40 B (8 warps would need 128-key tiles for 16-byte copies)
        if family == 80:  # packed with dropout: 32x64 spilled 4 B
            return LaunchConfig(32, 64, 4, 3, 128) if varlen and not dropout else LaunchConfig(64, 32, 4, 3, 128)
        if varlen and dropout:  # 128-key saturated tiles: 4 B; 64x64 8 B with 8 keys per Philox call (2026-12-04)
            return LaunchConfig(64, 32, 4, 3, 64)
        return LaunchConfig(64, 64, 4, 3, 128)
    if bd <= 64:
        if tf32:  # float32 tiles: 64x64 spilled 20 B (sm_90) / 164 B (sm_80) and needed 115-135 KB; 2x saturated
            # tiles: 116-158 KB.  sm_8x: 32x64 spilled 4 B with dropout, 14-24 B at D = 16 / 32 (2026-12-03)
            if family == 90:
                return LaunchConfig(64, 32, 4, 3)
            # (32x32 at D = 32 with dropout: 4 B at ptxas's own 168 registers since the unpredicated band gathers,
            # 2026-12-07: up to 255, 0 B)
            if dropout or bd < 64:
                return LaunchConfig(32, 32, 4, 3, 64, 255 if bd <= 32 and dropout else 0)
            return LaunchConfig(32, 64, 4, 3)
        if family == 90:
            # 64x64 tiles on 4 warps: the band loop's gathered table entries are software-pipelined through shared
            # memory (cp.async), so 128-row tiles need 144-156 KB of it.  2 stages, not 3: measured on an H200
            # (2026-12-04, benchmarks.tune_configs, bf16, D = 64, L = 512, 16k tokens) 2.12 against 3.23 ms
            # without dropout and 2.18 against 3.52 ms with it, the same bits (not profiled: without dropout 75 KB
            # of shared memory per CTA instead of 109 KB, 3 CTAs per SM instead of 2); at L >= 2048 and D = 32
            # predicted, not yet timed.  It
            # spills 8 B (inference) / 24-28 B (dropout) at D = 64 on sm_90 (static, triton 3.6.0 and 3.7.1), against
            # 0 B on 3 stages: the measurement outweighs the spill-free target here.
            # Packed: 64x64 spilled 12 B.  D = 64 with dropout: 128-key saturated tiles need 117 KB (one CTA per SM).
            if varlen:
                return LaunchConfig(64, 32, 4, 3, 64)
            return LaunchConfig(64, 64, 4, 2, 64 if dropout and bd == 64 else 128)
        # sm_8x: 64x64 spilled 80-108 B (276 B packed); packed 64x32: 4-44 B (D = 64); 32x64 at D = 32: 4 B
        if varlen:
            return LaunchConfig(32, 64, 4, 3, 128) if bd == 64 else LaunchConfig(64, 32, 4, 3, 128)
        # 64-key saturated tiles spilled 4 B without dropout (76 KB with 128).  D = 64 without dropout on 2 stages:
        # the row sums' [64, 16] accumulator (RSUM) made 3 stages spill 6 B at ragged lengths with a key mask
        # (2026-12-07, full tier); 2 stages 0 B and fewer instructions at L = 512 (13.23 / 30.12 against 13.66 /
        # 30.62 without a mask, static)
        return LaunchConfig(64, 32, 4, 2 if bd == 64 and not dropout else 3, 64 if dropout else 128)
    if bd <= 128:
        if family == 90:  # 64x32 spills 16 B with dropout; 64x16 none (60-78 instructions per element, 64x32 49-72)
            if dropout:  # (TF32, 3 stages: 8 B with a full mask since the seed is read from memory, 2026-12-06;
                # TF32 64x16 on 4 warps, 2 stages: 4 B with the dropout stream in 2 x 4 blocks, 8 warps 0 B)
                return LaunchConfig(64, 16, 8, 2, 32) if tf32 else LaunchConfig(64, 16, 4, 3, 32)
            # packed 64x32: 12 B on 2 stages (3 stages: 0 B, 116 KB)
            return LaunchConfig(64, 16, 4, 2, 64) if varlen else LaunchConfig(64, 32, 4, 2, 64)
        return LaunchConfig(32, 32, 4, 2, 64)  # 64x32 spilled 96-152 B on sm_80
    # D=256: 64x32 on 8 warps, 1 stage spilled 12-92 B on sm_90; 2 stages: 0 B, 123-131 KB (with dropout 4 B since
    # 2026-12-03: 64x16); sm_8x: 32x32 (61-66 KB)
    if family == 90:
        if dropout:  # packed: 64x16 with 64-key saturated tiles 4 B, 64x32 40 B; padded with 64-key saturated
            # tiles 8 B under triton 3.6.0 since the 64-bit Philox products (2026-12-06): 32-key ones
            return LaunchConfig(64, 16, 8, 2, 32)
        return LaunchConfig(64, 32, 8, 2, 64)
    return LaunchConfig(32, 16, 4, 2, 32) if varlen and dropout else LaunchConfig(32, 32, 4, 2, 64)  # 32x32: 32-40 B


def _bwd_config(bd: int, tf32: bool, family: int, varlen: bool, dropout: bool) -> BackwardConfig:
    # 32x32 tiles: no spills for DeBERTa training at D=64 (64x32 and 32x64 spill 160-1356 B in the region-loop
    # kernels: benchmarks/results/2026-12-02-static/sweep-session6.md); dK/dV on sm_8x and in TF32 spilled 4-56 B at
    # 32x32 (with the linear-tile loop: 8-28 B at D=32/64, 12 B TF32 on sm_90): 32x16 there.
    if bd <= 16:  # 2 warps, so that a 16-row tile is 8 elements per thread: 16-byte loads.  32x64 on 4 warps spilled
        # 64-100 B (2026-12-04); these none with a key or a full mask, sm_80 and sm_90.  (sm_90 dq with c2p + p2c and
        # dropout: 12 B at ptxas's own 128 registers since the seed is read from memory, 2026-12-06: up to 255; the
        # sm_90 dK/dV with c2p + p2c and dropout: 4 B since its keep mask is compared after the permute, eighth
        # session of 2026-12-06: up to 255 for every D <= 16 dK/dV, either architecture, mask, term or rate; 208 ->
        # 226 registers on the sm_90 p2c row, untimed)
        return BackwardConfig(dq=LaunchConfig(32, 16, 2, 2, 0, 255), dkdv=LaunchConfig(16, 32, 2, 2, 0, 255))
    if bd <= 64:
        c = LaunchConfig(32, 32, 4, 2)
        # sm_90 dq at D = 64: ptxas settled at 168 registers with 8 B spilled for the distance tables (triton 3.7.1),
        # 12 B in TF32 (3.6.0); with up to 255: 0 B (the slot-table dq already used 255: the same code within 0.1
        # instructions per element) (2026-12-05); at D = 32 too since the dq without c2p stores 16 bits: 4 B at 128
        # registers under triton 3.6.0 with p2c alone, a full mask and dropout (2026-12-06)
        dq = replace(c, max_regs=255) if family == 90 or tf32 else c
        # (TF32 32x16 on sm_90: 4 B at ptxas's own 168 registers, 2026-12-05: up to 255.  With the dropout stream in
        # 2 x 4 blocks, 2026-12-06: sm_8x TF32 dq 8 - 12 B at ptxas's own target, up to 255 0 B; sm_90 D = 32 dK/dV
        # 32x32 4 B at 255, 32x16 0 B; both with and without dropout, one config per key, untimed)
        dkdv = LaunchConfig(32, 16, 4, 2, 0, 255 if tf32 else 0) if family == 80 or tf32 else c
        if tf32 or bd != 64:
            return BackwardConfig(dq=dq, dkdv=LaunchConfig(32, 16, 4, 2, 0, 255) if bd == 32 and family == 90 else dkdv)
        if varlen and dropout:  # packed sm_90 dK/dV with dropout on distance tables: 4 B spilled under triton 3.6.0
            # (at 255 registers; with maxnreg 255 ptxas allocates otherwise: 0 B under both compilers, 2026-12-06).
            # The variant without relative terms then takes 206 registers instead of 142 (untimed)
            return BackwardConfig(dq=dq, dkdv=replace(dkdv, max_regs=255) if family == 90 else dkdv)
        # Padded 16-bit D = 64 (2026-12-05; benchmarks/NOTES.md "Backward tiles"): tiles that spread each tile's
        # fixed work (K / V or Q / dO loads, the run sums' and Philox's per-row parts, loop control) over more
        # scores.  Static, fp16, training, saturated - in-band per element:
        # - dq on 64x32 (16 scores per thread): the H200 tune's fastest dq at L = 512 (0.947x the 32x32 kernel's
        #   time, bf16, 2026-12-04, older kernels); sm_90 47.25 - 64.38 -> 36.0 - 52.62 (distance tables 47.0 -
        #   45.88 -> 35.81 - 36.19), sm_80 46.75 - 63.12 -> 42.56 - 59.38;
        # - dK/dV on 16x64 (64 keys a program walking 16-query tiles; untimed): sm_90 60.5 - 74.5 -> 47.62 - 65.75
        #   (distance tables 60.5 - 71.0 -> 47.62 - 59.12), sm_80 (from 32x16) 87.25 - 96.5 -> 57.38 - 77.5.
        # 0 B in every padded variant of the full compile tier under triton 3.7.1 and 3.6.0, and packed without
        # dropout (sm_90 dq 29.62 - 57.12 -> 19.19 - 46.62, dK/dV 35.38 - 50.62 -> 26.62 - 43.0; sm_80 dq 30.0 -
        # 57.38 -> 23.12 - 50.38, dK/dV from 32x16 52.5 - 60.0 -> 30.5 - 47.62).  Packed calls with dropout keep the
        # 32x32 / 32x16 tiles: 64x32 dq spilled 8 B there, 16x64 dK/dV 8 - 12 B (3.6.0); dK/dV 32x64 spilled 4 - 124 B
        # in most variants.
        # (sm_90 dK/dV at a ragged length with a key mask and no dropout: 4 B spilled under triton 3.6.0, 2026-12-06;
        # up to 255 registers: 0 B under both compilers; the training variants already sat at 254 - 255.  sm_8x dK/dV
        # with the dropout stream in 2 x 4 blocks: 8 B at a ragged length on 1 stage; 2 stages, up to 255: 0 B, for
        # every padded D = 64 call, with or without dropout, untimed)
        # sm_90 without dropout (2026-12-07, eleventh session): dK/dV on 32x64 (16 scores per thread, as dq's): 1 stage,
        # up to 255 registers: 0 B spilled in every padded variant (terms, no mask / key mask / host flags (a full
        # mask has its own tiles), lengths 512 / 200 / 50, both table sources) under triton 3.7.1 and 3.6.0; in-band
        # 35.88 -> 33.88 per element (distance tables 30.25 -> 26.81), saturated 25.88 -> 23.06 (static, fp16).
        # Packed calls spilled 8 - 24 B with it, sm_80 8 - 16 B (c2p with a key mask), padded sm_90 with dropout 4 -
        # 60 B in 37 of 65 variants: those keep 16x64.  Untimed
        # sm_90 dq with dropout since it stores its decisions for dK/dV (DROPOUT_BITS, 2026-12-07, twelfth session):
        # 64x32 spilled 4 B (at 255 registers, L = 512 with a key mask), 64x16 0 B (in-band 42.56 -> 42.12 per
        # element, static, fp16; 2 stages 0 B at 44.69).  Untimed
        dkdv = LaunchConfig(16, 64, 4, 1 if family == 90 else 2, 0, 255)
        if family == 90 and not dropout and not varlen:
            dkdv = LaunchConfig(32, 64, 4, 1, 0, 255)
        dq = LaunchConfig(64, 16, 4, 1, 0, 255) if family == 90 and dropout else LaunchConfig(64, 32, 4, 1)
        return BackwardConfig(dq=dq, dkdv=dkdv)
    if bd <= 128:
        if family == 90:  # dq 32x32 spilled 4-12 B on sm_90 (16x32: 0 B, +27 % instructions), dK/dV 32x32/8/1 4 B
            # (dq with a full mask: 12 B at ptxas's own 168 registers under triton 3.6.0, 2026-12-05: up to 255;
            # dK/dV since the kernels take the dropout bytes' operands, 2026-12-07, twelfth session: 4 B at its own
            # 168 with a key mask and no dropout under 3.7.1, with a full mask and dropout under 3.6.0: up to 255)
            return BackwardConfig(dq=LaunchConfig(16, 32, 4, 2, 0, 255), dkdv=LaunchConfig(32, 16, 4, 2, 0, 255))
        # sm_8x dq with the per-distance run sums (2026-12-03): 4 warps spilled 4 B (2 stages) / 16 B (1 stage); 8: 0 B
        c = LaunchConfig(32, 32, 8, 1)
        return BackwardConfig(dq=c, dkdv=c)
    # with the per-distance run sums (2026-12-03): D=256 dq spilled 12-28 B on 1 stage (2 stages: 0 B, 77 KB), dK/dV
    # 8-44 B at 32x32 (32x16: 0 B; sm_90 since 2026-12-04)
    return BackwardConfig(dq=LaunchConfig(32, 32, 8, 2), dkdv=LaunchConfig(32, 16, 8, 1))


def _fp32_config(pass_: str, bd: int, family: int = 90):
    """IEEE float32 (HF's default dtype; TF32 off, torch's default): FMA products on float32 tiles, twice the
    registers of the 16-bit ones.  From ad-hoc sweeps of the saturated-region kernels (DeBERTa training launch, and
    full-mask / no-mask ones, sm_80 and sm_90; benchmarks/NOTES.md "Saturated tiles"): forward 32x16 at D <= 64 and
    16x16 above (0 B; 32x32 spilled 128 B at D=64, 0.9 KB at D=128 and 21 KB at D=256 on sm_90), backward 16x16
    (32x32 spilled 1-1.8 KB at D=64): 4 warps, 2 stages on sm_90 and 8 warps, 1 stage on sm_8x, the ones without spills
    (16x16 on 4 warps, 1 stage spilled 4-12 B)."""
    # Since the aligned run sums (the full compile tier, 2026-12-05), ptxas's own register targets (80 - 168) spilled
    # 4 - 24 B in several of these: the backward configs let it use up to 255 (``max_regs``) where that gave 0 B
    # (the sm_90 D = 256 dq spilled 4 B at 255 and none at its own 111; on 8 warps since 2026-12-07, below).
    bwd = LaunchConfig(16, 16, 4, 2, 0, 255) if family == 90 else LaunchConfig(16, 16, 8, 1, 0, 255)
    # sm_90 dq: 16 x 16 on 8 warps, 2 stages, up to 255 registers (16 warps at D = 256 until 2026-12-07).  History:
    # 4 warps spilled 4 B at D = 256, and 8-12 B at D = 32 - 128 with 8 keys per dropout Philox call (the full tier,
    # 2026-12-04); D = 128 on 2 stages 4 B with dropout once dropout's rescale left the element loop (2026-12-06, 1
    # stage then); with the dropout stream in 2 x 4 blocks (2026-12-06) D = 128 on 1 stage 16 B, on 2 stages at 255
    # 0 B, and D = 256 on 8 warps 4 - 40 B in some of its 12 variants at every register limit and stage count tried,
    # on 16 warps (ptxas's own limit) 0 B in all.  sm_8x D = 256 dq on 1 stage: 864 B at 255 registers; 2 stages 0 B
    # (68 KB).  sm_90 D = 256 over all 24 variants (terms x masks x dropout; 2026-12-07): 16 warps at ptxas's own
    # limit spill 4 - 24 B in 6 of them under either compiler (the code before the unpredicated band gathers: 9
    # under 3.6.0), the compile tier's one variant per config none; 8 warps, 2 stages, up to 255 none under 3.7.1 but
    # 2 under 3.6.0, the tier's among them; 3 stages, other limits, 4 warps, 16 x 32: more.  Left as it was
    # (float32 D = 256 is no DeBERTa head; not timed).  Then (2026-12-07, eleventh session) the 16-warp dq spilled in
    # 9 of the 24 under 3.7.1 and 7 under 3.6.0 (ptxas settles at 64 registers), the tier's variant among them under
    # 3.6.0.  8 warps, 2 stages, up to 240 registers: 1 under 3.7.1 (c2p + p2c, no mask, dropout: 8 B) and 1 under
    # 3.6.0 (c2p alone, key mask, dropout: 16 B); up to 255: 2 and 1 (c2p + p2c with a key mask and dropout, 8 B,
    # under 3.6.0); up to 224: 2 and 1; 16 warps at 96 / 120 / 128 registers, 3 stages, 1 stage, 4 warps: 6 - 24
    # sm_90 D = 128 since the unpredicated band gathers (2026-12-07): which stage count spills flips with the compiler
    # (c2p + p2c, key mask, dropout: 1 stage 0 B under triton 3.7.1, 16 B under 3.6.0; 2 stages 8 B / 0 B; over the
    # 24 variants 1 stage spills in 2 (3.7.1) / 4, 2 stages in 3 / 0; the code before: 2 stages in 2 / 1), so each
    # compiler gets its own
    if family == 90:
        dq = (LaunchConfig(16, 16, 8, 2, 0, 240) if bd > 128
              else LaunchConfig(16, 16, 8, 1 if _TRITON_VERSION >= (3, 7) else 2, 0, 255) if bd == 128
              else LaunchConfig(16, 16, 8, 2, 0, 255))
    else:
        dq = LaunchConfig(16, 16, 8, 2, 0, 255) if bd > 128 else bwd
    fwd = LaunchConfig(32, 16, 4, 2) if bd <= 64 else LaunchConfig(16, 16, 4, 2)
    # dK/dV (the full tier of the compile check, 2026-12-03, session 13): sm_90 1 stage spilled 4-8 B at D = 32 / 64
    # (2 stages: 0 B; at D = 16 4 B with c2p + p2c, 1 stage 8 B without: 2 warps 0 B); sm_8x 8 warps 4 B at D = 32
    # (4 warps: 0 B).  With 8 keys per dropout Philox call (2026-12-04): sm_90 D = 256 2 stages 4 B (1 stage 0 B),
    # sm_8x D = 16 4 warps 4 B (8 warps 0 B).  2026-12-05: sm_90 D = 64 on 4 warps, 2 stages 4 B at 255 registers
    # (20 B at ptxas's own 96), 8 warps 0 B; D = 256 on 4 warps, 1 stage 8 B at 255, 8 warps 0 B.  2026-12-06: D = 128
    # on 4 warps 8 B with dropout (since dropout's rescale left the element loop; 4 B without), 8 warps 0 B.
    # sm_90 D = 128 since dK/dV reads the dq kernel's dropout bytes (2026-12-07, twelfth session): 2 stages spilled
    # 4 - 28 B in 17 of 25 dropout variants under triton 3.6.0, 1 stage 0 B in all 50 (with and without dropout)
    # under both compilers
    if family == 90:
        dkdv = (LaunchConfig(16, 16, 2, 1, 0, 255) if bd <= 16 else LaunchConfig(16, 16, 8, 1, 0, 255) if bd >= 128
                else LaunchConfig(16, 16, 8, 2, 0, 255) if bd == 64 else bwd)
    else:
        dkdv = LaunchConfig(16, 16, 4, 1, 0, 255) if bd == 32 else bwd
    return fwd if pass_ == "fwd" else BackwardConfig(dq=dq, dkdv=dkdv)


#: dtype of the C2P / P2C tables of fp16 / bf16 calls: "float32" (shipped), or "input": the calls' own dtype, each
#: entry the float32 GEMM sum rounded once (as HF's own ``bmm`` rounds c2p / p2c), half the tables' bytes (805 ->
#: 403 MB per forward at 16k tokens, H=12, v3) for more instructions per in-band element (NOTES: "the Triton tables
#: in the inputs' dtype").  An experiment for a GPU A/B (``benchmarks.breakdown``), not a user setting.
TABLE_DTYPE = "float32"


def _table_gemm(x, pos, keep_batch: bool = True):
    """``x @ pos^T``: ``x [B,H,L,D]`` or ``[H,T,D]``, ``pos [H,R,D]`` or ``[B,H,R,D]`` -> ``[..., L, R]``
    contiguous, float32 (or ``x``'s 16-bit dtype under ``TABLE_DTYPE = "input"``).  fp16/bf16 on CUDA: tensor-core
    GEMM with float32 output (``bmm(out_dtype=)``: products of 16-bit values are exact in float32, so this equals
    the float32 GEMM up to summation order); otherwise a float32 GEMM (TF32 only if torch allows it).
    ``B == 1`` with a shared ``pos`` is one 3-D ``bmm`` (a broadcast ``matmul`` cost ~2 us more host time, measured on
    the 2-core CPU machine, 2026-12-02), its result ``[H, L, R]`` without ``keep_batch`` (the same memory: the
    kernels read a table by pointer)."""
    half = TABLE_DTYPE == "input" and x.dtype in (torch.float16, torch.bfloat16)
    lead = x.dim() == 4 and x.shape[0] == 1 and pos.dim() == 3
    if lead:
        x = x[0]
    if x.dim() == 3 and pos.dim() == 3:
        out = _bmm32(x, pos.mT, half)
    elif x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        batch = x.shape[:-2]
        pb = pos.expand(*batch, *pos.shape[-2:]).reshape(-1, *pos.shape[-2:])
        out = _bmm32(x.reshape(-1, *x.shape[-2:]), pb.mT, half).view(*batch, x.shape[-2], -1)
    else:
        out = torch.matmul(x.float(), pos.float().mT).contiguous()
        if half:
            out = out.to(x.dtype)
    return out[None] if lead and keep_batch else out


def _bmm32(a, b, half: bool):
    """``bmm(a, b)`` in float32 (``half``: rounded to ``a``'s 16-bit dtype once): on CUDA a 16-bit GEMM with float32
    output, else a float32 one (float32 operands used as they are)."""
    dtype = a.dtype
    if a.is_cuda and dtype in (torch.float16, torch.bfloat16):
        try:  # (16-bit output: cuBLAS accumulates in float32 and rounds once)
            return torch.bmm(a, b) if half else torch.bmm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # torch without bmm(out_dtype=)
            pass
    out = torch.bmm(a, b) if dtype == torch.float32 else torch.bmm(a.float(), b.float())
    return out.to(dtype) if half else out


LOG2E = 1.4426950408889634


def lse_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """Natural log-sum-exp of the scaled masked scores from the forward's ``stats [2, ...]``
    (``+inf`` on rows with no key)."""
    return (stats[0] + stats[1]) / LOG2E


_DUMMIES: dict = {}


def _dummies(device: torch.device):
    """``(uint8 [1], int32 [1], float32 [1])`` zeros on ``device``, created once: the pointers of absent
    operands (never read by the kernels; allocating them cost host time on every call)."""
    d = _DUMMIES.get(device)
    if d is None:
        d = _DUMMIES[device] = tuple(torch.zeros(1, dtype=t, device=device)
                                     for t in (torch.uint8, torch.int32, torch.float32))
    return d


@dataclass
class _Prepared:
    """Everything the three kernels share but the tables (:func:`_tables`, per head group): slot table, mask
    pointers / strides, constexprs."""
    table: torch.Tensor
    mask_args: tuple
    mask_strides: tuple
    nslot: int
    band: tuple
    constexprs: dict
    rows: slice  # rows of pos_key / pos_query the tables cover (see positions.trimmed_slot_table)
    run_rows: torch.Tensor | None  # long [NRUN]: row (within ``rows``) of each run (positions.distance_runs)
    runs_unique: bool  # no row is used by two runs (no two in-band distances share a bucket)
    runs_identity: bool  # run r uses trimmed row r and every row is used (see _Layout)
    fp32_ieee: bool  # float32 inputs with IEEE products (launch_config picks smaller tiles)
    tf32: bool  # float32 inputs on tensor cores
    arch: int  # compute capability (10*major + minor; see device_arch)
    run0: int  # the backward's run of d is clamp(d + run0, 0, NRUN - 1) (positions.distance_runs)
    sums: tuple = (16, 0, 0)  # the run sums' layout (_sums_layout)
    run_rows_rev: torch.Tensor | None = None  # run_rows reversed (dq's run sums hold the runs in decreasing order)
    run_pos_rows: torch.Tensor | None = None  # int32 [NRUN]: row of pos_key / pos_query of each run (kernels' RUNROW)

    @property
    def nrun(self) -> int:
        return 1 if self.run_rows is None else self.run_rows.numel()

    def run_columns(self, rev: bool) -> slice:
        """The columns of a row of the run sums that hold its runs: in decreasing order (``rev``: dq's ``CSUM``) or
        increasing (dK/dV's ``PSUM``; :func:`_sums_layout`)."""
        rs1, rcc, rcp = self.sums
        first = rcc + self.run0 - (self.nrun - 1) if rev else rcp - self.run0
        return slice(first, first + self.nrun)


def int32_index_problem(q_len: int, k_len: int, nslot: int, nrun: int) -> str | None:
    """Why the kernels' int32 offsets cannot index one ``(b, h)`` block of the tables (``[L, NSLOT]``) or of the
    run sums (``[L, nrun]``, ``nrun`` their row width: ``_sums_layout``), or None.  (int32 keeps the per-element
    gathers to one multiply-add; such a block would hold 2**31 floats, 8 GiB per head.)"""
    width = max(nslot, nrun)
    if (max(q_len, k_len) + 256) * width < 2**31:
        return None
    return (f"the Triton kernels index a (batch, head) block of the relative tables in int32: L={max(q_len, k_len)} "
            f"x {width} columns of its tables or run sums is too large (needs < 2**31 elements); use backend='torch'")


def rows_fit(row_stride: int, rows: int) -> bool:
    """Whether the kernels' int32 offsets within a ``(b, h)`` block (or a packed sequence) reach ``rows`` rows of
    ``row_stride`` elements, plus a tile (``_block_tile``: the loops' Q / K / V / dO loads)."""
    return (rows + KMASK_PAD) * row_stride < 2**31


def row_offset_problem(q, k, v, q_len: int, k_len: int, varlen: bool = False) -> str | None:
    """Why :func:`rows_fit` fails for ``q`` / ``k`` / ``v`` (``[B,H,L,D]``, or ``[T,H,D]`` with ``varlen``), or
    None."""
    for name, t, rows in (("query", q, q_len), ("key", k, k_len), ("value", v, k_len)):
        stride = t.stride(0) if varlen else t.stride(-2)
        if t.shape[-1] % 16:  # the kernels see a contiguous copy with the head dim padded (_aligned_head_dim)
            padded = -(-t.shape[-1] // 16) * 16
            stride = t.shape[-2] * padded if varlen else padded
        if not rows_fit(stride, rows):
            return (f"the Triton kernels index the rows of one (batch, head) block of {name} in int32: {rows} rows "
                    f"of stride {stride} are too far apart (needs (L + {KMASK_PAD}) * stride < 2**31); call "
                    f".contiguous() on a strided view, or use backend='torch'")
    return None


@dataclass(frozen=True)
class _Layout:
    """What the tables' shape depends on, computed once per ``(Lq, Lk, bucket config, device, pass)``:
    the shifted slot table and the rows it covers, the saturation band and the backward's runs
    (:func:`deberta_fast.positions.distance_runs`)."""
    table: torch.Tensor
    rows: slice
    nslot: int
    band: tuple
    run_rows: torch.Tensor | None
    runs_unique: bool
    runs_identity: bool  # run r uses trimmed row r, every row once (no gather / scatter by run_rows)
    run0: int  # -runs.lo (positions.distance_runs); 0 for the forward
    sums: tuple = (16, 0, 0)  # _sums_layout's, for the backward
    run_rows_rev: torch.Tensor | None = None
    run_pos_rows: torch.Tensor | None = None


def _sums_layout(nrun: int, run0: int) -> tuple:
    """``(RS1, RCC, RCP)``: the backward's run sums in rows of ``RS1 + 1`` columns (``RS1`` a multiple of 16), dq's
    run ``r`` in column ``RCC + run0 - r``, dK/dV's in ``RCP - run0 + r``, with ``RCC`` / ``RCP`` multiples of 16, so
    that the kernels' stores along a tile are aligned vectors (``_advance_runs``).  Columns outside the runs are
    neither written nor read."""
    kc = nrun - 1 + (run0 - nrun + 1) % 16  # dq: runs nrun - 1 .. 0 in columns kc - nrun + 1 .. kc
    kp = (-run0) % 16  # dK/dV: runs 0 .. nrun - 1 in columns kp .. kp + nrun - 1
    return -(-max(kc, kp + nrun - 1, 1) // 16) * 16, kc - run0, kp + run0


_LAYOUTS: dict = {}


def _layout(Lq, Lk, position_buckets, max_relative_positions, span, device, has_rel, backward) -> _Layout:
    """Cached :class:`_Layout` (host time: a dict lookup per call instead of ~10 us of cache lookups and
    argument normalisation, measured on the 2-core CPU machine, 2026-12-02; ``int32_index_problem`` raises before
    anything is cached)."""
    key = (Lq, Lk, position_buckets, max_relative_positions, span, device, has_rel, backward)
    hit = _LAYOUTS.get(key)
    if hit is not None:
        return hit
    if not has_rel:
        table = _dummies(device)[1]
        hit = _Layout(table, slice(0, 2 * span), 1, (-1, 1), None, True, True, 0)
    else:
        # only the rows some (i, j) uses: ~Lq+Lk of 2*span for short sequences
        table, lo, hi = trimmed_slot_table(Lq, Lk, position_buckets, max_relative_positions, span, device)
        band = table_band(Lq, Lk, position_buckets, max_relative_positions, span, device)  # the table's own
        lim = Lq + Lk + 1  # keep the band in int32; beyond +-lim nothing changes
        nslot = hi - lo + 1
        runs = distance_runs(Lq, Lk, position_buckets, max_relative_positions, span, device) if backward else None
        sums = (16, 0, 0) if runs is None else _sums_layout(runs.count, -runs.lo)
        problem = int32_index_problem(Lq, Lk, nslot, sums[0] + 1)
        if problem:
            raise ValueError(problem)
        run_rows, unique, identity, run0 = None, True, True, 0
        if backward:
            run_rows, unique, run0 = runs.run_rows, runs.unique, -runs.lo
            identity = unique and runs.count == nslot  # increasing and every row: arange
        hit = _Layout(table, slice(lo, hi + 1), nslot, (max(band.lo, -lim), min(band.hi, lim)), run_rows,
                      unique, identity, run0, sums, None if run_rows is None else run_rows.flip(0),
                      None if run_rows is None else (run_rows + lo).to(torch.int32))
    if len(_LAYOUTS) >= 256:
        _LAYOUTS.clear()
    _LAYOUTS[key] = hit
    return hit


def _mask_tensors(device, key_mask, full_mask, uniform_rows, Lq: int, Lk: int):
    """``(mask_kind, (kmask, fmask, uni), (s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh))``: the kernels' mask operands
    (the dummy pointers for absent ones).  ``key_mask [B, Lk]`` (nonzero = attend) is read as given when it is bool
    with unit key stride (a patched encoder makes it so once per forward), else after one conversion: bool masks
    cost the kernels fewer instructions per key than wider ones (static profile, 2026-12-05).  MASK_KIND 1 with
    ``uniform_rows``, 3 without (``Lq == Lk``: the uniform rows are the masked keys' rows, read from the key mask).
    A full mask is copied into a padded frame (below)."""
    dummy_u8, _, dummy = _dummies(device)
    fmask = uni = dummy_u8
    kmask = dummy
    s_kmb = s_fmb = s_fmh = s_fmm = s_unb = s_unh = 0
    mask_kind = 0
    if key_mask is not None:
        if key_mask.device != device:  # (the kernels would read a host pointer)
            raise ValueError(f"key_mask is on {key_mask.device} but query is on {device}")
        if key_mask.dtype != torch.bool:
            key_mask = key_mask != 0
        if key_mask.stride(-1) != 1:
            key_mask = key_mask.contiguous()
        kmask = key_mask
        s_kmb = key_mask.stride(0) if key_mask.shape[0] > 1 else 0
        if uniform_rows is None:
            if Lq != Lk:
                raise ValueError(f"a key mask without uniform_rows needs Lq == Lk (got {Lq}, {Lk}): "
                                 f"pass uniform_rows (deberta_fast.reference.key_uniform_rows)")
            return 3, (kmask, fmask, kmask), (s_kmb, 0, 0, 0, s_kmb, 0)
        mask_kind = 1
    elif full_mask is not None:
        mask_kind = 2
        # copied into a zero (masked) frame of KMASK_PAD rows and columns beyond (Lq, Lk), rows 16-byte aligned: the
        # kernels read a tile of it with neither range predicates nor byte loads
        bm, hm = full_mask.shape[:2]
        fmask = torch.zeros(bm, hm, Lq + KMASK_PAD, -(-Lk // 16) * 16 + KMASK_PAD, dtype=torch.uint8, device=device)
        fmask[:, :, :Lq, :Lk] = full_mask
        s_fmb = fmask.stride(0) if fmask.shape[0] > 1 else 0
        s_fmh = fmask.stride(1) if fmask.shape[1] > 1 else 0
        s_fmm = fmask.stride(2)
    if mask_kind:
        uni = uniform_rows.contiguous().view(torch.uint8)
        s_unb = uni.stride(0) if uni.shape[0] > 1 else 0
        s_unh = uni.stride(1) if uni.shape[1] > 1 else 0
    return mask_kind, (kmask, fmask, uni), (s_kmb, s_fmb, s_fmh, s_fmm, s_unb, s_unh)


def _prepare(q, k, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets,
             max_relative_positions, span, dropout_p, table_lens=None, varlen=False, backward=False) -> _Prepared:
    """``q``/``k``: ``[B,H,L,D]``, or ``[H,T,D]`` views of packed inputs (``varlen``, with
    ``table_lens = (max_seqlen_q, max_seqlen_k)``); ``backward``: also the run table of the relative gradients."""
    D = q.shape[-1]
    Lq, Lk = table_lens if table_lens is not None else (q.shape[-2], k.shape[-2])
    has_c2p, has_p2c = pos_key is not None, pos_query is not None
    lay = _layout(Lq, Lk, position_buckets, max_relative_positions, span, q.device, has_c2p or has_p2c, backward)
    mask_kind, mask_args, mask_strides = _mask_tensors(q.device, key_mask, full_mask, uniform_rows, Lq, Lk)
    prec = "tf32" if q.dtype == torch.float32 and _allow_tf32() else "ieee"
    constexprs = dict(HAS_C2P=has_c2p, HAS_P2C=has_p2c, MASK_KIND=mask_kind, DROPOUT=dropout_p > 0.0,
                      VARLEN=varlen, UPCAST=interpreting(), PREC=prec, BLOCK_D=max(16, _next_pow2(D)))
    return _Prepared(lay.table, mask_args, mask_strides, lay.nslot, lay.band, constexprs, lay.rows, lay.run_rows,
                     lay.runs_unique, lay.runs_identity, q.dtype == torch.float32 and prec == "ieee",
                     q.dtype == torch.float32 and prec == "tf32", device_arch(q.device), lay.run0, lay.sums,
                     lay.run_rows_rev, lay.run_pos_rows)


#: Most bytes one launch's relative tables may take (C2P / P2C; in the backward also its run sums and, padded, its
#: gradients).  A call that needs more runs its heads in groups, one launch of each kernel (and one pair of table
#: GEMMs) per group: the same values per head (the dropout stream is keyed by the call's own ``(b, h)``: the
#: kernels' ``H_ALL`` / ``H0``), at most this much transient memory instead of ``O(B H L NSLOT)`` (v3-base at
#: 16k tokens: 805 MB of forward tables, ~2.4 GB in the backward).  ``None``: no limit (one group).
TABLE_BUDGET: int | None = 256 * 2**20


def head_groups(H: int, bytes_per_head: int) -> list[slice]:
    """Heads ``[0, H)`` in as few groups of equal size (the last may be smaller) as keep each group's
    ``bytes_per_head * size`` within :data:`TABLE_BUDGET`; a group holds one head at least."""
    if TABLE_BUDGET is None or H * bytes_per_head <= TABLE_BUDGET:
        return [slice(0, H)]
    size = max(1, TABLE_BUDGET // max(1, bytes_per_head))
    size = -(-H // -(-H // size))  # balanced: the fewest groups, then the smallest group size
    return [slice(h, min(h + size, H)) for h in range(0, H, size)]


def _table_bytes(pr: _Prepared, q_rows: int, k_rows: int, dtype: torch.dtype, nslot: int, nrun: int = 0) -> int:
    """Bytes per head of the tables of ``nslot`` columns (and with ``nrun``, the float32 run sums) over ``q_rows`` /
    ``k_rows`` rows."""
    half = TABLE_DTYPE == "input" and dtype in (torch.float16, torch.bfloat16)
    rows = q_rows * pr.constexprs["HAS_C2P"] + k_rows * pr.constexprs["HAS_P2C"]
    return rows * (nslot * (2 if half else 4) + 4 * nrun)


def _heads(hs: slice | None, *ts, axis: int = -3) -> list:
    """``ts`` (None kept) restricted to heads ``hs`` on ``axis`` (views, strides kept); unchanged for ``hs = None``,
    the call's only group (no view: host time)."""
    if hs is None:
        return list(ts)
    return [None if t is None else t.narrow(axis, hs.start, hs.stop - hs.start) for t in ts]


def _tables(q, k, pos_key, pos_query, pr: _Prepared, hs: slice | None, columns: tuple | None = None,
            tpad: int = 16, keyed: bool = False, key_mask: torch.Tensor | None = None):
    """``(C2P, P2C)`` of heads ``hs`` (:func:`_heads`; ``q`` / ``k`` / ``pos_*`` with heads on dim -3), or the dummy
    pointer for an absent term (a batch-1 table ``[H, L, R]``: :func:`_table_gemm`).  A column per slot, or with
    ``columns`` (C2P's and P2C's, long, rows within ``pr.rows``) one per entry: the distance tables
    (:func:`_dist_window`; padded, each ``(b, h)`` block's rows a multiple of ``tpad``, the kernels' ``TPAD``: zero
    rows appended).  ``keyed`` (the kernels' ``DIST_KEYED``): P2C is -inf on the keys ``key_mask [B|1, Lk]`` (bool,
    or None) masks and on the appended rows (:func:`_key_bias`)."""
    if hs is not None:
        q, k, pos_key, pos_query = _heads(hs, q, k, pos_key, pos_query)

    def table(x, pos, cols, keys):
        if pos is None:
            return _dummies(x.device)[2]
        pos = pos[..., pr.rows, :]
        if cols is None:
            return _table_gemm(x, pos, False)
        pos = pos.index_select(-2, cols)
        if not pr.constexprs["VARLEN"]:
            rows = -(-x.shape[-2] // tpad) * tpad  # (_table_block)
            if keys and (key_mask is not None or rows > x.shape[-2]):
                x, pos = _key_bias(x, pos, key_mask, rows)
            elif rows > x.shape[-2]:
                x = torch.constant_pad_nd(x, (0, 0, 0, rows - x.shape[-2]))
        return _table_gemm(x, pos, False)
    c2p_cols, p2c_cols = (None, None) if columns is None else columns
    return table(q, pos_key, c2p_cols, False), table(k, pos_query, p2c_cols, keyed)


def _key_bias(k, pos, key_mask, rows: int):
    """``(k', pos')`` whose product ``k' @ pos'^T`` is ``k @ pos^T`` on the keys kept and -inf on those ``key_mask``
    (bool ``[B|1, Lk]``, or None) masks and on ``rows - Lk`` rows appended: ``k [B, H, Lk, D]`` with those rows and 8
    columns, ``pos [..., R, D]`` with 8 columns; column ``D`` is 0 / -inf per key in ``k'`` and 1 in ``pos'``, the
    others zero (so no ``inf * 0``; a kept key's sum gains an exact ``+ 0``; 8 keeps 16-bit rows 16-byte aligned)."""
    Lk, D = k.shape[-2:]
    k = torch.constant_pad_nd(k, (0, 8, 0, rows - Lk))
    bias = k.select(-1, D)  # [B, H, rows]
    if key_mask is not None:
        bias[..., :Lk].masked_fill_(~key_mask[:, None, :], float("-inf"))
    if rows > Lk:
        bias[..., Lk:].fill_(float("-inf"))
    pos = torch.constant_pad_nd(pos, (0, 8))
    pos.select(-1, D).fill_(1.0)
    return k, pos


#: Where the relative terms come from: "tables" (shipped: the host's C2P / P2C, gathered per element), or
#: "skew" (forward only; the backward keeps its slot tables): no tables, band tiles by window products on tensor
#: cores skewed through a per-program scratch, saturated tiles from per-row / per-key terms computed in the kernel
#: (``_skew_terms``; NOTES: "Fourth look: the skew through a per-program scratch").
#: Or "distance" (forward and backward): tables with one column per distance the launches' tiles reach instead of
#: one per slot (:func:`_dist_window`), C2P's in decreasing order, so that band tiles load both as unit-stride,
#: aligned tiles with no slot-table load (``_rel_terms``' ``DIST``; NOTES: "Distance tables"); padded calls' tables
#: in blocks every tile's rows fit, P2C -inf on masked keys, so those loads need no predicate and no key mask
#: (``DIST_KEYED``, :func:`_key_bias`).
#: Experiments for a GPU A/B (``benchmarks.breakdown``), not a user setting.
REL_SOURCE = "tables"


#: Who adds dQ's / dK's relative share ``run sums @ position rows``: "kernel" (shipped: each backward program, from
#: its own sums, ``_run_products``; no float32 dq / dk, 8 fewer host tensor operations per 16-bit backward) or "host"
#: (the kernels skip it, ``RUN_PRODUCTS`` False, and the launcher adds it with a float32 GEMM into float32 dq / dk,
#: as until 2026-12-07).  Which is faster on a GPU is not measured: the epilogue's scalar L2 reads (~9.5 SASS
#: instructions per (row, run) pair on sm_90: static, compiler output, 2026-12-07) against one more HBM read of the
#: sums (NOTES: "The backward adds the relative share of dQ / dK itself").  An experiment for a GPU A/B
#: (``benchmarks.breakdown``), not a user setting.
REL_SHARE = "kernel"


def _fwd_launch_config(q_len: int, k_len: int, head_dim: int, pr: _Prepared) -> LaunchConfig:
    """The forward's :func:`launch_config`; under ``REL_SOURCE = "skew"`` (with a relative term) 64-row tiles run on
    8 warps: on 4 the ``[64, 128]`` window products spill 156 - 480 B, on 8 0 B (inference) / 68 B (dropout)
    (static profile, sm_90, fp16, D = 64, triton 3.7.1, 2026-12-04; 32 x 32 tiles: 0 B, 1.3 - 1.8x the in-band
    instructions per element)."""
    cfg = _config("fwd", q_len, k_len, head_dim, pr)
    if REL_SOURCE == "skew" and (pr.constexprs["HAS_C2P"] or pr.constexprs["HAS_P2C"]) and cfg.block_m >= 64:
        cfg = replace(cfg, num_warps=max(cfg.num_warps, 8))
    return cfg


def _dist_window(pr: _Prepared, Lq: int, Lk: int, *cfgs: LaunchConfig) -> tuple:
    """``(dist0, dist1, c2p_rows, p2c_rows)`` of ``REL_SOURCE = "distance"``: the distances ``[dist0, dist1]``
    (both multiples of 16, so that the tables' ``dist1 - dist0 + 1`` columns make ``_rel_terms``' tile loads aligned)
    that cover those the band tiles of kernels tiled by ``cfgs`` (``_tile_regions``: within ``BLOCK_M + BLOCK_N`` of
    the band below it, ``BLOCK_M + SAT_N`` above, the forward's saturated tiles left over by the ``SAT_N`` rounding
    included) and their edge tiles (rows up to ``Lq + BLOCK_M - 2``, keys up to ``Lk + BLOCK_N - 2``) reach, and each
    table column's row within ``pr.rows`` (the slot table's, distances outside the matrix clamped to its edge; long):
    P2C's columns run up in distance, C2P's down."""
    band_lo, band_hi = pr.band
    below = max(c.block_m + c.block_n for c in cfgs)
    above = max(c.block_m + (c.sat_block_n or c.block_n) for c in cfgs)
    d0 = max(band_lo - below, -(Lk + max(c.block_n for c in cfgs) - 1)) // 16 * 16
    d1 = -(-min(band_hi + above, Lq + max(c.block_m for c in cfgs) - 1) // 16) * 16
    d = torch.arange(d0, d1 + 1, device=pr.table.device).clamp_(-(Lk - 1), Lq - 1) + (Lk - 1)
    rows = pr.table.long()[d]
    return d0, d1, rows.flip(0), rows


def _dist_plan(pr: _Prepared, Lq: int, Lk: int, D: int) -> tuple:
    """``(dist, nslot, dist_args, constexprs)`` of a plan: under ``REL_SOURCE = "distance"`` with a relative term,
    :func:`_dist_window` over the forward's and both backward kernels' tiles (one window and one row padding for both
    passes: the same table GEMM, so the backward's tables have the forward's bits), the tables' columns, the kernels'
    ``(dist0, dist1, NSLOT1)`` and their ``DIST`` (``DIST_KEYED`` padded, ``DIST_PREDICATED`` packed; see
    :func:`_dist_kwargs`) and ``TPAD`` (the largest tile side of the three kernels: a padded table's blocks are a
    multiple of it, so that no tile reads past its block); else no window, the slot count, zeros and ``DIST = 0``.
    Raises ValueError where the window's tables are too wide for the kernels' int32 offsets."""
    if REL_SOURCE != "distance" or not (pr.constexprs["HAS_C2P"] or pr.constexprs["HAS_P2C"]):
        return None, pr.nslot, (0, 0, 0), dict(DIST=0)
    fwd, bwd = _fwd_launch_config(Lq, Lk, D, pr), _config("bwd", Lq, Lk, D, pr)
    dist = _dist_window(pr, Lq, Lk, fwd, bwd.dq, bwd.dkdv)
    nslot = dist[1] - dist[0] + 1
    problem = int32_index_problem(Lq, Lk, nslot, pr.sums[0] + 1)  # (the window's columns, as _layout checks)
    if problem:
        raise ValueError(problem)
    if pr.constexprs["VARLEN"]:
        return dist, nslot, (dist[0], dist[1], nslot - 1), dict(DIST=DIST_PREDICATED.value)
    tpad = max(16, *(x for c in (fwd, bwd.dq, bwd.dkdv) for x in (c.block_m, c.block_n)))
    return dist, nslot, (dist[0], dist[1], nslot - 1), dict(DIST=DIST_KEYED.value, TPAD=tpad)


def _dist_kwargs(kwargs: dict, scale: float) -> dict:
    """A plan's launch keywords for a call at ``scale``: ``DIST_KEYED`` multiplies P2C's -inf by the scale (float32
    in the kernels, times log2 e), which must then be > 0 there; at any other scale (<= 0, or so small that it rounds
    to 0 in float32) the same padded tables without the -inf (:func:`_tables`' ``keyed``) under
    ``DIST_PREDICATED``."""
    if kwargs.get("DIST") == DIST_KEYED.value and not scale >= 2.0**-100:
        return dict(kwargs, DIST=DIST_PREDICATED.value)
    return kwargs


def _table_layout(kwargs: dict, mask_args: tuple, pr: _Prepared) -> tuple:
    """:func:`_tables`' ``(tpad, keyed, key_mask)`` for a launch with ``kwargs`` (after :func:`_dist_kwargs`)."""
    keyed = kwargs.get("DIST") == DIST_KEYED.value
    key_mask = mask_args[0] if keyed and pr.constexprs["MASK_KIND"] in (1, 3) else None
    return kwargs.get("TPAD", 16), keyed, key_mask


def _rel_args(q, k, pos_key, pos_query, pr: _Prepared, hs: slice | None, cfg: LaunchConfig, programs: int,
              dist: tuple | None = None, layout: tuple = ()):
    """The forward's relative-term arguments for heads ``hs``: ``(C2P, P2C, SCR, strides (6), SKEW, WIN)``: the
    tables (:func:`_tables`; with ``dist``, :func:`_dist_window`'s, a column per distance), or under
    ``REL_SOURCE = "skew"`` the position rows the slot table indexes (its first row on), a float32 scratch of
    ``(BLOCK_M + BLOCK_N) * WIN`` per program and the rows' strides.  ``layout``: :func:`_table_layout`'s."""
    if dist is not None or REL_SOURCE != "skew" or (pos_key is None and pos_query is None):
        columns = None if dist is None else dist[2:]
        return (*_tables(q, k, pos_key, pos_query, pr, hs, columns, *layout), _dummies(q.device)[2], (0,) * 6, False,
                1)
    win = _next_pow2(cfg.block_m + cfg.block_n - 1)
    scr = torch.empty(programs * (cfg.block_m + cfg.block_n) * win, device=q.device, dtype=torch.float32)
    ptrs, strides = [], []
    for t in _heads(hs, pos_key, pos_query):
        if t is None:
            ptrs.append(_dummies(q.device)[2])
            strides += [0, 0, 0]
            continue
        rows = t[..., pr.rows, :]
        ptrs.append(rows)
        strides += [rows.stride(0) if rows.dim() == 4 and rows.shape[0] > 1 else 0, *rows.stride()[-3:-1]]
    return (*ptrs, scr, tuple(strides), True, win)


def _group_masks(mask_args: tuple, hs: slice | None) -> tuple:
    """The mask arguments ``(kmask, fmask, uni)`` (:func:`_mask_tensors`) of heads ``hs`` (:func:`_heads`): a
    per-head full mask / uniform-row flag sliced."""
    kmask, fmask, uni = mask_args
    if hs is None:
        return mask_args
    if fmask.dim() == 4 and fmask.shape[1] > 1:
        fmask = fmask[:, hs]
    if uni.dim() == 3 and uni.shape[1] > 1:
        uni = uni[:, hs]
    return kmask, fmask, uni


def _config(pass_: str, q_len: int, k_len: int, head_dim: int, pr: _Prepared):
    """:func:`launch_config` for this launch's precision, device, layout and dropout."""
    return launch_config(pass_, q_len, k_len, head_dim, pr.fp32_ieee, tf32=pr.tf32, arch=pr.arch,
                         varlen=pr.constexprs["VARLEN"], dropout=pr.constexprs["DROPOUT"],
                         full_mask=pr.constexprs["MASK_KIND"] == 2)


_SHIPPED_CONFIG = _config


def _launch_kwargs(cfg: LaunchConfig, pr: _Prepared, fwd: bool = False) -> dict:
    sat = cfg.sat_block_n or cfg.block_n
    if max(cfg.block_m, sat) > KMASK_PAD or sat % cfg.block_n:  # the dK/dV kernel's key tiles are its BLOCK_N
        raise ValueError(f"launch config {cfg}: tiles wider than KMASK_PAD = {KMASK_PAD} key-mask columns, or "
                         f"sat_block_n not a multiple of block_n")
    extra = dict(SAT_N=sat) if fwd else {}
    if cfg.max_regs:
        extra["maxnreg"] = cfg.max_regs
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                **extra, **pr.constexprs)


#: ``DEBERTA_FAST_TRITON_TMA=1``: the forward reads ``Q`` and its saturated tiles' ``K`` / ``V`` through tensor
#: descriptors (the kernel's ``TMA``: TMA loads on sm_90) wherever it can (:func:`tma_problem`, 16-byte aligned
#: pointers); by default, and elsewhere, pointer loads.  Experimental: not yet run on a GPU.
TMA_ENV = "DEBERTA_FAST_TRITON_TMA"
_LAST_TMA = [False]


def tma_requested() -> bool:
    """Whether ``DEBERTA_FAST_TRITON_TMA`` is ``1`` (read at every forward: part of the plan key)."""
    return getenv(TMA_ENV) == "1"


def use_tma(on: bool = True):
    """Within: ``DEBERTA_FAST_TRITON_TMA`` set to ``1`` (``on``) or ``0``, restored after (benchmarks, tests)."""
    return switch(TMA_ENV, on)


def last_forward_tma() -> bool:
    """Whether the last forward launched read through tensor descriptors (the kernel's ``TMA``; False after
    :func:`reset_last_forward_tma` until a forward launches)."""
    return _LAST_TMA[0]


def reset_last_forward_tma() -> None:
    _LAST_TMA[0] = False


def tma_problem(q, k, v, arch: int) -> str | None:
    """Why the forward cannot read ``q`` / ``k`` / ``v`` (padded ``[B,H,L,D]`` or packed ``[T,H,D]``, the head dim a
    multiple of 16) through tensor descriptors, None where it can but for the pointers' own alignment (checked per
    call, :func:`_tma_kwargs`): TMA needs 16-byte aligned row and head (and batch) strides, so that every
    ``(b, h)`` block or packed sequence starts 16-byte aligned; sm_9x and 16-bit inputs only (the targets and
    configs the compile check and the static profile cover)."""
    if arch // 10 != 9:
        return f"sm_{arch}: the TMA loads are built and checked for sm_90 only"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{q.dtype} inputs (16-bit only)"
    es = q.element_size()
    for name, t in (("q", q), ("k", k), ("v", v)):
        if any(s * es % 16 for s in t.stride()[:-1]):
            return f"{name}'s strides {tuple(t.stride())} are not multiples of 16 bytes"
    return None


def _tma_kwargs(plan, q, k, v) -> tuple:
    """``(kwargs, scratch)``: the plan's launch arguments for this call (without ``TMA`` where a pointer is not
    16-byte aligned) and the context each launch runs in (:func:`_descriptor_scratch` with ``TMA``)."""
    tma = plan.plain is not None and not (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15
    _LAST_TMA[0] = tma
    if not tma:
        return (plan.kwargs if plan.plain is None else plan.plain), _NO_SCRATCH
    return plan.kwargs, _descriptor_scratch(q.device)


_NO_SCRATCH = contextlib.nullcontext()


def _scratch(device, size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device=device)


class _DescriptorScratch:
    """Within (re-entered per launch): Triton's allocator of the global scratch that in-kernel tensor descriptors
    need (called at the launch: 128 bytes per descriptor and program on sm_90) serves it from torch's caching
    allocator on ``device``'s current stream, the launch's as long as ``device`` is the current device, as for
    every launch of this launcher (freed after the launch and reused only by later work on that stream, as Triton's
    tutorials do); the caller's allocator (``triton.set_allocator``) restored after.  CUDA tensors only (the
    interpreter needs no scratch: :data:`_NO_SCRATCH`)."""

    def __init__(self, device):
        from triton.runtime import _allocation

        self._var, self._alloc, self._token = _allocation._allocator, functools.partial(_scratch, device), None

    def __enter__(self):
        self._token = self._var.set(self._alloc)

    def __exit__(self, *exc):
        self._var.reset(self._token)


def _descriptor_scratch(device):
    return _DescriptorScratch(device) if device.type == "cuda" else _NO_SCRATCH


def _drop_threshold(p: float) -> int:
    """Dropout keeps a 16-bit Philox half ``u`` iff ``u >= round(p * 2**16)`` (at most ``2**16 - 1``, as the CUDA
    kernels' ``std::round``: halves away from zero); an int argument, so that every rate launches the same compiled
    kernel."""
    return min(math.floor(float(p) * 2.0 ** 16 + 0.5), 2 ** 16 - 1)


def _drop_rate(p: float) -> float:
    """The drop probability the 16-bit threshold realises, ``_drop_threshold(p) / 2**16`` (exact in float32), the
    kernels' ``p_drop``: they rescale kept elements by ``1 / (1 - p_drop)``, so that the expected output is the
    input's at every rate (``1 / (1 - p)`` is off by up to ``2**-17 / (1 - p)``: 1.5x too large at p = 0.99999, and
    scales a rate below ``2**-17``, which drops nothing)."""
    return _drop_threshold(p) / 2.0 ** 16 if p else 0.0


def seed_operand(seed, dropout_p: float, device: torch.device) -> torch.Tensor:
    """The kernels' ``SEED`` operand, the dropout stream's Philox key: ``seed`` itself when it is a tensor (int64
    ``[1]`` on ``device``, as the backend draws it on the device: a captured CUDA graph then draws a fresh one per
    replay), an int put into one (on the device: a captured graph replays that value), or, without dropout, a
    placeholder the kernels never read."""
    if not dropout_p:
        return _dummies(device)[1]
    if not isinstance(seed, torch.Tensor):
        if seed is None:
            raise ValueError("dropout_p > 0 needs a dropout seed (an int, or an int64 tensor of one element on the "
                             "inputs' device)")
        v = int(seed)
        if not -2**63 <= v < 2**64:
            raise ValueError(f"the dropout seed {v} does not fit 64 bits (Philox's key)")
        # (a key from 2**63 up as the int64 of the same bits)
        return torch.full((1,), v - 2**64 if v >= 2**63 else v, dtype=torch.int64, device=device)
    if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != device:
        raise ValueError(f"the dropout seed must be an int or an int64 tensor of one element on {device} (the "
                         f"inputs' device); got {seed.dtype} {tuple(seed.shape)} on {seed.device}")
    return seed


def _qkvo_strides(q, k, v, o):
    return (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3])


def _pad_head_dim(pad: int, *tensors):
    """``tensors`` (None kept) with ``pad`` zero columns appended to the head dim."""
    return [None if t is None else torch.nn.functional.pad(t, (0, pad)) for t in tensors]


def _head_dim_sliced(D: int, *tensors):
    """The first ``D`` columns of each of ``tensors`` (None kept), contiguous."""
    return [None if t is None else t[..., :D].contiguous() for t in tensors]


def _aligned_head_dim(n_padded: int):
    """Runs a launcher on inputs whose head dim is a multiple of 16: its first ``n_padded`` positional arguments
    (``(do,) q, k, v, pos_key, pos_query (, out)``) are zero-padded if it is not, and the head dim of its results is
    sliced back (a forward's ``stats`` pass through).  Zero columns change no dot product and give zero output /
    gradient columns, so the results are those of the unpadded call.  Why: the launch specialization marks integers
    divisible by 16, and a row stride such as 40 gets no mark, so every Q / K / V load of the kernels went scalar
    (D = 40 on sm_90: up to 1.7x the instructions of D = 48 per score and 8-408 B spilled, static profile
    2026-12-04); padded, D = 40 runs the D = 48 kernels."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            D = args[0].shape[-1]  # q (forward) or do (backward)
            pad = -D % 16
            if not pad:
                return fn(*args, **kwargs)
            res = fn(*_pad_head_dim(pad, *args[:n_padded]), *args[n_padded:], **kwargs)
            if n_padded == 5:  # forward: (out, stats)
                return (*_head_dim_sliced(D, res[0]), res[1])
            return (*_head_dim_sliced(D, *res),)
        return wrapper
    return decorate


@dataclass(frozen=True)
class _FwdPlan:
    """A padded forward's launches but for the tensors: one per call signature (:func:`_fwd_plan`)."""
    pr: _Prepared  # mask_args None with masks (every call makes its own mask operands, _mask_tensors), else dummies
    cfg: LaunchConfig
    groups: list
    strides: tuple  # Q / K / V / OUT, then the masks' strides (every group's: views keep strides)
    kwargs: dict  # constexprs and launch options (_launch_kwargs)
    dist: tuple | None = None  # REL_SOURCE = "distance": _dist_window's (dist0, dist1, c2p_rows, p2c_rows)
    nslot: int = 0  # the tables' columns (the slot count, or dist1 - dist0 + 1)
    dist_args: tuple = (0, 0, 0)  # the forward kernel's (dist0, dist1, NSLOT1): zeros without distance tables
    plain: dict | None = None  # with TMA (tma_requested): kwargs without it, for a call's misaligned pointers


@dataclass(frozen=True)
class _BwdPlan:
    """A backward's launches but for the tensors: one per call signature (:func:`_bwd_plan`)."""
    pr: _Prepared  # mask_args as _FwdPlan's
    cfg: BackwardConfig
    groups: list
    kw_dkdv: dict  # constexprs and launch options of each kernel (_launch_kwargs)
    kw_dq: dict
    dist: tuple | None = None  # as _FwdPlan's, for both kernels' tiles
    nslot: int = 0
    dist_args: tuple = (0, 0, 0)
    keep_bytes: int = 0  # row width of the dropout decisions' bytes (_keep_width), 0: dK/dV runs Philox itself


_FWD_PLANS: dict = {}
_BWD_PLANS: dict = {}


def _plan_key(q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets,
              max_relative_positions, span, dropout_p, max_seqlens) -> tuple:
    """What a plan depends on: shapes, strides, dtype, device, which terms and masks (a key mask's strides and
    dtype), bucket config, dropout on / off, and the settings the launch reads (interpreter, TF32, target arch,
    ``REL_SOURCE`` / ``TABLE_BUDGET`` / ``TABLE_DTYPE`` / ``REL_SHARE`` / ``DROPOUT_BITS``,
    ``DEBERTA_FAST_TRITON_TMA``)."""
    return (q.shape, k.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device, max_seqlens,
            None if pos_key is None else (pos_key.shape, pos_key.stride()),
            None if pos_query is None else (pos_query.shape, pos_query.stride()),
            None if key_mask is None else (key_mask.shape, key_mask.stride(), key_mask.dtype),
            None if full_mask is None else full_mask.shape,
            None if uniform_rows is None else uniform_rows.shape, position_buckets, max_relative_positions, span,
            dropout_p > 0.0, interpreting(), q.dtype == torch.float32 and _allow_tf32(),
            _TARGET_ARCH[0], REL_SOURCE, TABLE_BUDGET, TABLE_DTYPE, REL_SHARE, DROPOUT_BITS, tma_requested())


def _configs_replaced() -> bool:
    """Whether ``launch_config`` / ``_config`` are replaced (the tuning and static-profile tools record or force
    configs through them: they see every call, so no plan is cached or served meanwhile)."""
    return launch_config is not _SHIPPED_LAUNCH_CONFIG or _config is not _SHIPPED_CONFIG


def _cached(plans: dict, key: tuple):
    """``plans[key]`` or None (always None while configs are replaced)."""
    return None if _configs_replaced() else plans.get(key)


def _keep(plans: dict, key: tuple, plan) -> None:
    """Cache ``plan`` under ``key`` (a bounded cache: cleared at 256 entries), unless configs are replaced."""
    if _configs_replaced():
        return
    if len(plans) >= 256:
        plans.clear()
    plans[key] = plan


def _plan(plans: dict, build, q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets,
          max_relative_positions, span, dropout_p, max_seqlens, backward: bool) -> tuple:
    """``(plan, mask_args)``: ``plans``' plan of this signature (:func:`_plan_key`, :func:`_cached`), on a miss
    ``build(pr, Lq, Lk, H, D, q_rows, k_rows)`` of the launch prepared from scratch (``pr``: :func:`_prepare`
    without the call's mask operands, or with the placeholders of a call without masks; ``q_rows`` / ``k_rows``:
    the rows of its tables), and the call's mask operands."""
    varlen = max_seqlens is not None
    Lq, Lk = max_seqlens if varlen else (q.shape[2], k.shape[2])
    key = (backward,) + _plan_key(q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets,
                                  max_relative_positions, span, dropout_p, max_seqlens)
    plan = _cached(plans, key)
    if plan is not None:
        mask_args = plan.pr.mask_args  # the dummies of a call without masks, kept
        if mask_args is None:
            mask_args = _mask_tensors(q.device, key_mask, full_mask, uniform_rows, Lq, Lk)[1]
        return plan, mask_args
    if varlen:
        (q_rows, H, D), k_rows = q.shape, k.shape[0]
        pr = _varlen_prepare(q, k, pos_key, pos_query, Lq, Lk, position_buckets, max_relative_positions, span,
                             dropout_p, backward)
    else:
        B, H, _, D = q.shape
        q_rows, k_rows = B * Lq, B * Lk
        pr = _prepare(q, k, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets,
                      max_relative_positions, span, dropout_p, backward=backward)
    masked = key_mask is not None or full_mask is not None or uniform_rows is not None
    plan = build(replace(pr, mask_args=None) if masked else pr, Lq, Lk, H, D, q_rows, k_rows)
    _keep(plans, key, plan)
    return plan, pr.mask_args


def _fwd_plan(q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets,
              max_relative_positions, span, dropout_p, max_seqlens=None) -> tuple[_FwdPlan, tuple]:
    """``(plan, mask_args)`` of a forward (:func:`_plan`), so that a repeated call only makes its mask operands
    (host time: benchmarks/NOTES.md, "Host path: one plan per signature").  Packed inputs (``[T,H,D]``):
    ``max_seqlens = (max_seqlen_q, max_seqlen_k)``, no masks."""
    def build(pr, Lq, Lk, H, D, q_rows, k_rows):
        # the output is allocated contiguous: an empty tensor of its layout gives its strides
        if max_seqlens is not None:
            strides = _varlen_strides(q, k, v, q.new_empty((0, H, D)))
        else:
            strides = _qkvo_strides(q, k, v, q.new_empty((0, H, Lq, D)))
        cfg = _fwd_launch_config(Lq, Lk, D, pr)
        dist, nslot, dist_args, flags = _dist_plan(pr, Lq, Lk, D)
        q_rows, k_rows = _table_rows(q_rows, k_rows, Lq, Lk, flags, max_seqlens is None)
        per_head = _table_bytes(pr, q_rows, k_rows, q.dtype, nslot) + _key_bias_bytes(pr, k_rows, D, q, flags)
        kwargs, plain = dict(_launch_kwargs(cfg, pr, fwd=True), **flags), None
        if tma_requested() and tma_problem(q, k, v, pr.arch) is None:
            kwargs, plain = dict(kwargs, TMA=True), kwargs
        return _FwdPlan(pr, cfg, head_groups(H, per_head), (*strides, *pr.mask_strides), kwargs, dist, nslot,
                        dist_args, plain)

    return _plan(_FWD_PLANS, build, q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets,
                 max_relative_positions, span, dropout_p, max_seqlens, False)


def _table_rows(q_rows: int, k_rows: int, Lq: int, Lk: int, flags: dict, padded: bool) -> tuple:
    """The rows of a launch's tables: ``q_rows`` / ``k_rows`` (``B * L``, or the packed tokens), for padded
    distance tables with each ``(b, h)`` block rounded up to ``TPAD`` rows (:func:`_tables`)."""
    tpad = flags.get("TPAD")
    if not (padded and tpad):
        return q_rows, k_rows
    return q_rows // max(Lq, 1) * -(-Lq // tpad) * tpad, k_rows // max(Lk, 1) * -(-Lk // tpad) * tpad


def _key_bias_bytes(pr: _Prepared, k_rows: int, D: int, q, flags: dict) -> int:
    """Bytes per head of :func:`_key_bias`' copy of ``k`` (``k_rows`` padded rows of ``D + 8``) under ``DIST_KEYED``
    with a P2C term (counted whether or not the call needs it: a plan serves every mask of its signature)."""
    if flags.get("DIST") != DIST_KEYED.value or not pr.constexprs["HAS_P2C"]:
        return 0
    return k_rows * (D + 8) * q.element_size()


def _bwd_plan(q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets,
              max_relative_positions, span, dropout_p, max_seqlens=None) -> tuple[_BwdPlan, tuple]:
    """``(plan, mask_args)`` of a backward (:func:`_plan`): the launch with the run table of the relative
    gradients, the head groups, both kernels' configs and launch arguments.  Padded: ``q`` / ``k``
    ``[B,H,L,D]``; packed: ``[T,H,D]`` and ``max_seqlens``."""
    def build(pr, Lq, Lk, H, D, q_rows, k_rows):
        cfg = _config("bwd", Lq, Lk, D, pr)
        dist, nslot, dist_args, flags = _dist_plan(pr, Lq, Lk, D)
        t_rows = _table_rows(q_rows, k_rows, Lq, Lk, flags, max_seqlens is None)
        s_rows = _table_rows(q_rows, k_rows, Lq, Lk, {"TPAD": 16}, max_seqlens is None)  # (run sums: _table_block)
        per_head = (_table_bytes(pr, *t_rows, q.dtype, nslot) + _key_bias_bytes(pr, t_rows[1], D, q, flags)
                    + _table_bytes(pr, *s_rows, q.dtype, 0, pr.sums[0] + 1))
        if max_seqlens is None:  # a padded group also allocates its dq / dk / dv
            dq_t, dk_t = (4 if host else q.element_size() for host in _host_shares(pos_key, pos_query))
            per_head += (dq_t * q_rows + (dk_t + q.element_size()) * k_rows) * D
        width, kt = _keep_width(pr, cfg, Lq, Lk), max(64, cfg.dq.block_n)
        per_head += width * (k_rows + kt * (k_rows // max(Lk, 1) + 2)) // 4  # (_keep_rows; packed: about)
        flags = dict(flags, RUN_PRODUCTS=REL_SHARE == "kernel", KEEP_BITS=width > 0, KEEP_KT=kt)
        return _BwdPlan(pr, cfg, head_groups(H, per_head), dict(_launch_kwargs(cfg.dkdv, pr), **flags),
                        dict(_launch_kwargs(cfg.dq, pr), **flags), dist, nslot, dist_args, width)

    return _plan(_BWD_PLANS, build, q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets,
                 max_relative_positions, span, dropout_p, max_seqlens, True)


#: Where the dK/dV kernel's dropout decisions come from: "bits" (shipped: the dq kernel, launched first, stores its
#: decisions, a byte per Philox call (``_store_keep_bytes``: ``Lq * Lk / 8`` bytes per ``(b, h)``), and dK/dV reads
#: them: no Philox call in dK/dV, whose transposed tile holds a call's 8 elements in two lanes) or "philox" (dK/dV
#: draws them itself, as until 2026-12-07).  The same decisions either way; an experiment for a GPU A/B, not a user
#: setting.
DROPOUT_BITS = "bits"


def _keep_width(pr: _Prepared, cfg: BackwardConfig, Lq: int, Lk: int) -> int:
    """Bytes per key row of a backward's dropout decisions (:data:`DROPOUT_BITS`; a column per 2 queries, for every
    query tile either kernel walks: ``Lq`` rounded up to a tile), or 0: no dropout, "philox", or a ``(b, h)`` block
    past the kernels' int32 offsets."""
    if DROPOUT_BITS != "bits" or not pr.constexprs["DROPOUT"]:
        return 0
    tile = max(64, cfg.dq.block_m, cfg.dkdv.block_m)
    width = -(-Lq // tile) * tile // 2
    return width if (Lk // 4 + 64) * width < 2**31 else 0


def _keep_rows(k_len: int, batch: int, heads: int, varlen: bool, kt: int) -> tuple:
    """``(rows per block, rows)`` of a backward's dropout decisions (``_keep_block``: ``kt`` its ``KEEP_KT``): per
    ``(b, h)``, ``k_len`` rounded up to ``kt`` keys, a 4th (padded); per head, packed ``k_len`` tokens in ``batch``
    sequences, sequence ``b`` from row ``(k0 + kt b) // 4`` (offsets clamped to ``[0, k_len]``: in range whatever
    they are); a multiple of 16 (one specialisation of ``RH``)."""
    per = -(-((k_len + kt * batch) // 4 + kt // 4) // 16) * 16 if varlen else -(-k_len // kt) * kt // 4
    return per, per * (heads if varlen else batch * heads)


def _keep_buffer(rows: int, width: int, dummy) -> torch.Tensor:
    """The dropout decisions' buffer, int8 ``[rows, width]`` (uninitialised: the dq kernel writes every byte the dK/dV
    kernel reads; under the interpreter filled with a pattern, so that a read of an unwritten byte shows in the
    tests), or ``dummy`` without."""
    if not width:
        return dummy
    out = torch.empty((rows, width), device=dummy.device, dtype=torch.int8)
    return out.fill_(0x5A) if interpreting() else out


def clear_caches() -> None:
    """Forget the cached layouts and plans (a test that changes the position caches calls it)."""
    _LAYOUTS.clear()
    _FWD_PLANS.clear()
    _BWD_PLANS.clear()


@_aligned_head_dim(5)
def attention_forward(q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, *, position_buckets,
                      max_relative_positions, span, scale, dropout_p, seed):
    """Fused forward.  Returns ``(out [B,H,Lq,D] in q.dtype, stats float32 [2,B,H,Lq])``."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    plan, mask_args = _fwd_plan(q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets,
                                max_relative_positions, span, dropout_p)
    pr, cfg = plan.pr, plan.cfg
    # [B, H, Lq, D]; empty_like: ~0.6 us less than empty(shape) (measured on the 2-core CPU machine, 2026-12-05)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    stats = torch.empty((2, B, H, Lq), device=q.device, dtype=torch.float32)
    tail = (float(scale), *pr.band, _drop_rate(dropout_p), _drop_threshold(dropout_p) if dropout_p else 0,
            seed_operand(seed, dropout_p, q.device), *plan.dist_args)
    (kwargs, scratch), layout = _tma_kwargs(plan, q, k, v), ()
    if plan.dist is not None:
        kwargs = _dist_kwargs(kwargs, scale)
        layout = _table_layout(kwargs, mask_args, pr)
    one = len(plan.groups) == 1
    for hs in plan.groups:
        n, g = hs.stop - hs.start, (None if one else hs)  # one group: no views (host time)
        # the kernels index the statistics as [B, n, Lq]: a group's own buffer, copied into place
        st = stats if one else torch.empty((2, B, n, Lq), device=q.device, dtype=torch.float32)
        grid = (_cdiv(Lq, cfg.block_m), B * n)
        c2p, p2c, scr, rel_strides, skew, win = _rel_args(q, k, pos_key, pos_query, pr, g, cfg, grid[0] * grid[1],
                                                          plan.dist, layout)
        with scratch:
            disentangled_fwd_kernel[grid](
                *_heads(g, q, k, v), c2p, p2c, pr.table, pr.table, pr.table, *_group_masks(mask_args, g),
                *_heads(g, out), st, scr, *plan.strides, *rel_strides, n, H, hs.start, Lq, Lk, Lq, Lk, D,
                plan.nslot, *tail, SKEW=skew, WIN=win, **kwargs)
        if not one:
            stats[:, :, hs] = st
    return out, stats


def _unfilled(shape, device) -> torch.Tensor:
    """A float32 buffer the kernels write every location of that they read or return (the padded backward's run
    sums, ``DELTA``; packed, tokens of no sequence have no ``DELTA`` and are not read): uninitialised, NaN-filled
    under the interpreter so that a location no kernel wrote fails the tests."""
    out = torch.empty(shape, device=device, dtype=torch.float32)
    return out.fill_(float("nan")) if interpreting() else out


def _position_grads(sums, pos, x, pr: _Prepared, rev: bool = False):
    """Per-run sums of dS (``[B,H,L',NRUN]``, or ``[H,T,NRUN]`` packed; runs of
    :func:`deberta_fast.positions.distance_runs`; ``rev``: in decreasing run order, dq's ``CSUM``, see
    :func:`_sums_layout`; ``L' >= L``, ``x``'s rows: the padded buffers' rows, unwritten past ``L``, so that the view
    of their run columns folds into one matrix without a copy) -> ``d pos``: ``pos``'s shape (zero outside
    ``pr.rows``), summed over batch when ``pos`` is ``[H, 2*span, D]`` and ``sums`` has a batch dim.  (The other
    half, ``dS_rel @ pos`` into dq / dk, the kernels add themselves: ``_run_products``.)

    Run ``r`` reads row ``run_rows[r]`` of ``pos[..., rows, :]``.  Runs sharing a row (the distances of one log
    bucket) are folded with a 0/1 matrix product, not an atomic scatter: deterministic.  When run ``r`` is row ``r``
    (``runs_identity``: every distance in the linear range, short sequences) there is nothing to scatter (``rev``:
    a flip)."""
    run_rows = pr.run_rows_rev if rev else pr.run_rows
    L = x.shape[-2]
    if sums.shape[-2] != L:
        sums = sums[..., :L, :]
    druns = torch.matmul(sums.transpose(-1, -2), x.float())
    if druns.dim() > pos.dim():  # batch 1: the sum over one batch entry is that entry (no copy, no launch)
        druns = druns[0] if druns.shape[0] == 1 else druns.sum(0)
    nrows = pr.rows.stop - pr.rows.start
    if pr.runs_identity:
        dsub = druns.flip(-2) if rev else druns
    elif pr.runs_unique:
        dsub = druns.new_zeros((*druns.shape[:-2], nrows, druns.shape[-1]))
        dsub[..., run_rows, :] = druns
    else:
        fold = torch.nn.functional.one_hot(run_rows, nrows).to(druns.dtype)  # [NRUN, rows]
        dsub = torch.matmul(fold.t(), druns)
    # zero rows outside ``rows``: one pad instead of zeros + a slice copy (the aten op: F.pad's wrapper cost ~0.4 us,
    # measured on the 2-core CPU machine, 2026-12-05); none when every row is used (a pad of 0 copies)
    dpos = dsub.to(pos.dtype)
    below, above = pr.rows.start, pos.shape[-2] - pr.rows.stop
    if below or above:
        dpos = torch.constant_pad_nd(dpos, (0, 0, below, above))
    return dpos


def _host_shares(pos_key, pos_query) -> tuple:
    """Whether the host adds dq's / dk's relative share (``REL_SHARE = "host"`` and the term present): those
    gradients are then float32 buffers until it has."""
    host = REL_SHARE == "host"
    return host and pos_key is not None, host and pos_query is not None


def _add_share(grad, sums, pos, pr: _Prepared, rev: bool):
    """``grad + sums @ pos[run rows]`` (``REL_SHARE = "host"``: what ``_run_products`` adds in the kernels), in place
    where :func:`add_product_` can; ``sums`` as :func:`_position_grads` takes them."""
    sums = sums[..., :grad.shape[-2], :]
    sub = pos[..., pr.rows, :].float().index_select(-2, pr.run_rows_rev if rev else pr.run_rows)
    return add_product_(grad, sums, sub)


def _unit_columns(*pos) -> tuple:
    """``pos`` (None kept) with unit column stride, as :func:`_run_products` reads them (a copy only if not)."""
    return tuple(p if p is None or p.stride(-1) == 1 else p.contiguous() for p in pos)


def _pos_operands(pos, pr: _Prepared, dummy) -> tuple:
    """The kernels' ``POS, RUNROW`` and ``s_pb, s_ph, s_pr`` for ``pos`` (``[H, R, D]`` or ``[B, H, R, D]``, unit
    column stride) of the term whose relative share they add (:func:`_run_products`); dummies without it."""
    if pos is None:
        return (dummy, dummy), (0, 0, 0)
    return (pos, pr.run_pos_rows), ((0,) if pos.dim() == 3 else ()) + pos.stride()[:-1]


def _grad_buffers(pos_key, pos_query, shapes, dtypes, device, grouped: bool):
    """The backward's outputs when heads run in groups (``grouped``): ``dq``, ``dk``, ``dv`` (``shapes`` /
    ``dtypes``) and the position gradients, each group writing its heads; else Nones."""
    if not grouped:
        return None
    grads = [torch.empty(sh, device=device, dtype=dt) for sh, dt in zip(shapes, dtypes)]
    return grads + [None if p is None else torch.empty_like(p) for p in (pos_key, pos_query)]


@_aligned_head_dim(7)
def attention_backward(do, q, k, v, pos_key, pos_query, out, stats, key_mask, full_mask, uniform_rows, *,
                       position_buckets, max_relative_positions, span, scale, dropout_p, seed):
    """Fused backward from the forward's ``stats``.  Returns ``(dq, dk, dv, dpos_key, dpos_query)``
    (position grads None when the term is absent), in the input dtypes."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if do.stride(-1) != 1 or not rows_fit(do.stride(-2), Lq):
        do = do.contiguous()
    if out.stride(-1) != 1 or not rows_fit(out.stride(-2), Lq):  # (the dq kernel reads it: DELTA)
        out = out.contiguous()
    stats = stats.contiguous()  # the kernels find its second plane (_stat_planes)
    pos_key, pos_query = _unit_columns(pos_key, pos_query)
    plan, mask_args = _bwd_plan(q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets,
                                max_relative_positions, span, dropout_p)
    pr, cfg, groups = plan.pr, plan.cfg, plan.groups
    dummy = _dummies(q.device)[2]
    has_c2p, has_p2c = pos_key is not None, pos_query is not None
    one = len(groups) == 1
    o_strides = out.stride()[:3]
    res = _grad_buffers(pos_key, pos_query, (q.shape, k.shape, v.shape), (q.dtype, k.dtype, v.dtype), q.device,
                        not one)
    kw_dq, kw_dkdv, layout = plan.kw_dq, plan.kw_dkdv, ()
    seed = seed_operand(seed, dropout_p, q.device)
    if plan.dist is not None:  # (the forward's tables: the same layout at the same scale)
        kw_dq, kw_dkdv = _dist_kwargs(kw_dq, scale), _dist_kwargs(kw_dkdv, scale)
        layout = _table_layout(kw_dq, mask_args, pr)
    host_q, host_k = _host_shares(pos_key, pos_query)
    for hs in groups:
        n, g = hs.stop - hs.start, (None if one else hs)
        dq = torch.empty((B, n, Lq, D), device=q.device, dtype=torch.float32 if host_q else q.dtype)
        dk = torch.empty((B, n, Lk, D), device=q.device, dtype=torch.float32 if host_k else k.dtype)
        dv = torch.empty((B, n, Lk, D), device=q.device, dtype=v.dtype)
        # every location is written by the kernels (no zero fill); NaN under the interpreter, so that the tests see
        # an unwritten one
        # rows of RS1 + 1 columns, each (b, h) block of a multiple of 16 rows (_sums_layout, _table_block)
        width = pr.sums[0] + 1
        c_sum = _unfilled((B, n, -(-Lq // 16) * 16, width), q.device) if has_c2p else dummy
        p_sum = _unfilled((B, n, -(-Lk // 16) * 16, width), q.device) if has_p2c else dummy
        # rowsum(dO * O) and, with a mask, LOGSUM with +inf on the uniform rows: the dq kernel's, for the dK/dV kernel
        dl = _unfilled((2 if pr.constexprs["MASK_KIND"] else 1, B, n, Lq), q.device)
        common = (*_qkvo_strides(q, k, v, do), *pr.mask_strides,
                  n, H, hs.start, Lq, Lk, Lq, Lk, D, plan.nslot, pr.nrun, float(scale), *pr.band, pr.run0,
                  _drop_rate(dropout_p), _drop_threshold(dropout_p), seed, *plan.dist_args, *pr.sums)
        st = stats if one else stats[:, :, hs].contiguous()
        qg, kg, vg, dog, og, pkg, pqg = _heads(g, q, k, v, do, out, pos_key, pos_query)
        tables = _tables(q, k, pos_key, pos_query, pr, g, plan.dist and plan.dist[2:], *layout)
        inputs = (qg, kg, vg, dog, st, dl, *tables, pr.table, pr.table, pr.table, *_group_masks(mask_args, g))
        (pk_ops, pk_strides), (pq_ops, pq_strides) = _pos_operands(pkg, pr, dummy), _pos_operands(pqg, pr, dummy)
        keep_rows, rows = _keep_rows(Lk, B, n, False, kw_dq["KEEP_KT"])
        keep = _keep_buffer(rows, plan.keep_bytes, dummy)
        disentangled_bwd_dq_kernel[(_cdiv(Lq, cfg.dq.block_m), B * n)](*inputs, dq, c_sum, og, *pk_ops, keep,
                                                                        *common, *o_strides, *pk_strides, 0, 0,
                                                                        plan.keep_bytes, keep_rows, **kw_dq)
        disentangled_bwd_dkdv_kernel[(_cdiv(Lk, cfg.dkdv.block_n), B * n)](*inputs, dk, dv, p_sum, *pq_ops, keep,
                                                                            *common, *pq_strides, 0, 0,
                                                                            plan.keep_bytes, keep_rows, **kw_dkdv)
        dpos_key = dpos_query = None
        if has_c2p:
            dpos_key = _position_grads(c_sum[..., pr.run_columns(True)], pkg, qg, pr, True)
        if has_p2c:
            dpos_query = _position_grads(p_sum[..., pr.run_columns(False)], pqg, kg, pr)
        if host_q:
            dq = _add_share(dq, c_sum[..., pr.run_columns(True)], pkg, pr, True)
        if host_k:
            dk = _add_share(dk, p_sum[..., pr.run_columns(False)], pqg, pr, False)
        if one:
            return dq.to(q.dtype), dk.to(k.dtype), dv, dpos_key, dpos_query
        for dst, src in zip(res, (dq, dk, dv, dpos_key, dpos_query)):
            if src is not None:
                dst[..., hs, :, :] = src
    return tuple(res)


# ---------------------------------------------------------------- packed (varlen) sequences

def _varlen_strides(q, k, v, o):
    """Token / head strides of ``[T,H,D]`` tensors in the kernels' ``(batch, head, row)`` order
    (batch stride 0: a packed program finds its sequence through ``cu_seqlens``)."""
    return tuple(x for t in (q, k, v, o) for x in (0, t.stride(1), t.stride(0)))


def _varlen_prepare(q, k, pos_key, pos_query, max_seqlen_q, max_seqlen_k, position_buckets,
                    max_relative_positions, span, dropout_p, backward=False) -> _Prepared:
    return _prepare(q.transpose(0, 1), k.transpose(0, 1), pos_key, pos_query, None, None, None, position_buckets,
                    max_relative_positions, span, dropout_p, table_lens=(max_seqlen_q, max_seqlen_k), varlen=True,
                    backward=backward)


@_aligned_head_dim(5)
def attention_forward_varlen(q, k, v, pos_key, pos_query, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                             position_buckets, max_relative_positions, span, scale, dropout_p, seed):
    """Fused forward over packed sequences.  ``q [Tq,H,D]``, ``k``/``v [Tk,H,D]`` (last dim
    contiguous), ``pos_key``/``pos_query [H,2*span,D]`` or None.  Returns ``(out [Tq,H,D] in
    q.dtype, stats float32 [2,H,Tq])``; rows of no sequence (only with offsets that do not cover the tokens) are 0,
    their statistics ``+inf`` (log-sum-exp ``+inf``, as on rows without keys)."""
    Tq, H, D = q.shape
    Tk = k.shape[0]
    N = cu_seqlens_q.numel() - 1
    plan, mask_args = _fwd_plan(q, k, v, pos_key, pos_query, None, None, None, position_buckets,
                                max_relative_positions, span, dropout_p, (max_seqlen_q, max_seqlen_k))
    pr, cfg = plan.pr, plan.cfg
    out = torch.zeros((Tq, H, D), device=q.device, dtype=q.dtype)
    stats = torch.full((2, H, Tq), float("inf"), device=q.device, dtype=torch.float32)  # (one fill, not two)
    qt, kt = q.transpose(0, 1), k.transpose(0, 1)
    one = len(plan.groups) == 1
    kwargs, scratch = _tma_kwargs(plan, q, k, v)
    tail = (Tq, Tk, max_seqlen_q, max_seqlen_k, D, plan.nslot, float(scale), *pr.band, _drop_rate(dropout_p),
            _drop_threshold(dropout_p) if dropout_p else 0, seed_operand(seed, dropout_p, q.device), *plan.dist_args)
    for hs in plan.groups:
        n, g = hs.stop - hs.start, (None if one else hs)
        grid = (_cdiv(max_seqlen_q, cfg.block_m), N * n)
        c2p, p2c, scr, rel_strides, skew, win = _rel_args(qt, kt, pos_key, pos_query, pr, g, cfg, grid[0] * grid[1],
                                                          plan.dist)
        with scratch:
            disentangled_fwd_kernel[grid](
                *_heads(g, q, k, v, axis=1), c2p, p2c, pr.table, cu_seqlens_q, cu_seqlens_k, *mask_args,
                *_heads(g, out, axis=1), *_heads(g, stats, axis=1), scr, *plan.strides, *rel_strides, n, H,
                hs.start, *tail, SKEW=skew, WIN=win, **kwargs)
    return out, stats


@_aligned_head_dim(7)
def attention_backward_varlen(do, q, k, v, pos_key, pos_query, out, stats, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, *, position_buckets, max_relative_positions, span, scale, dropout_p,
                              seed):
    """Fused backward over packed sequences from the forward's ``stats [2,H,Tq]``.  Returns
    ``(dq [Tq,H,D], dk, dv [Tk,H,D], dpos_key, dpos_query)`` (position grads ``[H,2*span,D]``
    or None), in the input dtypes."""
    Tq, H, D = q.shape
    Tk = k.shape[0]
    N = cu_seqlens_q.numel() - 1
    if do.stride(-1) != 1 or not rows_fit(do.stride(0), max_seqlen_q):
        do = do.contiguous()
    if out.stride(-1) != 1 or not rows_fit(out.stride(0), max_seqlen_q):
        out = out.contiguous()
    stats = stats.contiguous()  # the kernels find its second plane (_stat_planes)
    if any(p is not None and p.dim() != 3 for p in (pos_key, pos_query)):  # (the kernels' batch is the sequence)
        raise ValueError(f"packed calls take pos_key / pos_query [H, 2*span, D], got "
                         f"{[None if p is None else list(p.shape) for p in (pos_key, pos_query)]}")
    pos_key, pos_query = _unit_columns(pos_key, pos_query)
    plan, mask_args = _bwd_plan(q, k, v, pos_key, pos_query, None, None, None, position_buckets,
                                max_relative_positions, span, dropout_p, (max_seqlen_q, max_seqlen_k))
    pr, cfg, groups = plan.pr, plan.cfg, plan.groups
    f32 = dict(device=q.device, dtype=torch.float32)
    # the inputs' [T, H, D] and dtype, stored by the kernels (float32 where the host adds a share); zero-filled:
    # tokens of no sequence (offsets that do not cover them) get no gradient
    host_q, host_k = _host_shares(pos_key, pos_query)
    dq = torch.zeros((Tq, H, D), device=q.device, dtype=torch.float32 if host_q else q.dtype)
    dk = torch.zeros((Tk, H, D), device=q.device, dtype=torch.float32 if host_k else k.dtype)
    dv = torch.zeros((Tk, H, D), device=q.device, dtype=v.dtype)
    g_strides = (D, H * D)  # (head, token) of all three
    dummy = _dummies(q.device)[2]
    has_c2p, has_p2c = pos_key is not None, pos_query is not None
    qt, kt = q.transpose(0, 1), k.transpose(0, 1)
    dpos = [None if p is None or len(groups) == 1 else torch.empty_like(p) for p in (pos_key, pos_query)]
    seed = seed_operand(seed, dropout_p, q.device)
    for hs in groups:
        n, g = hs.stop - hs.start, (None if len(groups) == 1 else hs)
        c_sum = torch.zeros((n, Tq, pr.sums[0] + 1), **f32) if has_c2p else dummy  # (_sums_layout)
        p_sum = torch.zeros((n, Tk, pr.sums[0] + 1), **f32) if has_p2c else dummy
        common = (*_varlen_strides(q, k, v, do), *pr.mask_strides, n, H, hs.start, Tq, Tk, max_seqlen_q,
                  max_seqlen_k, D, plan.nslot, pr.nrun, float(scale), *pr.band, pr.run0, _drop_rate(dropout_p),
                  _drop_threshold(dropout_p), seed, *plan.dist_args, *pr.sums)
        (stg,), (dqg, dkg, dvg) = _heads(g, stats, axis=1), _heads(g, dq, dk, dv, axis=1)
        dl = _unfilled((n, Tq), q.device)  # [H, Tq] rowsum(dO * O): the dq kernel's (rows of no sequence unused)
        qg, kg, vg, dog, og = _heads(g, q, k, v, do, out, axis=1)
        pkg, pqg = _heads(g, pos_key, pos_query)
        (pk_ops, pk_strides), (pq_ops, pq_strides) = _pos_operands(pkg, pr, dummy), _pos_operands(pqg, pr, dummy)
        inputs = (qg, kg, vg, dog, stg, dl, *_tables(qt, kt, pos_key, pos_query, pr, g, plan.dist and plan.dist[2:]),
                  pr.table, cu_seqlens_q, cu_seqlens_k, *mask_args)
        keep_rows, rows = _keep_rows(Tk, N, n, True, plan.kw_dq["KEEP_KT"])
        keep = _keep_buffer(rows, plan.keep_bytes, dummy)
        disentangled_bwd_dq_kernel[(_cdiv(max_seqlen_q, cfg.dq.block_m), N * n)](*inputs, dqg, c_sum, og, *pk_ops,
                                                                                 keep, *common, 0, out.stride(1),
                                                                                 out.stride(0), *pk_strides,
                                                                                 *g_strides, plan.keep_bytes,
                                                                                 keep_rows, **plan.kw_dq)
        disentangled_bwd_dkdv_kernel[(_cdiv(max_seqlen_k, cfg.dkdv.block_n), N * n)](*inputs, dkg, dvg, p_sum,
                                                                                     *pq_ops, keep, *common,
                                                                                     *pq_strides, *g_strides,
                                                                                     plan.keep_bytes, keep_rows,
                                                                                     **plan.kw_dkdv)
        for i, (sums, pos, x) in enumerate(((c_sum, pkg, qt), (p_sum, pqg, kt))):
            if pos is None:
                continue
            g_pos = _position_grads(sums[..., pr.run_columns(i == 0)], pos, *_heads(g, x), pr, i == 0)
            if (host_q, host_k)[i]:  # (grad: a [n, T, D] view of dq / dk, accumulated in place: 3-D operands)
                _add_share((dqg, dkg)[i].transpose(0, 1), sums[..., pr.run_columns(i == 0)], pos, pr, i == 0)
            if g is None:
                dpos[i] = g_pos
            else:
                dpos[i][hs] = g_pos
    return dq.to(q.dtype), dk.to(k.dtype), dv, dpos[0], dpos[1]
