"""The ``"triton"`` backend: fused forward/backward Triton kernels (in ``kernels/``).

Layers: kernels (``deberta_fast._kernels.triton_attention_{fwd,bwd}``) -> host launch
functions (``triton_attention_launch``) -> custom ops ``deberta_fast::triton_fwd`` /
``deberta_fast::triton_bwd`` (with fake impls, so ``torch.compile`` traces them) ->
:class:`TritonAttentionFunction` -> :class:`TritonBackend`.  Packed sequences use the same kernels
(``VARLEN=True``) through ``deberta_fast::triton_varlen_fwd`` / ``triton_varlen_bwd`` and
:class:`TritonVarlenFunction`.  Triton is imported lazily.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .._env import interpreting
from .base import AttentionCall, Backend, VarlenCall, autodiff_refusals
from .eager import direct as _direct, records_grad as _records_grad

MAX_HEAD_DIM = 256


_LAUNCH = []


def _launch():
    """The launch module (imported on first use: importing it imports triton)."""
    if not _LAUNCH:
        from deberta_fast._kernels import triton_attention_launch
        _LAUNCH.append(triton_attention_launch)
    return _LAUNCH[0]


@functools.lru_cache(maxsize=1)
def interpreter_problem() -> Optional[str]:
    """Why this triton's interpreter cannot run the kernels with this numpy, or None.

    Triton < 3.7's interpreter turns 1-element arrays into loop bounds with ``int(array)``, which
    numpy >= 2.4 refuses (``TypeError: only 0-dimensional arrays can be converted``); seen with
    triton 3.6.0 and numpy 2.4.6 / 2.5.5 (numpy 2.3.5 works).  Only the CPU interpreter is affected."""
    import numpy as np
    import triton

    major_minor = tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit())
    if major_minor >= (3, 7):
        return None
    try:
        int(np.zeros(1, dtype=np.int32))
    except TypeError:
        return (f"the Triton interpreter of triton {triton.__version__} cannot run with numpy {np.__version__} "
                f"(it calls int() on 1-element arrays, which numpy >= 2.4 refuses): pip install 'numpy<2.4' "
                f"or 'triton>=3.7' (GPU runs are not affected)")
    return None


def _op_problem(q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, span, scale, dropout_p):
    """Why the custom ops' kernels cannot take these arguments (a shape, device or value they would index out of
    bounds with, or compute nonsense from), or None.  The dispatcher validates every call it makes; this guards a
    direct ``torch.ops.deberta_fast.triton_fwd`` / ``triton_bwd`` call (shapes and scalars only: no device sync)."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        return f"q [B,H,Lq,D] and k / v [B,H,Lk,D] do not match: {list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"q must be float16, bfloat16 or float32, got {q.dtype}"
    for name, t in (("k", k), ("v", v), ("pos_key", pos_key), ("pos_query", pos_query), ("key_mask", key_mask),
                    ("full_mask", full_mask), ("uniform_rows", uniform_rows)):
        if t is not None and t.device != q.device:
            return f"{name} is on {t.device}, q on {q.device}"
        if t is not None and name in ("k", "v", "pos_key", "pos_query") and t.dtype != q.dtype:
            return f"{name} is {t.dtype}, q {q.dtype}"
    for name, pos in (("pos_key", pos_key), ("pos_query", pos_query)):
        if pos is None:
            continue
        if span < 1 or not ((pos.dim() == 3 and pos.shape[0] == H) or (pos.dim() == 4 and pos.shape[:2] == (B, H))):
            return f"{name} must be [H, R, D] or [B, H, R, D] with span >= 1, got {list(pos.shape)}, span {span}"
        if pos.shape[-2] < 2 * span or pos.shape[-1] != D:
            return f"{name} has {pos.shape[-2]} rows of {pos.shape[-1]}: span {span} needs >= {2 * span} rows of {D}"
    if key_mask is not None and tuple(key_mask.shape) != (B, Lk):
        return f"key_mask must be [B, Lk] = [{B}, {Lk}], got {list(key_mask.shape)}"
    if full_mask is not None:
        fm = full_mask.shape
        if full_mask.dim() != 4 or fm[0] not in (1, B) or fm[1] not in (1, H) or fm[2:] != (Lq, Lk):
            return f"full_mask must be [B|1, 1|H, Lq, Lk] = [{B}|1, 1|{H}, {Lq}, {Lk}], got {list(fm)}"
        if key_mask is not None:
            return "key_mask and full_mask are exclusive"
    for name, m in (("full_mask", full_mask), ("uniform_rows", uniform_rows)):
        if m is not None and m.dtype != torch.bool:  # (the kernels read their bytes)
            return f"{name} must be bool, got {m.dtype}"
    if uniform_rows is not None:
        un = uniform_rows.shape
        if uniform_rows.dim() != 3 or un[0] not in (1, B) or un[1] not in (1, H) or un[2] != Lq:
            return f"uniform_rows must be [B|1, 1|H, Lq] = [{B}|1, 1|{H}, {Lq}], got {list(un)}"
        if key_mask is None and full_mask is None:
            return "uniform_rows without a key_mask or full_mask"
    if not (0.0 <= dropout_p < 1.0) or not (abs(scale) < float("inf")):
        return f"dropout_p must be in [0, 1) and scale finite, got {dropout_p}, {scale}"
    return _launch().row_offset_problem(q, k, v, Lq, Lk)  # (int32 row offsets within a (batch, head) block)


def _check_op(*args) -> None:
    why = _op_problem(*args)
    if why:
        raise ValueError(f"deberta_fast::triton op: {why}")


def _fwd_launch(q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets,
                max_relative_positions, span, scale, dropout_p, seed):
    return _launch().attention_forward(
        q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets=position_buckets,
        max_relative_positions=max_relative_positions, span=span, scale=scale, dropout_p=dropout_p, seed=seed)


def _triton_fwd_impl(q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor], pos_query: Optional[Tensor],
                     key_mask: Optional[Tensor], full_mask: Optional[Tensor], uniform_rows: Optional[Tensor],
                     position_buckets: int, max_relative_positions: int, span: int, scale: float,
                     dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``(out [B,H,Lq,D], stats float32 [2,B,H,Lq])``: softmax row max and log2 row sum of the
    log2-domain scores (``lse_from_stats`` in the launch module gives the natural log-sum-exp).  ``key_mask``
    ``[B, Lk]``, nonzero = attend (any dtype: the caller's mask as given); ``uniform_rows`` bool ``[B, 1|H, Lq]``, or
    None with a key mask and ``Lq == Lk``: the rows of the masked keys (HF's padded rows).  Arguments checked
    (:func:`_op_problem`); the backend's eager calls, validated by the dispatcher, go to :func:`_fwd_launch`."""
    _check_op(q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, span, scale, dropout_p)
    return _fwd_launch(q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets,
                       max_relative_positions, span, scale, dropout_p, seed)


triton_fwd = torch.library.custom_op("deberta_fast::triton_fwd", mutates_args=())(_triton_fwd_impl)


@triton_fwd.register_fake
def _(q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets,
      max_relative_positions, span, scale, dropout_p, seed):
    return q.new_empty(q.shape), q.new_empty((2, *q.shape[:3]), dtype=torch.float32)


def _bwd_launch(do, q, k, v, pos_key, pos_query, out, stats, key_mask, full_mask, uniform_rows, position_buckets,
                max_relative_positions, span, scale, dropout_p, seed):
    dq, dk, dv, dpk, dpq = _launch().attention_backward(
        do, q, k, v, pos_key, pos_query, out, stats, key_mask, full_mask, uniform_rows,
        position_buckets=position_buckets, max_relative_positions=max_relative_positions, span=span,
        scale=scale, dropout_p=dropout_p, seed=seed)
    return dq, dk, dv, q.new_empty(0) if dpk is None else dpk, q.new_empty(0) if dpq is None else dpq


def _triton_bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor],
                     pos_query: Optional[Tensor], out: Tensor, stats: Tensor, key_mask: Optional[Tensor],
                     full_mask: Optional[Tensor], uniform_rows: Optional[Tensor], position_buckets: int,
                     max_relative_positions: int, span: int, scale: float, dropout_p: float,
                     seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dpos_key, dpos_query)``; an absent position gradient is an empty tensor.  Arguments checked
    as the forward's, and ``do`` / ``out`` / ``stats`` against ``q``."""
    _check_op(q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, span, scale, dropout_p)
    if do.shape != q.shape or out.shape != q.shape or tuple(stats.shape) != (2, *q.shape[:3]) \
            or stats.dtype != torch.float32 or any(t.device != q.device for t in (do, out, stats)):
        raise ValueError(f"deberta_fast::triton op: do / out must be q's shape {list(q.shape)} and stats float32 "
                         f"[2, B, H, Lq] on q's device, got {list(do.shape)}, {list(out.shape)}, "
                         f"{stats.dtype} {list(stats.shape)}")
    return _bwd_launch(do, q, k, v, pos_key, pos_query, out, stats, key_mask, full_mask, uniform_rows,
                       position_buckets, max_relative_positions, span, scale, dropout_p, seed)


triton_bwd = torch.library.custom_op("deberta_fast::triton_bwd", mutates_args=())(_triton_bwd_impl)


@triton_bwd.register_fake
def _(do, q, k, v, pos_key, pos_query, out, stats, key_mask, full_mask, uniform_rows, position_buckets,
      max_relative_positions, span, scale, dropout_p, seed):
    def like(t):
        return q.new_empty(0) if t is None else t.new_empty(t.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), like(pos_key), like(pos_query)


def draw_seed(device: torch.device) -> Tensor:
    """A dropout seed, int64 ``[1]`` drawn on ``device`` by torch's generator of that device (``torch.manual_seed``
    reproduces it): no host sync, and a captured CUDA graph draws a fresh one per replay (torch's graph-safe RNG), as
    a compiled graph does per call."""
    return torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=device)


