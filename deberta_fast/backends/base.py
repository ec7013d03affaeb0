"""What a backend is: the normalised call it receives and the contract it declares."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd import forward_ad

from ..positions import (SlotBand, _functorch_active, relative_slot_table, slot_band, table_band, trimmed_slot_table,
                         values_unreadable)
from ..reference import key_mask_of, key_uniform_rows


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``, ``torch.func.jvp``)."""
    return getattr(forward_ad, "_current_level", -1) >= 0


#: the kernel backends' refusal of a call with forward-mode tangents (:attr:`_CallCommon.forward_ad`)
FORWARD_AD_REFUSAL = ("forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) is not supported: the kernels' "
                      "autograd has no forward-mode formula; backend='torch' serves it")
#: ... and of a call under torch.func's reverse-mode transforms (:func:`func_grad_active`)
FUNC_GRAD_REFUSAL = ("torch.func's reverse-mode transforms (grad, vjp, jacrev) are not supported: the kernels' "
                     "autograd functions cannot run under them; backend='torch' serves them")


def func_grad_active() -> bool:
    """Whether a torch.func reverse-mode transform (``grad``, ``vjp``, ``jacrev``) is active (the kernels' autograd
    functions have the combined ``forward(ctx, ...)`` form, which those transforms refuse with a message about
    ``setup_context``)."""
    if not _functorch_active():
        return False
    try:  # (private API; unknown: refuse, the torch backend serves every call)
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
        return any(i.key() == TransformType.Grad for i in retrieve_all_functorch_interpreters())
    except (ImportError, AttributeError):
        return True


def graph_capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph (``torch.cuda.graph``) for a call on
    ``device`` (False for other devices).  False while torch.compile traces: the query is not traceable (a fullgraph
    compile would fail), and a compiled call is checked only where it runs eagerly."""
    return device.type == "cuda" and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing()


def autodiff_refusals(call) -> list[str]:
    """The kernel backends' refusals of autodiff they cannot serve: forward-mode tangents, torch.func's reverse mode."""
    why = [FORWARD_AD_REFUSAL] if call.forward_ad else []
    return why + ([FUNC_GRAD_REFUSAL] if func_grad_active() else [])


class _CallCommon:
    """What every call shares: tensors' dtype and device, whether a backward follows, the band.
    (Subclasses are dataclasses with fields query, key, value, pos_key, pos_query,
    position_buckets, max_relative_positions and span.)"""

    @property
    def head_dim(self) -> int:
        return self.query.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    @property
    def device(self) -> torch.device:
        return self.query.device

    @property
    def has_rel(self) -> bool:
        return self.pos_key is not None or self.pos_query is not None

    @property
    def needs_grad(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        ts = (self.query, self.key, self.value, self.pos_key, self.pos_query)
        return any(t is not None and t.requires_grad for t in ts)

    @property
    def forward_ad(self) -> bool:
        """Whether an input carries a forward-mode tangent (``torch.autograd.forward_ad``, ``torch.func.jvp``), which
        only the torch backend propagates (the kernels' autograd has no forward-mode formula: refused, never a
        silently missing tangent)."""
        return forward_ad_active() and any(
            t is not None and forward_ad.unpack_dual(t).tangent is not None
            for t in (self.query, self.key, self.value, self.pos_key, self.pos_query))

    def band(self) -> SlotBand:
        """The saturation band of this call's slot table as the device has it (:func:`positions.table_band`);
        while tracing (compile, export: lengths may be symbolic, values unreadable), the slot function's
        (:func:`positions.slot_band`, a trace constant) widened by one distance on each side: the device's
        ``log`` may round a bucket at the band's edge differently from the CPU's, and one distance more inside
        the band is exact either way."""
        if values_unreadable(self.query):
            b = slot_band(self.position_buckets, self.max_relative_positions, self.span)
            return SlotBand(lo=b.lo - 1, hi=b.hi + 1, span=b.span)
        return table_band(*self.table_lens, self.position_buckets, self.max_relative_positions, self.span,
                          self.device)

    def trimmed_table(self) -> tuple[torch.Tensor, slice]:
        """``(table, rows)``: the slot table shifted to the rows of pos_key / pos_query that some
        ``(i, j)`` uses, and those rows (:func:`deberta_fast.positions.trimmed_slot_table`)."""
        table, lo, hi = trimmed_slot_table(*self.table_lens, self.position_buckets, self.max_relative_positions,
                                           self.span, self.device)
        return table, slice(lo, hi + 1)


@dataclass
class AttentionCall(_CallCommon):
    """One validated call of :func:`deberta_fast.disentangled_attention`.

    query ``[B,H,Lq,D]``; key, value ``[B,H,Lk,D]``; pos_key / pos_query
    ``[H,2*span,D]`` or ``[B,H,2*span,D]`` or None.  ``mask_kind`` (:func:`deberta_fast.reference.mask_kind`):
    ``"none" | "key" | "full"``; ``attention_mask`` as the user gave it; the normalised masks of
    :func:`deberta_fast.reference.normalize_mask`: ``key_mask`` bool ``[B,Lk]``, ``full_mask`` bool
    ``[B|1,1|H,Lq,Lk]``, ``uniform_rows`` bool ``[B,1|H,Lq]`` (rows HF makes uniform over all keys) or None;
    a key mask's are made on first use (a backend that reads the user's mask makes none: host time).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    pos_key: torch.Tensor | None
    pos_query: torch.Tensor | None
    position_buckets: int
    max_relative_positions: int
    span: int
    scale: float
    dropout_p: float
    mask_kind: str
    attention_mask: torch.Tensor | None
    full_mask: torch.Tensor | None = None
    _uniform: torch.Tensor | None = field(default=None, repr=False)  # kind "full": given; "key": made on use
    _key_mask: torch.Tensor | None = field(default=None, repr=False)
    _table: torch.Tensor | None = field(default=None, repr=False)

    @property
    def key_mask(self) -> torch.Tensor | None:
        """bool ``[B, Lk]`` (kind "key"), else None."""
        if self.mask_kind == "key" and self._key_mask is None:
            self._key_mask = key_mask_of(self.attention_mask, self.batch)
        return self._key_mask

    @property
    def uniform_rows(self) -> torch.Tensor | None:
        """bool ``[B, 1|H, Lq]`` (a mask given), else None."""
        if self.mask_kind == "key" and self._uniform is None:
            self._uniform = key_uniform_rows(self.key_mask, self.q_len, self.pads_queries)
        return self._uniform

    @property
    def pads_queries(self) -> bool:
        """A 2-D ``[B, Lk]`` key mask: HF's padding mask, whose masked keys' query rows are uniform when ``Lq == Lk``
        (a key mask broadcast from ``[B|1, 1, 1, Lk]`` masks keys only)."""
        return self.mask_kind == "key" and self.attention_mask.dim() == 2

    @property
    def batch(self) -> int:
        return self.query.shape[0]

    @property
    def heads(self) -> int:
        return self.query.shape[1]

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def k_len(self) -> int:
        return self.key.shape[2]


    @property
    def table_lens(self) -> tuple[int, int]:
        return self.q_len, self.k_len

    def slot_table(self) -> torch.Tensor:
        """int32 ``[Lq+Lk-1]``, see :mod:`deberta_fast.positions`."""
        if self._table is None:
            self._table = relative_slot_table(self.q_len, self.k_len, self.position_buckets,
                                              self.max_relative_positions, self.span, self.device)
        return self._table



