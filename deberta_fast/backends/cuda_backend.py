"""The ``"cuda"`` backend: the CUDA C++ extension ``deberta_fast._C`` built from ``csrc/``.

Serves fp16 / bf16 inputs on sm_80+ GPUs, head dims 32 / 64 / 128, any ``Lq``/``Lk``,
c2p / p2c / both / neither, bucketed or not, key masks (``[B, Lk]`` with HF's uniform rows, or broadcast
over the heads and queries, ``[B|1, 1, 1, Lk]``) and dropout (Philox, regenerated in the backward).  The forward
kernel takes the used rows of ``pos_key`` / ``pos_query`` and the slot table and computes the relative terms on
tensor cores (csrc/dfa_rel.cuh), and so do the backward kernels (no ``[B,H,L,2*span]`` table is
built); the position terms' gradients come back as ``dC2P`` / ``dP2C`` (per row and slot), which two
torch GEMMs each take on to the inputs and the position rows (``_cuda_ext.rel_grads``).
With ``DEBERTA_FAST_CUDA_SIM=1`` the same kernels run on CPU tensors in the CPU simulator (``csrc/sim/``).
Refused (with the reason): CPU tensors (but under the simulator), float32/float64, other head dims, 3-D/4-D masks
but key masks, GPUs older than sm_80, and everything when the extension is not built.

Packed variable-length calls (:func:`deberta_fast.disentangled_attention_varlen`) run the same
kernels with per-sequence offsets read from ``cu_seqlens`` (``deberta_fast::cuda_varlen_fwd/bwd``);
the backward's ``dC2P`` / ``dP2C`` are ``[H, T, 2*span]`` over packed tokens.

Layers: kernels (``csrc/*.cu``) -> host wrappers (``csrc/dfa_bindings.cpp``, the extension's ``fwd`` / ``bwd`` /
``varlen_fwd`` / ``varlen_bwd``) -> custom ops with fake kernels and autograd (``_cuda_ext``: what torch.compile,
export and FakeTensor see) -> :class:`CudaAttentionFunction` / :class:`CudaVarlenFunction` (the same autograd with
the extension called directly, in plain eager mode: no custom-op dispatch per call) -> :class:`CudaBackend`.
"""
from __future__ import annotations

import torch

from .. import _cuda_ext
from .base import AttentionCall, Backend, VarlenCall, autodiff_refusals
from .eager import direct, records_grad
from .torch_backend import TorchBackend

_HALF = (torch.float16, torch.bfloat16)


def _positions(call):
    """``(table, rows, band_lo, band_hi)``: the slot table over the used rows of the relative tables
    (autograd of ``pos[..., rows, :]`` puts their gradients back in place), or ``(None, all, 0, 0)``."""
    if not call.has_rel:
        return None, slice(None), 0, 0
    table, rows = call.trimmed_table()
    band = call.band()
    return table, rows, int(band.lo), int(band.hi)


def _pos_rows(call, rows):
    """``(pos_key, pos_query)``: the used rows of the position tables (slot order, 16-byte aligned), or None."""
    pk = None if call.pos_key is None else _cuda_ext.aligned(call.pos_key[..., rows, :])
    pq = None if call.pos_query is None else _cuda_ext.aligned(call.pos_query[..., rows, :])
    return pk, pq


def _rng(call):
    """Philox ``(seed, offset)`` on the device, drawn from torch's CUDA generator (manual_seed replays it)."""
    if call.dropout_p <= 0.0:
        return None
    return torch.randint(0, 1 << 62, (2,), device=call.device, dtype=torch.int64)