def _seed(seed, dropout_p: float, device: torch.device) -> Optional[Tensor]:
    """The ops' seed operand: None without dropout, else ``seed`` (int, int64 tensor, or None: :func:`draw_seed`) as
    an int64 ``[1]`` tensor on ``device``."""
    if not dropout_p:
        return None
    return draw_seed(device) if seed is None else _launch().seed_operand(seed, dropout_p, device)


def _padded_fwd(*args):
    """``deberta_fast::triton_fwd(*args)``, its implementation called directly when nothing traces
    (:func:`_direct` of the tensor arguments)."""
    fwd = _fwd_launch if _direct(*args[:8]) else torch.ops.deberta_fast.triton_fwd
    return fwd(*args)


class TritonAttentionFunction(torch.autograd.Function):
    """Differentiable wrapper of the two custom ops (all five gradients).  (The combined ``forward(ctx, ...)``
    form: a separate ``setup_context``, which torch.func's transforms need, made each call 30 - 40 us slower on the
    2-core CPU machine, 2026-12-06, and the backward's custom op still refuses those transforms.)"""

    @staticmethod
    def forward(ctx, q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows,
                position_buckets, max_relative_positions, span, scale, dropout_p, seed):
        out, stats = _padded_fwd(q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets,
                                 max_relative_positions, span, scale, dropout_p, seed)
        # (the seed saved, not kept on ctx: a caller's seed tensor changed in place before the backward raises)
        ctx.save_for_backward(q, k, v, pos_key, pos_query, out, stats, key_mask, full_mask, uniform_rows, seed)
        ctx.args = (position_buckets, max_relative_positions, span, scale, dropout_p)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, pos_key, pos_query, out, stats, key_mask, full_mask, uniform_rows, seed = ctx.saved_tensors
        # with grad mode on (double backward) the op is kept: its implementation must not be recorded by autograd
        direct = not torch.is_grad_enabled() and _direct(do, q, k, v, pos_key, pos_query, key_mask, full_mask,
                                                         uniform_rows)
        bwd = _bwd_launch if direct else torch.ops.deberta_fast.triton_bwd
        dq, dk, dv, dpk, dpq = bwd(do, q, k, v, pos_key, pos_query, out, stats, key_mask, full_mask, uniform_rows,
                                   *ctx.args, seed)
        return (dq, dk, dv, dpk if pos_key is not None else None, dpq if pos_query is not None else None,
                None, None, None, None, None, None, None, None, None)


