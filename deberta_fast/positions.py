"""Relative positions of DeBERTa, as O(Lq + Lk) tables.

HF builds an ``[Lq, Lk]`` matrix ``delta[i, j] = bucket(i - j)`` and gathers
``clamp(delta + span, 0, 2*span - 1)`` for both relative terms (for p2c HF
gathers ``-delta[j, i]``, which equals ``delta[i, j]`` because the bucket
function is odd).  The slot of ``(i, j)`` therefore depends on ``i - j`` only,
and every backend of deberta_fast reads it from a 1-D table::

    slot = table[i - j + Lk - 1]        # table: int32 [Lq + Lk - 1], values in [0, 2*span)

No ``[L, L]`` tensor is ever built here.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

__all__ = [
    "log_bucket_position",
    "relative_delta",
    "attention_span",
    "relative_slot_table",
    "trimmed_slot_table",
    "SlotBand",
    "slot_band",
    "table_band",
    "check_bucket_config",
    "DistanceRuns",
    "distance_runs",
    "traced",
    "tracing",
    "values_unreadable",
]


def log_bucket_position(relative_pos: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """HF's ``make_log_bucket_position``, op for op (float32 log and ceil), so
    tables match HF bit for bit on the same device.  Returns float32 of the
    same shape as ``relative_pos`` (integer valued)."""
    sign = torch.sign(relative_pos)
    mid = bucket_size // 2
    abs_pos = torch.where(
        (relative_pos < mid) & (relative_pos > -mid),
        torch.full((), mid - 1, dtype=relative_pos.dtype, device=relative_pos.device),
        torch.abs(relative_pos),
    )
    # (0-d constants by torch.full, not torch.tensor: torch.export cannot re-trace a lifted torch.tensor constant.)
    # Every constant on an explicit device (never torch's default device, which torch.set_default_device can make
    # a GPU): the ratio a CPU 0-d tensor, as HF's is under the default default device.
    ratio = torch.full((), (max_position - 1) / mid, dtype=torch.get_default_dtype(), device="cpu")
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(ratio) * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative_pos.type_as(log_pos), log_pos * sign)


def check_bucket_config(position_buckets: int, max_relative_positions: int) -> None:
    """Raise ``ValueError`` for bucket configs where HF's log-bucket function is undefined.

    With ``mid = position_buckets // 2`` HF divides by ``log((max_relative_positions - 1) / mid)``
    (float32) and by ``mid``: ``position_buckets == 1`` (``mid == 0``) and ``max_relative_positions - 1
    == mid`` (a zero logarithm) turn every distance beyond ``mid`` into inf/NaN, which HF then casts to
    an integer (platform-dependent garbage).  Every other config, monotone or not, is well defined."""
    if position_buckets <= 0 or max_relative_positions <= 0:
        return  # no bucketing: raw distances
    mid = position_buckets // 2
    if mid == 0:
        raise ValueError(f"position_buckets={position_buckets}: HF's log-bucket function divides by "
                         f"position_buckets // 2 = 0; use position_buckets >= 2 (or <= 0 for no buckets)")
    ratio = (max_relative_positions - 1) / mid  # HF makes it a float32 tensor: its log is 0 iff it rounds to 1
    if 1.0 - 2.0**-25 <= ratio <= 1.0 + 2.0**-24:
        raise ValueError(f"position_buckets={position_buckets} with max_relative_positions={max_relative_positions}:"
                         f" HF's log-bucket function divides by log((max_relative_positions - 1) / "
                         f"(position_buckets // 2)) = 0 (every distance beyond {mid} becomes NaN/inf); choose "
                         f"another max_relative_positions")


def relative_delta(rel: torch.Tensor, position_buckets: int, max_relative_positions: int) -> torch.Tensor:
    """``delta`` of an integer tensor of raw distances ``i - j`` (int64 out)."""
    rel = rel.to(torch.long)
    if position_buckets > 0 and max_relative_positions > 0:
        check_bucket_config(position_buckets, max_relative_positions)
        rel = log_bucket_position(rel, position_buckets, max_relative_positions)
    return rel.to(torch.long)


def attention_span(position_buckets: int, max_relative_positions: int) -> int:
    """``span`` of DeBERTa-v2/v3 (HF's ``pos_ebd_size``): the relative tables
    have ``2 * span`` rows."""
    return position_buckets if position_buckets > 0 else max_relative_positions


def _validate(q_len: int, k_len: int, span: int) -> None:
    if q_len < 1 or k_len < 1:
        raise ValueError(f"sequence lengths must be >= 1, got Lq={q_len}, Lk={k_len}")
    if span < 1:
        raise ValueError(f"span must be >= 1 (relative tables have 2*span rows), got {span}")


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def tracing() -> bool:
    """Whether a trace or a transform sees this call: compile / export tracing, a torch dispatch mode (FakeTensor,
    functionalization), or a torch.func transform (``vmap``, ``grad``, ``functionalize``: their tensors are
    wrappers).  The per-shape caches must not keep such tensors, and the kernel backends then go through their
    custom ops."""
    return torch.compiler.is_compiling() or bool(torch._C._len_torch_dispatch_stack()) or _functorch_active()


_batched = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", lambda t: False)


def traced(t: torch.Tensor) -> bool:
    """Whether nothing runs on real values: compile / export tracing, a torch dispatch mode (FakeTensor,
    functionalization) or a meta tensor ``t``."""
    return torch.compiler.is_compiling() or bool(torch._C._len_torch_dispatch_stack()) or t.device.type == "meta"


def values_unreadable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values cannot be read on the host: :func:`traced`, or a tensor ``vmap`` batches.  Code that
    would read them takes the trace path instead (the caches follow :func:`tracing`)."""
    return traced(t) or _batched(t)


_NO_FUNCTORCH = getattr(torch._C, "_DisableFuncTorch", contextlib.nullcontext)


def _shape_cache(fn):
    """``lru_cache(64)`` of a per-shape builder (:func:`shape_caches`) whose entries are built outside torch.func's
    transforms: a call under ``vmap`` / ``functionalize`` that reaches a cache (``table_band``, ``distance_runs``)
    caches plain tensors, never a transform's wrappers, which a later eager call could not read.  (The public entry
    points bypass the caches while :func:`tracing`; compile and fake tensors never reach them.)"""
    @functools.wraps(fn)
    def plain(*args):
        with _NO_FUNCTORCH():
            return fn(*args)
    return functools.lru_cache(maxsize=64)(plain)


def _slot_table_of(q_len, k_len, position_buckets, max_relative_positions, span, device_str):
    device = torch.device(device_str)
    rel = torch.arange(-(k_len - 1), q_len, dtype=torch.long, device=device)
    delta = relative_delta(rel, position_buckets, max_relative_positions)
    return torch.clamp(delta + span, 0, 2 * span - 1).to(torch.int32).contiguous()


_slot_table_cached = _shape_cache(_slot_table_of)


def relative_slot_table(
    q_len: int,
    k_len: int,
    position_buckets: int,
    max_relative_positions: int,
    span: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """int32 ``[Lq + Lk - 1]``: ``table[i - j + Lk - 1]`` is the row of
    ``pos_key`` / ``pos_query`` that query ``i`` and key ``j`` use.

    ``span`` defaults to :func:`attention_span`; DeBERTa v1 passes its own
    (``min(max(Lq, Lk), max_relative_positions)``, no buckets).  Cached per
    arguments and device; treat the result as read-only.
    """
    if span is None:
        span = attention_span(position_buckets, max_relative_positions)
    _validate(q_len, k_len, span)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    config = (int(position_buckets), int(max_relative_positions), int(span), str(device))
    # traced into the graph with lengths kept symbolic; the cache is for eager calls and must not keep fake tensors
    if tracing():
        return _slot_table_of(q_len, k_len, *config)
    return _slot_table_cached(int(q_len), int(k_len), *config)


@_shape_cache
def _host_table(q_len, k_len, position_buckets, max_relative_positions, span, device_str):
    """A CPU copy of the slot table of ``device_str``: the values the kernels read there (one copy per new shape).
    The host-side facts about the table (its rows, the backward's runs, the saturation band of the kernels) come
    from this copy, never from recomputing the log buckets on the CPU: HF's float32 ``ceil(log(..) / log(..))``
    lands exactly on an integer at some distances (``|d| = max_relative_positions - 1``), where two ``log``
    implementations (a GPU's and a CPU's, or a CPU's vector and scalar paths) can round to different buckets."""
    table = _slot_table_cached(q_len, k_len, position_buckets, max_relative_positions, span, device_str)
    return table if table.device.type == "cpu" else table.cpu()


@_shape_cache
def _trimmed_cached(q_len, k_len, position_buckets, max_relative_positions, span, device_str):
    table = _slot_table_cached(q_len, k_len, position_buckets, max_relative_positions, span, device_str)
    host = _host_table(q_len, k_len, position_buckets, max_relative_positions, span, device_str)
    lo, hi = (int(x) for x in torch.aminmax(host))  # one device sync per new shape (the copy)
    return (table - lo).to(torch.int32).contiguous(), lo, hi


def trimmed_slot_table(q_len, k_len, position_buckets, max_relative_positions, span, device="cpu"):
    """``(table - lo, lo, hi)``: the slot table shifted to the rows ``lo..hi`` that some ``(i, j)``
    uses.  A backend that projects only ``pos_key[lo:hi+1]`` (``hi - lo + 1`` rows instead of
    ``2*span``: about ``Lq + Lk`` for short sequences) reads the shifted table.  Saturated slots stay
    at the ends (``0`` only if ``lo == 0``, ``hi - lo`` only if ``hi == 2*span - 1``).  Cached."""
    _validate(q_len, k_len, span)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args = (int(q_len), int(k_len), int(position_buckets), int(max_relative_positions), int(span), str(device))
    if tracing():
        # tracing: never let a fake or wrapper tensor into the caches (the range read below needs real values anyway)
        table = _slot_table_of(*args)
        lo, hi = (int(x) for x in torch.aminmax(table))
        return (table - lo).to(torch.int32).contiguous(), lo, hi
    return _trimmed_cached(*args)


@dataclass(frozen=True)
class DistanceRuns:
    """The distances ``d = i - j`` as the triton backward sums ``dS`` per row (or column) of the score matrix.

    Run ``clamp(d - lo, 0, hi - lo)``: every ``d`` strictly between ``lo`` and ``hi`` is a run of its own, and the
    constant ends of the slot table (``d <= lo``: one slot, ``d >= hi``: one slot) are one run each.  Along a row
    ``d`` takes every value once, so a run inside the band is a single element: its sum is a store, with no scan and
    no atomic, and only the two end runs are sums (any bucket function, monotone or not).  ``run_rows`` long
    ``[hi - lo + 1]``: the trimmed table row (:func:`trimmed_slot_table`) of each run; ``unique``: no row is used
    by two runs."""

    lo: int
    hi: int
    run_rows: torch.Tensor
    unique: bool

    @property
    def count(self) -> int:
        return self.hi - self.lo + 1


@_shape_cache
def _distance_runs_cached(q_len, k_len, position_buckets, max_relative_positions, span, device_str):
    args = (q_len, k_len, position_buckets, max_relative_positions, span, device_str)
    table = _host_table(*args).long() - _trimmed_cached(*args)[1]  # the trimmed table the kernels read
    change = (table[1:] != table[:-1]).nonzero().flatten()
    if change.numel() == 0:  # one slot for every d: run 0 is empty, run 1 holds every d
        lo, hi = -k_len, -(k_len - 1)
    else:  # the last index of the constant prefix, the first of the constant suffix
        lo, hi = int(change[0]) - (k_len - 1), int(change[-1]) + 1 - (k_len - 1)
    idx = torch.clamp(torch.arange(lo, hi + 1, device="cpu") + (k_len - 1), 0, table.numel() - 1)
    run_rows = table[idx]
    unique = bool((run_rows[1:] > run_rows[:-1]).all())
    return DistanceRuns(lo, hi, run_rows.to(device_str), unique)


def distance_runs(q_len, k_len, position_buckets, max_relative_positions, span, device="cpu") -> DistanceRuns:
    """:class:`DistanceRuns` of a ``q_len x k_len`` score matrix, from a host copy of ``device``'s slot table (the
    table the kernels read; one copy per new shape).  Cached; treat as read-only."""
    _validate(q_len, k_len, span)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _distance_runs_cached(int(q_len), int(k_len), int(position_buckets), int(max_relative_positions),
                                 int(span), str(device))


@dataclass(frozen=True)
class SlotBand:
    """Where the slot stops changing with ``d = i - j``.

    For ``d >= hi`` the slot is ``2*span - 1`` and for ``d <= lo`` it is ``0``;
    only ``lo < d < hi`` (the band) needs a gather.  Kernels use it to run
    tiles outside the band with per-row / per-column constants.
    """

    lo: int
    hi: int
    span: int


@functools.lru_cache(maxsize=256)
def _slot_band_cached(position_buckets: int, max_relative_positions: int, span: int) -> tuple[int, int]:
    # delta is monotone non-decreasing in d and |delta(d)| >= min(|d|, ...) so the
    # saturation points lie within a few multiples of max(span, max_rel).
    limit = 4 * max(span, max_relative_positions, 2) + 8
    d = torch.arange(-limit, limit + 1, dtype=torch.long, device="cpu")
    delta = relative_delta(d, position_buckets, max_relative_positions)
    slot = torch.clamp(delta + span, 0, 2 * span - 1)
    if not bool((delta[1:] >= delta[:-1]).all()):
        # degenerate configs (e.g. max_relative_positions < position_buckets)
        # give a non-monotone bucket function: no saturation is assumed.
        return -(1 << 62), 1 << 62
    top = (slot == 2 * span - 1).nonzero()
    bot = (slot == 0).nonzero()
    hi = int(d[top[0, 0]]) if top.numel() else 1 << 62
    lo = int(d[bot[-1, 0]]) if bot.numel() else -(1 << 62)
    return lo, hi


@_shape_cache
def _table_band_cached(q_len, k_len, position_buckets, max_relative_positions, span, device_str):
    host = _host_table(q_len, k_len, position_buckets, max_relative_positions, span, device_str)
    n = host.numel()
    off = (host != 0).nonzero()  # the slot-0 prefix ends before the first other slot
    n0 = int(off[0, 0]) if off.numel() else n
    off = (host != 2 * span - 1).nonzero()  # the top-slot suffix starts after the last other slot
    n1 = n - 1 - int(off[-1, 0]) if off.numel() else n
    return n0 - k_len, q_len - n1  # d of table index t is t - (k_len - 1)


def shape_caches() -> tuple:
    """This module's per-shape caches (the tables of a ``(Lq, Lk, config, device)`` and what is read off them):
    tests clear them, and a fake tensor must never enter one."""
    return (_slot_table_cached, _host_table, _trimmed_cached, _distance_runs_cached, _table_band_cached)


def table_band(q_len, k_len, position_buckets, max_relative_positions, span, device="cpu") -> SlotBand:
    """:func:`slot_band` as the ``q_len x k_len`` slot table of ``device`` has it: every ``d <= lo`` of the table
    has slot 0 and every ``d >= hi`` slot ``2*span - 1`` (``lo = -k_len`` / ``hi = q_len`` where no ``d`` does).
    The kernels' saturated tiles use it: read off the table they gather from, so it agrees with the table for any
    bucket function (monotone or not) and whatever arithmetic built the table (see :func:`_host_table`).  Cached
    per shape and device."""
    _validate(q_len, k_len, span)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    lo, hi = _table_band_cached(int(q_len), int(k_len), int(position_buckets), int(max_relative_positions),
                                int(span), str(device))
    return SlotBand(lo=lo, hi=hi, span=int(span))


def trace_constant(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` when deberta_fast is
    imported (slow, and it needs numpy): the same marker attribute, read by dynamo while tracing (compile,
    export), which then calls ``fn`` once and keeps its result as a constant.  ``tests/test_compile.py``
    checks that torch's decorator still sets exactly this attribute."""
    fn._dynamo_marked_constant = True
    return fn


@trace_constant  # torch.compile / export: computed once while tracing, a constant
def _slot_band_constant(position_buckets: int, max_relative_positions: int, span: int) -> tuple[int, int]:
    return _slot_band_cached(position_buckets, max_relative_positions, span)


def slot_band(position_buckets: int, max_relative_positions: int, span: int | None = None) -> SlotBand:
    """Saturation distances of the slot function (independent of L); computed once per config (recomputed on
    every forward and backward it cost 0.8-1.7 ms of host time per call, measured on the 2-core CPU machine,
    2026-12-01, under load)."""
    if span is None:
        span = attention_span(position_buckets, max_relative_positions)
    args = (int(position_buckets), int(max_relative_positions), int(span))
    lo, hi = (_slot_band_constant if torch.compiler.is_compiling() else _slot_band_cached)(*args)
    return SlotBand(lo=lo, hi=hi, span=args[2])