class CudaAttentionFunction(torch.autograd.Function):
    """The padded op's autograd with the extension called directly (no custom-op dispatch): what the backend runs
    when nothing traces (:func:`~deberta_fast.backends.eager.direct`); the ops (``deberta_fast::cuda_attn_fwd`` with
    its registered autograd) serve everything else.  Arguments: those of ``cuda_attn_fwd``; ``apply`` -> ``out``.
    (The combined ``forward(ctx, ...)`` form, as in the triton backend: a separate ``setup_context`` costs host time
    on every call.)"""

    EXT = "fwd"  # the extension's forward entry

    @staticmethod
    def forward(ctx, q, k, v, pos_key, pos_query, table, key_mask, uniform, rng, scale, dropout_p, band_lo, band_hi):
        out, lse = _cuda_ext._need_ext().fwd(q, k, v, pos_key, pos_query, table, key_mask, uniform, rng, scale,
                                             dropout_p, band_lo, band_hi)
        ctx.save_for_backward(q, k, v, pos_key, pos_query, table, key_mask, uniform, rng, out, lse)
        ctx.args = (scale, dropout_p, band_lo, band_hi)
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        # with grad mode on (double backward) the op is kept, as the triton backend does
        bwd = (_cuda_ext._need_ext().bwd if not torch.is_grad_enabled() and direct(dout, *saved)
               else torch.ops.deberta_fast.cuda_attn_bwd)
        return (*_cuda_ext.padded_grads(bwd, dout, saved, *ctx.args), None, None, None, None, None, None, None, None)


class CudaVarlenFunction(torch.autograd.Function):
    """The packed twin of :class:`CudaAttentionFunction` (arguments: those of ``cuda_varlen_fwd``)."""

    EXT = "varlen_fwd"

    @staticmethod
    def forward(ctx, q, k, v, pos_key, pos_query, table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rng,
                scale, dropout_p, band_lo, band_hi):
        out, lse = _cuda_ext._need_ext().varlen_fwd(q, k, v, pos_key, pos_query, table, cu_seqlens_q,
                                                    cu_seqlens_k, max_seqlen_q, max_seqlen_k, rng, scale, dropout_p,
                                                    band_lo, band_hi)
        ctx.save_for_backward(q, k, v, pos_key, pos_query, table, cu_seqlens_q, cu_seqlens_k, rng, out, lse)
        ctx.args = (max_seqlen_q, max_seqlen_k, scale, dropout_p, band_lo, band_hi)
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        bwd = (_cuda_ext._need_ext().varlen_bwd if not torch.is_grad_enabled() and direct(dout, *saved)
               else torch.ops.deberta_fast.cuda_varlen_bwd)
        return (*_cuda_ext.varlen_grads(bwd, dout, saved, *ctx.args),
                None, None, None, None, None, None, None, None, None, None)


def _run(function, op, args, tensors):
    """The forward output of ``op(*args)`` (a custom op returning ``(out, lse)``; ``tensors``: its tensor
    arguments, q, k, v, pos_key, pos_query first): through ``function`` (the extension called directly) when nothing
    traces, with no autograd function at all when autograd records nothing (inference), and through the op
    otherwise (torch.compile, export, FakeTensor, tensor subclasses)."""
    if not direct(*tensors):
        return op(*args)[0]
    if records_grad(*tensors[:5]):
        return function.apply(*args)
    return getattr(_cuda_ext._need_ext(), function.EXT)(*args)[0]