def _distinct(args: tuple) -> tuple:
    """``args``, but while torch.compile traces a tensor passed twice (``q is k``, ``cu_seqlens_q is cu_seqlens_k``,
    ``pos_key is pos_query``) is passed again as a view of itself: dynamo refuses ``autograd.Function.apply`` with a
    duplicate tensor input.  (Eager ``apply`` takes duplicates: no view, no host time.)"""
    if not torch.compiler.is_compiling():
        return args
    out = list(args)
    for i, a in enumerate(out):
        if isinstance(a, Tensor) and any(b is a for b in out[:i]):
            out[i] = a.view_as(a)
    return tuple(out)


def kernel_masks(call: AttentionCall) -> tuple:
    """``(key_mask, full_mask, uniform_rows)`` of ``call`` for the ops: a bool key mask as the user gave it (another
    dtype compared with 0 once: the kernels read bool masks in fewer instructions, and autograd then saves a copy of
    ours, not the user's tensor), without uniform rows when it is HF's 2-D padding mask and ``Lq == Lk`` (the kernels
    find the padded rows in it)."""
    if call.pads_queries and call.q_len == call.k_len:
        m = call.attention_mask
        return (m if m.dtype == torch.bool else m != 0), None, None
    return call.key_mask, call.full_mask, call.uniform_rows  # (another key mask: the host's flags)