@dataclass
class VarlenCall(_CallCommon):
    """One validated call of :func:`deberta_fast.disentangled_attention_varlen`.

    query ``[Tq,H,D]``; key, value ``[Tk,H,D]``: ``N`` sequences packed back to back,
    sequence ``n`` at rows ``cu_seqlens_q[n]:cu_seqlens_q[n+1]`` (int32 ``[N+1]``); positions
    restart at 0 in every sequence.  pos_key / pos_query ``[H,2*span,D]`` or None.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    pos_key: torch.Tensor | None
    pos_query: torch.Tensor | None
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    position_buckets: int
    max_relative_positions: int
    span: int
    scale: float
    dropout_p: float

    @property
    def heads(self) -> int:
        return self.query.shape[1]

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_q.numel() - 1

    @property
    def table_lens(self) -> tuple[int, int]:
        return self.max_seqlen_q, self.max_seqlen_k

    def slot_table(self) -> torch.Tensor:
        """int32 ``[max_seqlen_q + max_seqlen_k - 1]``: slot of ``i - j`` (index ``i - j + max_seqlen_k - 1``)."""
        return relative_slot_table(self.max_seqlen_q, self.max_seqlen_k, self.position_buckets,
                                   self.max_relative_positions, self.span, self.device)


class Backend:
    """A way to compute the attention.  Subclasses set ``name`` and implement
    :meth:`unavailable` (why it cannot run at all here, or None),
    :meth:`refusals` (why it cannot serve this call; empty list = it can) and
    :meth:`forward` (differentiable, returns ``[B,H,Lq,D]``)."""

    name: str = "?"
    #: one line describing what it supports, shown by ``python -m deberta_fast``
    summary: str = ""
    #: whether it has a packed (varlen) path; patched encoders pack only for backends that do
    supports_varlen: bool = False

    def unavailable(self) -> str | None:
        return None

    def refusals(self, call: AttentionCall) -> list[str]:
        raise NotImplementedError

    def forward(self, call: AttentionCall) -> torch.Tensor:
        raise NotImplementedError

    def refusals_varlen(self, call: VarlenCall) -> list[str]:
        """Why this backend cannot serve a packed (varlen) call; empty list = it can."""
        return [f"the {self.name} backend has no packed variable-length (varlen) path"]

    def forward_varlen(self, call: VarlenCall) -> torch.Tensor:
        """Differentiable; returns ``[Tq, H, D]``."""
        raise NotImplementedError