class CudaBackend(Backend):
    name = "cuda"
    summary = ("CUDA C++ extension (mma.sync, fp16/bf16, sm_80+): head dim 32/64/128, any Lq/Lk, c2p/p2c, "
               "key-padding masks, dropout, packed varlen; no relative tables (forward O(L) memory), "
               "backward O(L*span) (the position terms' gradient buffers)")
    supports_varlen = True

    def unavailable(self):
        return _cuda_ext.unavailable_reason()

    @staticmethod
    def _common_refusals(call) -> list[str]:
        why = autodiff_refusals(call)
        if _cuda_ext.simulating():
            if call.device.type != "cpu":
                why.append(f"inputs are on {call.device}, the CPU simulator (DEBERTA_FAST_CUDA_SIM=1) needs CPU tensors")
        elif call.device.type != "cuda":
            why.append(f"inputs are on {call.device}, the cuda backend needs CUDA tensors")
        if call.dtype not in _HALF:
            why.append(f"dtype {call.dtype} is not supported: the CUDA kernels use fp16/bf16 tensor cores "
                       "(cast with .half()/.bfloat16() or run under torch.autocast; backend='triton' or 'torch' "
                       "serve float32)")
        if call.head_dim not in _cuda_ext.HEAD_DIMS:
            why.append(f"head_dim {call.head_dim} is not compiled (supported: "
                       f"{', '.join(map(str, _cuda_ext.HEAD_DIMS))})")
        if call.device.type == "cuda" and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(call.device)
            if major < 8:
                why.append(f"needs an sm_80+ GPU (mma.sync fp16/bf16), {call.device} is sm_{major}{minor}")
        return why

    def refusals(self, call: AttentionCall) -> list[str]:
        why = self._common_refusals(call)
        if call.mask_kind == "full":
            why.append("3-D/4-D attention masks are not supported but key masks ([B, Lk], or [B|1, 1, 1, Lk] / "
                       "[B|1, 1, Lk] broadcast over the heads and queries); use backend='triton' or backend='torch'")
        if call.batch * call.heads > 65535:
            why.append(f"B*H = {call.batch * call.heads} exceeds the grid limit 65535")
        if call.q_len + call.k_len >= (1 << 30):
            why.append("sequence too long (Lq + Lk must be < 2^30)")
        return why

    def refusals_varlen(self, call: VarlenCall) -> list[str]:
        why = self._common_refusals(call)
        n_h = call.num_seqs * call.heads
        if n_h > 65535:
            why.append(f"N*H = {n_h} (sequences x heads) exceeds the grid limit 65535; split the batch")
        if call.max_seqlen_q + call.max_seqlen_k >= (1 << 30):
            why.append("sequence too long (max_seqlen_q + max_seqlen_k must be < 2^30)")
        if max(call.query.shape[0], call.key.shape[0]) >= (1 << 31):
            why.append("more than 2^31 - 1 packed tokens (int32 cu_seqlens)")
        return why

    def forward(self, call: AttentionCall) -> torch.Tensor:
        if call.batch * call.heads == 0:  # nothing to compute; the extension refuses empty launches
            return TorchBackend().forward(call)
        ops = _cuda_ext.ops()
        q = _cuda_ext.aligned(call.query)
        k = _cuda_ext.aligned(call.key)
        v = _cuda_ext.aligned(call.value)
        table, rows, band_lo, band_hi = _positions(call)
        pos_key, pos_query = _pos_rows(call, rows)
        key_mask = uniform = None
        if call.mask_kind == "key":
            key_mask = call.key_mask.contiguous()
        if call.uniform_rows is not None:
            uniform = call.uniform_rows.contiguous()
        args = (q, k, v, pos_key, pos_query, table, key_mask, uniform, _rng(call), float(call.scale),
                float(call.dropout_p), band_lo, band_hi)
        return _run(CudaAttentionFunction, ops.cuda_attn_fwd, args, args[:9])

    def forward_varlen(self, call: VarlenCall) -> torch.Tensor:
        # cu_seqlens were validated by the dispatcher (deberta_fast.dispatch.check_varlen_offsets)
        ops = _cuda_ext.ops()
        q = _cuda_ext.aligned(call.query)
        k = _cuda_ext.aligned(call.key)
        v = _cuda_ext.aligned(call.value)
        table, rows, band_lo, band_hi = _positions(call)
        pos_key, pos_query = _pos_rows(call, rows)
        args = (q, k, v, pos_key, pos_query, table, call.cu_seqlens_q.contiguous(), call.cu_seqlens_k.contiguous(),
                int(call.max_seqlen_q), int(call.max_seqlen_k), _rng(call), float(call.scale),
                float(call.dropout_p), band_lo, band_hi)
        return _run(CudaVarlenFunction, ops.cuda_varlen_fwd, args, (*args[:8], args[10]))