def triton_attention(q, k, v, pos_key, pos_query, key_mask=None, full_mask=None, uniform_rows=None, *,
                     position_buckets, max_relative_positions, span, scale, dropout_p=0.0, seed=None):
    """Functional entry (no validation; use :func:`deberta_fast.disentangled_attention`).
    ``seed`` (an int, or an int64 ``[1]`` tensor on the inputs' device) defaults to :func:`draw_seed` when
    ``dropout_p > 0``."""
    args = (q, k, v, pos_key, pos_query, key_mask, full_mask, uniform_rows, position_buckets,
            max_relative_positions, span, float(scale), float(dropout_p), _seed(seed, dropout_p, q.device))
    if not _records_grad(q, k, v, pos_key, pos_query):
        return _padded_fwd(*args)[0]
    return TritonAttentionFunction.apply(*_distinct(args))


def _triton_varlen_fwd_impl(q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor], pos_query: Optional[Tensor],
                            cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                            position_buckets: int, max_relative_positions: int, span: int, scale: float,
                            dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Packed sequences: ``(out [Tq,H,D], stats float32 [2,H,Tq])``."""
    return _launch().attention_forward_varlen(
        q, k, v, pos_key, pos_query, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        position_buckets=position_buckets, max_relative_positions=max_relative_positions, span=span, scale=scale,
        dropout_p=dropout_p, seed=seed)


triton_varlen_fwd = torch.library.custom_op("deberta_fast::triton_varlen_fwd",
                                            mutates_args=())(_triton_varlen_fwd_impl)


@triton_varlen_fwd.register_fake
def _(q, k, v, pos_key, pos_query, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, position_buckets,
      max_relative_positions, span, scale, dropout_p, seed):
    return q.new_empty(q.shape), q.new_empty((2, q.shape[1], q.shape[0]), dtype=torch.float32)


def _triton_varlen_bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor],
                            pos_query: Optional[Tensor], out: Tensor, stats: Tensor, cu_seqlens_q: Tensor,
                            cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, position_buckets: int,
                            max_relative_positions: int, span: int, scale: float, dropout_p: float,
                            seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Packed sequences: ``(dq, dk, dv, dpos_key, dpos_query)``; an absent position gradient is empty."""
    dq, dk, dv, dpk, dpq = _launch().attention_backward_varlen(
        do, q, k, v, pos_key, pos_query, out, stats, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        position_buckets=position_buckets, max_relative_positions=max_relative_positions, span=span,
        scale=scale, dropout_p=dropout_p, seed=seed)
    return dq, dk, dv, q.new_empty(0) if dpk is None else dpk, q.new_empty(0) if dpq is None else dpq


