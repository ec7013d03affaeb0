"""Validation of user arguments, backend choice and the explanation of every refusal."""
from __future__ import annotations

import math
import numbers
import operator
import threading
import warnings

import torch

from ._env import getenv, interpreting  # noqa: F401 (interpreting: patching's)
from .backends import AUTO_ORDER, AUTO_ORDER_TRACING, BACKENDS, AttentionCall, VarlenCall
from .backends.base import forward_ad_active
from .positions import attention_span, check_bucket_config, trace_constant, traced, tracing, values_unreadable
from .reference import default_scale, mask_kind, normalize_mask

_state = threading.local()
_warned: set[str] = set()


class BackendUnavailableError(NotImplementedError):
    """A named backend cannot serve a call; the message lists why."""


def last_backend() -> str | None:
    """Name of the backend that served the last call of this thread (None before any)."""
    return getattr(_state, "last", None)


def _record(name: str) -> None:
    _state.last = name


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _int_arg(name: str, value) -> int:
    """An integer argument (Python or numpy/torch integer scalar; never a float or bool)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


def _check_pos(pos_key, pos_query, H: int, D: int, B: int | None, position_buckets: int,
               max_relative_positions: int, max_len: int):
    """Validate the relative tables; return ``(span, pos_key, pos_query)`` (span 0 when both are None).

    As in HF, the tables hold ``2 * span`` rows with ``span = position_buckets`` (bucketed) or
    ``max_relative_positions`` (unbucketed); longer tables are cut to their first ``2 * span`` rows
    (HF's ``rel_embeddings[:2 * span]``).  Unbucketed, a shorter table of ``2 * s`` rows with
    ``s >= max_len`` (the longest sequence) is DeBERTa-v1's centred slice: exact, and used as is."""
    tables = [(n, p) for n, p in (("pos_key", pos_key), ("pos_query", pos_query)) if p is not None]
    if not tables:
        return 0, pos_key, pos_query
    batched = " or [B, H, 2*span, D]" if B is not None else ""
    rows = None
    for name, p in tables:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
        ok = (p.dim() == 3 and p.shape[0] == H) or (B is not None and p.dim() == 4 and p.shape[0] == B
                                                    and p.shape[1] == H)
        if not ok or p.shape[-1] != D:
            raise ValueError(f"{name} must be [H, 2*span, D] = [{H}, 2*span, {D}]{batched}, got {list(p.shape)}")
        if rows is not None and p.shape[-2] != rows:
            raise ValueError(f"pos_key and pos_query must have the same number of rows, got {rows} and "
                             f"{p.shape[-2]}")
        rows = p.shape[-2]
    span = attention_span(position_buckets, max_relative_positions)
    if rows == 2 * span and span >= 1:  # the usual case: nothing to cut
        return span, pos_key, pos_query
    which = " and ".join(n for n, _ in tables)
    if span < 1:
        raise ValueError(f"{which} given but position_buckets={position_buckets} and max_relative_positions="
                         f"{max_relative_positions} define no span: pass the resolved max_relative_positions "
                         f"(HF replaces -1 by max_position_embeddings), or position_buckets > 0")
    if rows < 2 * span:
        if position_buckets <= 0 and rows % 2 == 0 and rows // 2 >= max_len:
            return rows // 2, pos_key, pos_query  # v1's centred slice, wide enough for every distance
        need = f"2 * position_buckets = {2 * span}" if position_buckets > 0 else \
            f"2 * max_relative_positions = {2 * span} (or, DeBERTa-v1's centred slice, 2 * s rows with " \
            f"s >= the longest sequence {max_len})"
        raise ValueError(f"{which} has {rows} rows; it needs {need}")
    if rows > 2 * span:  # HF uses the first 2 * span rows
        pos_key = None if pos_key is None else pos_key[..., : 2 * span, :]
        pos_query = None if pos_query is None else pos_query[..., : 2 * span, :]
    return span, pos_key, pos_query


def _check_same(query, **tensors) -> None:
    if query.dtype not in _FLOAT:
        raise TypeError(f"query must be float16, bfloat16, float32 or float64, got {query.dtype}")
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != query.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but query has {query.dtype}; cast all inputs to one dtype "
                            f"(use torch.autocast or .to(dtype))")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}; move all inputs to one device")