triton_varlen_bwd = torch.library.custom_op("deberta_fast::triton_varlen_bwd",
                                            mutates_args=())(_triton_varlen_bwd_impl)


@triton_varlen_bwd.register_fake
def _(do, q, k, v, pos_key, pos_query, out, stats, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      position_buckets, max_relative_positions, span, scale, dropout_p, seed):
    def like(t):
        return q.new_empty(0) if t is None else t.new_empty(t.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), like(pos_key), like(pos_query)


def _varlen_fwd(*args):
    """``deberta_fast::triton_varlen_fwd(*args)``, directly when nothing traces (as :func:`_padded_fwd`)."""
    fwd = _triton_varlen_fwd_impl if _direct(*args[:7]) else torch.ops.deberta_fast.triton_varlen_fwd
    return fwd(*args)


class TritonVarlenFunction(torch.autograd.Function):
    """Differentiable wrapper of the two packed custom ops (all five gradients)."""

    @staticmethod
    def forward(ctx, q, k, v, pos_key, pos_query, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                position_buckets, max_relative_positions, span, scale, dropout_p, seed):
        out, stats = _varlen_fwd(q, k, v, pos_key, pos_query, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, position_buckets, max_relative_positions, span, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, pos_key, pos_query, out, stats, cu_seqlens_q, cu_seqlens_k, seed)
        ctx.args = (max_seqlen_q, max_seqlen_k, position_buckets, max_relative_positions, span, scale, dropout_p)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, pos_key, pos_query, out, stats, cu_q, cu_k, seed = ctx.saved_tensors
        direct = not torch.is_grad_enabled() and _direct(do, q, k, v, pos_key, pos_query, cu_q, cu_k)
        bwd = _triton_varlen_bwd_impl if direct else torch.ops.deberta_fast.triton_varlen_bwd
        dq, dk, dv, dpk, dpq = bwd(do, q, k, v, pos_key, pos_query, out, stats, cu_q, cu_k, *ctx.args, seed)
        return (dq, dk, dv, dpk if pos_key is not None else None, dpq if pos_query is not None else None,
                None, None, None, None, None, None, None, None, None, None)


def _int32(t: Tensor) -> Tensor:
    """``t`` as contiguous int32 (no call when it is: ~1 us of host time per offsets tensor, measured on the 2-core
    CPU machine, 2026-12-05)."""
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def triton_attention_varlen(q, k, v, pos_key, pos_query, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                            position_buckets, max_relative_positions, span, scale, dropout_p=0.0, seed=None):
    """Functional packed entry (no validation; use :func:`deberta_fast.disentangled_attention_varlen`).
    ``cu_seqlens_*`` int32; ``seed`` as :func:`triton_attention`'s."""
    args = (q, k, v, pos_key, pos_query, _int32(cu_seqlens_q), _int32(cu_seqlens_k), int(max_seqlen_q),
            int(max_seqlen_k), position_buckets, max_relative_positions, span, float(scale), float(dropout_p),
            _seed(seed, dropout_p, q.device))
    if not _records_grad(q, k, v, pos_key, pos_query):
        return _varlen_fwd(*args)[0]
    return TritonVarlenFunction.apply(*_distinct(args))


def _device_dtype_refusals(call) -> list[str]:
    """Device, dtype, head-dim and layout rules shared by the padded and the packed path (and forward-mode AD)."""
    why = autodiff_refusals(call)
    device = call.device
    if device.type != "cuda":
        if not interpreting():
            why.append(f"needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to run the "
                       f"kernels on CPU under the (slow) Triton interpreter")
        elif interpreter_problem():
            why.append(interpreter_problem())
    elif torch.version.hip:  # (capability 9.x on MI300 would pick the sm_90 configs)
        why.append("the Triton kernels target NVIDIA GPUs (inline PTX, CUDA launch options such as maxnreg); on "
                   "ROCm use backend='torch'")
    else:
        cc = torch.cuda.get_device_capability(device)
        if cc < (8, 0):
            why.append(f"needs a GPU of compute capability >= 8.0 (sm_80), got sm_{cc[0]}{cc[1]}")
    if call.dtype == torch.float64:
        why.append("float64 is not supported by the Triton kernels; use backend='torch' for float64")
    if call.head_dim > MAX_HEAD_DIM:
        why.append(f"head dim D={call.head_dim} is larger than {MAX_HEAD_DIM}, the largest the kernels "
                   f"hold in registers; use backend='torch'")
    for name in ("query", "key", "value"):
        t = getattr(call, name)
        if t.stride(-1) != 1:
            why.append(f"{name} has a non-contiguous last dimension (stride {t.stride(-1)}); call .contiguous()")
    return why


def _index_refusals(call) -> list[str]:
    """The kernels index a ``(b, h)`` block of the tables and run sums in int32
    (``int32_index_problem`` of the launch module); the cached tables are read only when the cheap bound
    (table columns and runs are at most ``Lq + Lk + 1``) does not already settle it."""
    lq, lk = call.table_lens
    varlen = isinstance(call, VarlenCall)
    rows = _launch().row_offset_problem(call.query, call.key, call.value, lq, lk, varlen)
    if rows:
        return [rows]
    if not call.has_rel or (max(lq, lk) + 256) * (lq + lk + 1) < 2**31:
        return []
    from ..positions import distance_runs
    _, rows = call.trimmed_table()
    nrun = 1
    if call.needs_grad:
        nrun = distance_runs(lq, lk, call.position_buckets, call.max_relative_positions, call.span, call.device).count
    problem = _launch().int32_index_problem(lq, lk, rows.stop - rows.start, nrun)
    return [problem] if problem else []


class TritonBackend(Backend):
    name = "triton"
    summary = ("fused Triton kernels: fp16/bf16/fp32, head dim <= 256, all masks, in-kernel dropout; "
               "O(L*span) memory, deterministic backward; packed (varlen) sequences")
    supports_varlen = True
    _available = False

    def unavailable(self):
        if self._available:
            return None
        from .._env import explain_triton_import_error
        try:
            import triton  # noqa: F401
        except Exception as e:  # ImportError or a broken install
            return explain_triton_import_error(e, "triton")
        try:
            _launch()
        except Exception as e:
            return explain_triton_import_error(e, "kernels")
        self._available = True  # importing worked once: it stays imported (the check cost ~2 us per call, measured
        # on the 2-core CPU machine, 2026-12-02)
        return None

    def refusals(self, call: AttentionCall) -> list[str]:
        why = _device_dtype_refusals(call)
        if call.batch * call.heads > 65535:
            why.append(f"B*H = {call.batch * call.heads} exceeds the CUDA grid limit 65535")
        return why + _index_refusals(call)

    def forward(self, call: AttentionCall):
        return triton_attention(call.query, call.key, call.value, call.pos_key, call.pos_query, *kernel_masks(call),
                                position_buckets=call.position_buckets,
                                max_relative_positions=call.max_relative_positions, span=max(call.span, 1),
                                scale=call.scale, dropout_p=call.dropout_p)

    def refusals_varlen(self, call: VarlenCall) -> list[str]:
        why = _device_dtype_refusals(call)
        if call.num_seqs * call.heads > 65535:
            why.append(f"N*H = {call.num_seqs * call.heads} (sequences x heads) exceeds the CUDA grid limit 65535")
        for name in ("query", "key"):
            t = getattr(call, name)
            if t.shape[0] >= 2**31:
                why.append(f"{name} has {t.shape[0]} tokens; the packed kernels index tokens in int32 (< 2**31)")
        return why + _index_refusals(call)

    def forward_varlen(self, call: VarlenCall):
        return triton_attention_varlen(call.query, call.key, call.value, call.pos_key, call.pos_query,
                                       call.cu_seqlens_q, call.cu_seqlens_k, call.max_seqlen_q, call.max_seqlen_k,
                                       position_buckets=call.position_buckets,
                                       max_relative_positions=call.max_relative_positions, span=max(call.span, 1),
                                       scale=call.scale, dropout_p=call.dropout_p)