def _real_arg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    return float(value)


def _check_dropout(dropout_p) -> float:
    p = _real_arg("dropout_p", dropout_p)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return p


def _check_scale(scale, D: int, n_terms: int) -> float:
    if scale is None:
        return default_scale(D, n_terms)
    s = _real_arg("scale", scale)
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite, got {scale} (None: HF's 1/sqrt(D * (1 + #relative terms)))")
    return s


def _check_buckets(position_buckets, max_relative_positions) -> tuple[int, int]:
    pb = _int_arg("position_buckets", position_buckets)
    mr = _int_arg("max_relative_positions", max_relative_positions)
    check_bucket_config(pb, mr)
    return pb, mr


def _check_rank(rank: int, shape: str, **tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {shape}, got shape {list(t.shape)}")


def build_call(query, key, value, pos_key, pos_query, *, position_buckets, max_relative_positions,
               attention_mask, scale, dropout_p) -> AttentionCall:
    """Check shapes, dtypes and devices; raise ``ValueError``/``TypeError`` naming the fix."""
    _check_rank(4, "[B, H, L, D]", query=query, key=key, value=value)
    B, H, Lq, D = query.shape
    Lk = key.shape[2]
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape [B, H, Lk, D], got {list(key.shape)} and {list(value.shape)}")
    if key.shape[0] != B or key.shape[1] != H or key.shape[3] != D:
        raise ValueError(f"key {list(key.shape)} does not match query {list(query.shape)}: B, H and D must agree")
    if Lq < 1 or Lk < 1 or D < 1:
        raise ValueError(f"empty attention: Lq={Lq}, Lk={Lk}, D={D}")
    pb, mr = _check_buckets(position_buckets, max_relative_positions)
    span, pos_key, pos_query = _check_pos(pos_key, pos_query, H, D, B, pb, mr, max(Lq, Lk))
    _check_same(query, key=key, value=value, pos_key=pos_key, pos_query=pos_query)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.device != query.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but query is on {query.device}")
    dropout_p = _check_dropout(dropout_p)
    scale = _check_scale(scale, D, (pos_key is not None) + (pos_query is not None))
    return AttentionCall(query, key, value, pos_key, pos_query, pb, mr, span, scale, dropout_p,
                         *_masks(attention_mask, B, H, Lq, Lk))


def _masks(attention_mask, B: int, H: int, Lq: int, Lk: int) -> tuple:
    """:class:`AttentionCall`'s mask fields ``(mask_kind, attention_mask, full_mask, uniform_rows)`` after
    validation; a key mask's normalised forms are made on first use (the triton backend reads the user's mask)."""
    kind = mask_kind(attention_mask, B, H, Lq, Lk)
    if kind != "full":
        return kind, attention_mask, None, None
    _, _, fm, uni = normalize_mask(attention_mask, B, H, Lq, Lk)
    return kind, attention_mask, fm, uni


def check_varlen_offsets(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int, max_seqlen_q: int,
                         max_seqlen_k: int) -> None:
    """Raise ``ValueError`` unless ``cu_seqlens_q/k`` start at 0, never decrease, end at the token
    counts and no sequence is longer than ``max_seqlen_q/k``: what every backend relies on.

    One small device-to-host copy.  Skipped while tracing (compile, export, fake or meta tensors) or while a
    CUDA graph captures (every backend still clamps offsets into the tensors: wrong offsets then give wrong rows,
    never an access out of bounds; the torch backend leaves out a token no sequence covers, ``packing.pad_varlen``)."""
    if values_unreadable(cu_seqlens_q):  # compile / export tracing, fake or meta tensors
        return
    if cu_seqlens_q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    cq, ck = cu_seqlens_q.long(), cu_seqlens_k.long()
    lq, lk = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
    flags = torch.stack([
        cq[0] != 0, ck[0] != 0, cq[-1] != total_q, ck[-1] != total_k, (lq < 0).any(), (lk < 0).any(),
        (lq > max_seqlen_q).any(), (lk > max_seqlen_k).any()]).tolist()
    msgs = ["cu_seqlens_q[0] must be 0", "cu_seqlens_k[0] must be 0",
            f"cu_seqlens_q[-1] must equal the number of query tokens {total_q} (query.shape[0])",
            f"cu_seqlens_k[-1] must equal the number of key tokens {total_k} (key.shape[0])",
            "cu_seqlens_q must be non-decreasing", "cu_seqlens_k must be non-decreasing",
            f"a query sequence is longer than max_seqlen_q={max_seqlen_q}",
            f"a key sequence is longer than max_seqlen_k={max_seqlen_k}"]
    bad = [m for f, m in zip(flags, msgs) if f]
    if bad:
        raise ValueError("disentangled_attention_varlen: invalid offsets: " + "; ".join(bad)
                         + " (deberta_fast.packing.pack_info builds them from a padding mask)")


def build_varlen_call(query, key, value, pos_key, pos_query, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                      max_seqlen_k, *, position_buckets, max_relative_positions, scale, dropout_p,
                      check_offsets=True) -> VarlenCall:
    """Validation of the packed form; ``check_offsets``: also :func:`check_varlen_offsets` (one sync)."""
    _check_rank(3, "[total_tokens, H, D]", query=query, key=key, value=value)
    _check_rank(1, "[N + 1]", cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    Tq, H, D = query.shape
    Tk = key.shape[0]
    if key.shape != value.shape or key.shape[1:] != query.shape[1:]:
        raise ValueError(f"key {list(key.shape)} and value {list(value.shape)} must be [Tk, H, D] with H, D of "
                         f"query {list(query.shape)}")
    if H < 1 or D < 1:
        raise ValueError(f"empty attention: H={H}, D={D}")
    for name, c in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if c.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 (or int64), got {c.dtype}")
        if c.device != query.device:
            raise ValueError(f"{name} is on {c.device} but query is on {query.device}")
        if c.numel() < 2:
            raise ValueError(f"{name} must hold N + 1 >= 2 offsets, got {c.numel()}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    if max(Tq, Tk) >= 2**31:
        raise ValueError(f"at most 2**31 - 1 packed tokens (int32 offsets), got {Tq} queries and {Tk} keys; "
                         f"split the batch")
    max_seqlen_q = _int_arg("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _int_arg("max_seqlen_k", max_seqlen_k)
    if max_seqlen_q < 1 or max_seqlen_k < 1:
        raise ValueError(f"max_seqlen_q / max_seqlen_k must be >= 1, got {max_seqlen_q}, {max_seqlen_k}")
    if check_offsets:
        check_varlen_offsets(cu_seqlens_q, cu_seqlens_k, Tq, Tk, max_seqlen_q, max_seqlen_k)
    pb, mr = _check_buckets(position_buckets, max_relative_positions)
    span, pos_key, pos_query = _check_pos(pos_key, pos_query, H, D, None, pb, mr, max(max_seqlen_q, max_seqlen_k))
    _check_same(query, key=key, value=value, pos_key=pos_key, pos_query=pos_query)
    dropout_p = _check_dropout(dropout_p)
    scale = _check_scale(scale, D, (pos_key is not None) + (pos_query is not None))
    return VarlenCall(query, key, value, pos_key, pos_query, cu_seqlens_q.to(torch.int32),
                      cu_seqlens_k.to(torch.int32), max_seqlen_q, max_seqlen_k, pb, mr, span, scale, dropout_p)


@trace_constant  # torch.compile / export: asked once, outside the trace (a backend's first check caches what it
def _unavailable(name: str):  # finds: done inside a trace, dynamo's guard on that cache recompiled the graph)
    return BACKENDS[name].unavailable()


def _reasons(b, call) -> list[str]:
    why = _unavailable(b.name)
    if why:
        return [why]
    return b.refusals_varlen(call) if isinstance(call, VarlenCall) else b.refusals(call)


def check_backend_name(backend) -> str:
    """``backend`` as given when it names a backend (or ``"auto"``); ``ValueError`` listing the choices."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}")
    return backend


def choose_backend(call, backend: str):
    """Return the backend object that serves ``call`` (an AttentionCall or VarlenCall); explain every refusal."""
    if check_backend_name(backend) != "auto":
        b = BACKENDS[backend]
        reasons = _reasons(b, call)
        if reasons:
            raise BackendUnavailableError(
                f"backend={backend!r} cannot serve this call: " + "; ".join(reasons)
                + ". Use backend='auto' to fall back to a backend that can (backend='torch' serves every call).")
        return b
    refused = []
    for name in AUTO_ORDER_TRACING if traced(call.query) else AUTO_ORDER:
        b = BACKENDS[name]
        reasons = _reasons(b, call)
        if not reasons:
            if name == "triton" and call.device.type != "cuda":
                _warn_once("deberta_fast: backend='auto' runs the Triton kernels on the CPU interpreter because "
                           "TRITON_INTERPRET=1 is set (meant for tests; several times slower than "
                           "backend='torch' on CPU). Unset TRITON_INTERPRET to use the torch backend on CPU.")
            if refused and call.device.type == "cuda":
                _warn_once("deberta_fast: no fused backend serves this call, using the slower "
                           f"{name!r} backend (" + " | ".join(refused) + ")")
            return b
        refused.append(f"{name}: " + "; ".join(reasons))
    raise BackendUnavailableError("no backend serves this call: " + " | ".join(refused))


#: The entry points' memo: the signature of a call (:func:`_signature`) -> the outcome of its validation and backend
#: choice ``(backend, position_buckets, max_relative_positions, span, scale, dropout_p, position rows)``, kept for
#: calls that passed both (a memoised ``auto`` fallback does not repeat its warning: warnings are once per message).
_MEMO: dict = {}


def _meta(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)


def _plain(t) -> bool:
    return t is None or type(t) is torch.Tensor


def _signature(query, key, value, pos_key, pos_query, aux, ints, scale, dropout_p, backend):
    """Everything :func:`build_call` / :func:`build_varlen_call` and :func:`choose_backend` read but the values
    of ``aux`` (the mask, or the offsets): shapes, strides, dtypes, devices and ``requires_grad`` of the tensors,
    the shape / dtype / device of ``aux``, the integer arguments ``ints``, the scalars, grad mode and the
    environment variables the backends' refusals read; None (no memo) for tensor subclasses, integer arguments
    that are not ``int``, a scale or rate that is not a ``float`` / ``int``, or while tracing (checked first: the
    compiler then never traces the rest)."""
    if tracing() or forward_ad_active():  # (forward-mode tangents decide the backend: base.FORWARD_AD_REFUSAL)
        return None
    if not (type(query) is torch.Tensor and type(key) is torch.Tensor and type(value) is torch.Tensor
            and _plain(pos_key) and _plain(pos_query) and all(map(_plain, aux))
            and all(type(i) is int for i in ints) and (scale is None or type(scale) is float)
            and type(dropout_p) in (float, int) and type(backend) is str):
        return None
    mq = _meta(query)
    if mq[3].type == "meta":
        return None
    return (mq, _meta(key), _meta(value), _meta(pos_key), _meta(pos_query),
            tuple(None if t is None else (t.shape, t.dtype, t.device) for t in aux), ints, scale, dropout_p,
            backend, torch.is_grad_enabled(), getenv("TRITON_INTERPRET"), getenv("DEBERTA_FAST_CUDA_SIM"))


def _remember(sig, call, b, pos_key, pos_query) -> None:
    """Keep the outcome of a validated call and its backend choice (see :data:`_MEMO`)."""
    if sig is None:
        return
    if len(_MEMO) >= 256:
        _MEMO.clear()
    rows = None if call.pos_key is pos_key and call.pos_query is pos_query else 2 * call.span
    _MEMO[sig] = (b, call.position_buckets, call.max_relative_positions, call.span, call.scale, call.dropout_p,
                  rows)


def _cut(rows, pos_key, pos_query):
    """The position tables as the validation left them: their first ``rows`` rows (HF's cut), or unchanged."""
    if rows is None:
        return pos_key, pos_query
    return (None if pos_key is None else pos_key[..., :rows, :]), (None if pos_query is None else
                                                                   pos_query[..., :rows, :])


def _refuse_jit_trace() -> None:
    """``torch.jit.trace`` (and the TorchScript ONNX exporter built on it) records the position tables of the
    traced length as constants: the graph would be silently wrong at any other length."""
    if torch.jit.is_tracing():
        raise RuntimeError(
            "deberta_fast cannot be traced by torch.jit.trace / torch.onnx.export(dynamo=False): the trace would "
            "freeze the relative-position tables of this length and be wrong at any other. Use torch.export.export "
            "or torch.onnx.export(..., dynamo=True) with dynamic_shapes (a patched model exports with dynamic batch "
            "and length; for ONNX patch with backend='torch'), or unpatch the model (deberta_fast.unpatch) first.")


def disentangled_attention(query, key, value, pos_key=None, pos_query=None, *,
                           position_buckets: int, max_relative_positions: int,
                           attention_mask=None, scale=None, dropout_p: float = 0.0, backend: str = "auto"):
    """DeBERTa disentangled attention (c2p + p2c + content), fused where a kernel serves it.

    Args:
        query: ``[B, H, Lq, D]``; key, value: ``[B, H, Lk, D]``.
        pos_key: ``[H, 2*span, D]`` or ``[B, H, 2*span, D]``: the relative embeddings projected by
            HF's ``pos_key_proj`` (c2p term), or None to drop c2p.  ``span`` is ``position_buckets``
            (bucketed) or ``max_relative_positions``; longer tables are cut to their first
            ``2*span`` rows as HF does.  Unbucketed, DeBERTa-v1's centred slice of ``2*s`` rows,
            ``s >= max(Lq, Lk)``, is accepted too.
        pos_query: same shape, projected by ``pos_query_proj`` (p2c term), or None to drop p2c.
        position_buckets, max_relative_positions: HF config values, ints (``position_buckets <= 0`` or
            ``max_relative_positions <= 0``: no buckets; pass max_relative_positions resolved as HF does,
            ``max_position_embeddings`` for -1).
        attention_mask: None, ``[B, Lk]`` (HF padding mask; with ``Lq == Lk`` padded query rows are
            uniform over all keys, as in HF), ``[B, 1|Lq, Lk]`` or ``[B|1, 1|H, 1|Lq, Lk]`` (a query dim of 1, as
            HF's extended ``[B, 1, 1, Lk]``, broadcast over the queries); nonzero = attend.
        scale: multiplier of all three terms; default ``1/sqrt(D * (1 + #terms))``.
        dropout_p: attention-probability dropout (apply only in training).
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

    Returns ``[B, H, Lq, D]`` in the input dtype.  See :mod:`deberta_fast.reference` for the math.
    """
    _refuse_jit_trace()
    sig = _signature(query, key, value, pos_key, pos_query, (attention_mask,),
                     (position_buckets, max_relative_positions), scale, dropout_p, backend)
    hit = None if sig is None else _MEMO.get(sig)
    if hit is not None:  # validated and served before: only the mask's values are new (host time)
        b, pb, mr, span, scale, dropout_p, rows = hit
        pk, pq = _cut(rows, pos_key, pos_query)
        B, H, Lq, _ = query.shape
        call = AttentionCall(query, key, value, pk, pq, pb, mr, span, scale, dropout_p,
                             *_masks(attention_mask, B, H, Lq, key.shape[2]))
    else:
        call = build_call(query, key, value, pos_key, pos_query, position_buckets=position_buckets,
                          max_relative_positions=max_relative_positions, attention_mask=attention_mask,
                          scale=scale, dropout_p=dropout_p)
        b = choose_backend(call, backend)
        _remember(sig, call, b, pos_key, pos_query)
    _record(b.name)
    return b.forward(call)


def disentangled_attention_varlen(query, key, value, pos_key=None, pos_query=None, cu_seqlens_q=None,
                                  cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *,
                                  position_buckets: int, max_relative_positions: int, scale=None,
                                  dropout_p: float = 0.0, backend: str = "auto", check_offsets: bool = True):
    """Disentangled attention over packed variable-length sequences (no work on padding).

    Args:
        query: ``[Tq, H, D]``; key, value: ``[Tk, H, D]``: ``N`` sequences back to back.
        pos_key, pos_query: ``[H, 2*span, D]`` or None (as in :func:`disentangled_attention`).
        cu_seqlens_q, cu_seqlens_k: int32 ``[N + 1]`` offsets of the sequences (first 0, last ``T``).
        max_seqlen_q, max_seqlen_k: longest query / key sequence (ints; larger values are allowed).
        check_offsets: validate ``cu_seqlens`` against the token counts and max lengths (one device
            sync; a ``ValueError`` says what is wrong).  Pass False only for offsets built by
            :mod:`deberta_fast.packing` (the patched encoder does).
    Positions restart at 0 in every sequence; each query attends to every key of its own
    sequence.  Returns ``[Tq, H, D]``.  See :mod:`deberta_fast.packing` to build the inputs
    from a padded batch.
    """
    if cu_seqlens_q is None or cu_seqlens_k is None or max_seqlen_q is None or max_seqlen_k is None:
        raise TypeError("disentangled_attention_varlen needs cu_seqlens_q, cu_seqlens_k, max_seqlen_q and max_seqlen_k")
    _refuse_jit_trace()
    sig = _signature(query, key, value, pos_key, pos_query, (cu_seqlens_q, cu_seqlens_k),
                     (max_seqlen_q, max_seqlen_k, position_buckets, max_relative_positions), scale, dropout_p, backend)
    hit = None if sig is None else _MEMO.get(sig)
    if hit is not None:  # validated and served before: only the offsets' values are new (host time)
        b, pb, mr, span, scale, dropout_p, rows = hit
        if check_offsets:
            check_varlen_offsets(cu_seqlens_q, cu_seqlens_k, query.shape[0], key.shape[0], max_seqlen_q,
                                 max_seqlen_k)
        pk, pq = _cut(rows, pos_key, pos_query)
        i32 = torch.int32  # (int32 offsets as they are: .to() cost ~0.5 us returning its input, 2-core CPU, 2026-12-05)
        call = VarlenCall(query, key, value, pk, pq,
                          cu_seqlens_q if cu_seqlens_q.dtype == i32 else cu_seqlens_q.to(i32),
                          cu_seqlens_k if cu_seqlens_k.dtype == i32 else cu_seqlens_k.to(i32),
                          max_seqlen_q, max_seqlen_k, pb, mr, span, scale, dropout_p)
    else:
        call = build_varlen_call(query, key, value, pos_key, pos_query, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, position_buckets=position_buckets,
                                 max_relative_positions=max_relative_positions, scale=scale, dropout_p=dropout_p,
                                 check_offsets=check_offsets)
        b = choose_backend(call, backend)
        _remember(sig, call, b, pos_key, pos_query)
    _record(b.name)
    return b.forward_varlen(call)
