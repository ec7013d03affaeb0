"""Loader of the CUDA C++ extension ``deberta_fast._C`` and its torch.library custom ops.

The extension is built by ``setup.py`` (``pip install --no-build-isolation .`` with a CUDA
build of torch and nvcc) or, as a fallback, just in time with
``torch.utils.cpp_extension.load`` + ninja: call :func:`build_jit` or set
``DEBERTA_FAST_JIT=1`` (then the first use of ``backend="cuda"`` compiles it, ~2-5 min).

``DEBERTA_FAST_CUDA_SIM=1`` runs the same kernels on CPU tensors through the CPU simulator
(``csrc/sim/``: the ``.cu`` sources built by the host compiler, each CUDA thread a fiber; compiled on first
use, ~1 min): a correctness tool like ``TRITON_INTERPRET=1``, slow, never a timing target.

Nothing here needs a GPU at import time: the custom ops are registered lazily by
:func:`ops` and only call into the extension when they run.

Custom ops (``torch.ops.deberta_fast.*``, with fake kernels for torch.compile and an
autograd formula)::

    cuda_attn_fwd(q, k, v, pos_key?, pos_query?, table?, key_mask?, uniform?, rng?, scale, dropout_p,
                  band_lo, band_hi) -> (out, lse)
    cuda_attn_bwd(dout, q, k, v, out, lse, pos_key?, pos_query?, table?, key_mask?, uniform?, rng?, scale,
                  dropout_p, dmin, W, perm?, offs?, band_lo=NO_BAND[0], band_hi=NO_BAND[1]) -> (dq, dk, dv, dc2p, dp2c)

    cuda_varlen_fwd(q, k, v, pos_key?, pos_query?, table?, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                    max_seqlen_k, rng?, scale, dropout_p, band_lo, band_hi) -> (out, lse)
    cuda_varlen_bwd(dout, q, k, v, out, lse, pos_key?, pos_query?, table?, cu_seqlens_q, cu_seqlens_k,
                    max_seqlen_q, max_seqlen_k, rng?, scale, dropout_p, dmin, W, perm?, offs?,
                    band_lo=NO_BAND[0], band_hi=NO_BAND[1]) -> (dq, dk, dv, dc2p, dp2c)

Every kernel computes the relative terms from the rows of ``pos_key`` / ``pos_query`` in slot order
(``[H, 2S, D]``, padded also ``[B|1, H, 2S, D]``) on tensor cores; no ``C2P`` / ``P2C`` table is built.
``band_lo`` / ``band_hi`` (``positions.table_band``; while tracing the widened ``slot_band``): warps whose tile
lies wholly beyond them use one slot per side
(a wrong band gives wrong values, never an out-of-bounds access; ``NO_BAND`` turns it off).
The backward op's ``dq`` / ``dk`` are the content parts; ``dc2p`` ``[B,H,Lq,2S]`` / ``dp2c`` ``[B,H,Lk,2S]`` (varlen
``[H,T,2S]``) are the gradients a ``C2P = q @ pos_key^T`` / ``P2C = k @ pos_query^T`` table would get, which the
autograd formula takes on to ``q``, ``k``, ``pos_key`` and ``pos_query`` (:func:`rel_grads`).
Padded ops: q ``[B,H,Lq,D]``, lse ``[B,H,Lq]`` (natural log; ``+inf`` for a row with no key, and the backward takes
any non-finite LSE as such a row).  Varlen ops (packed sequences, positions restart per sequence): q ``[Tq,H,D]``,
k/v ``[Tk,H,D]``, int32 ``cu_seqlens`` ``[N+1]``, lse float32 ``[H,Tq]``, slot table of length
``max_seqlen_q + max_seqlen_k - 1``.
"""
import os
import threading
import weakref
from pathlib import Path
from typing import Optional

import torch

from ._env import env_flag, switch
from ._linalg import add_product_
from .positions import tracing, values_unreadable

__all__ = ["load", "build_jit", "unavailable_reason", "ops", "band_window", "rel_grads", "csrc_dir", "HEAD_DIMS",
           "simulating", "simulator"]

HEAD_DIMS = (32, 64, 128)
# (band_lo, band_hi) meaning "no saturated-tile shortcut": every distance d = i - j lies strictly inside
NO_BAND = (-(1 << 30), 1 << 30)

_lock = threading.Lock()
_ext = None
_error: Optional[str] = None
_tried = False
_sim = None
_sim_error: Optional[str] = None

BUILD_HINT = ("build it with a CUDA build of torch and nvcc: `pip install --no-build-isolation .` "
              "(DEBERTA_FAST_BUILD_CUDA=1 forces the build, DEBERTA_FAST_CUDA_ARCHS='80;90a' picks GPUs), "
              "or set DEBERTA_FAST_JIT=1 (or call deberta_fast._cuda_ext.build_jit()) to compile it on first "
              "use with torch.utils.cpp_extension + ninja")


def csrc_dir() -> Path:
    """Folder of the C++/CUDA sources: ``csrc/`` of a source checkout, else the installed ``deberta_fast/_csrc``."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "csrc"
    return checkout if (checkout / "dfa_fwd.cu").exists() else here / "_csrc"


def _build_config():
    import importlib.util

    path = csrc_dir() / "build_config.py"
    spec = importlib.util.spec_from_file_location("_deberta_fast_build_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_extension(name: str, **kwargs):
    """``torch.utils.cpp_extension.load(name, **kwargs)``, first removing the ``lock`` file of a build that died.

    torch marks a build in progress with a ``lock`` file in the build directory; a killed build leaves it behind,
    and every later build of ``name`` then waits on it forever (a CI run waited 12 minutes on one).  Builds here
    hold an exclusive ``flock`` on that directory (released when their process dies, however it dies), so none of
    them is running; a ``lock`` is then removed, with a warning, only if it is over a minute old and no process
    runs in the directory (torch runs ninja there for as long as it holds its lock: a build by other code, e.g. an
    older checkout, that takes no ``flock``).  Where that cannot be read (no ``/proc``), or without ``fcntl`` /
    ``flock``, torch's protocol alone."""
    from torch.utils import cpp_extension

    try:
        import fcntl

        build_dir = cpp_extension._get_build_directory(name, False)
        guard = open(os.path.join(build_dir, ".deberta_fast_build.flock"), "a")
    except (ImportError, AttributeError, OSError):  # not POSIX; a torch without the helper; an unwritable root
        return cpp_extension.load(name=name, **kwargs)
    with guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
        except OSError:  # a file system without flock
            return cpp_extension.load(name=name, **kwargs)
        _remove_dead_lock(os.path.join(build_dir, "lock"), name)
        return cpp_extension.load(name=name, build_directory=build_dir, **kwargs)


def _remove_dead_lock(lock: str, name: str, min_age_s: float = 60.0) -> bool:
    """Remove torch's build ``lock`` if no live build can hold it (see :func:`_load_extension`); True if removed."""
    import time
    import warnings

    try:
        age = time.time() - os.stat(lock).st_mtime
    except FileNotFoundError:
        return False
    if age < min_age_s or _process_in(os.path.dirname(lock)) is not False:
        return False
    warnings.warn(f"deberta_fast: removed {lock}, {age:.0f} s old with no build running in its directory (a build "
                  f"of {name} that was killed); building again", RuntimeWarning, stacklevel=4)
    os.remove(lock)
    return True


def _process_in(folder: str) -> Optional[bool]:
    """Whether a process has ``folder`` as its working directory (None: ``/proc`` cannot tell)."""
    if not os.path.isdir("/proc/self/cwd"):
        return None
    real = os.path.realpath(folder)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.path.realpath(os.readlink(f"/proc/{pid}/cwd")) == real:
                    return True
            except OSError:  # gone, or another user's
                continue
    return False


def _current_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}" + ("a" if major == 9 and minor == 0 else "")


def build_jit(verbose: bool = False, archs: Optional[str] = None):
    """Compile ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja) and use the result.

    ``archs``: e.g. ``"80;90a"``; default: the current device (``DEBERTA_FAST_CUDA_ARCHS`` wins)."""
    global _ext, _error, _tried
    src = csrc_dir()
    if not (src / "dfa_fwd.cu").exists():
        raise RuntimeError(f"deberta_fast: CUDA sources not found in {src} (a source checkout or an installed deberta_fast/_csrc)")
    if torch.version.cuda is None:
        raise RuntimeError("deberta_fast: JIT build needs a CUDA build of torch (torch.version.cuda is None)")
    cfg = _build_config()
    archs = archs or os.environ.get("DEBERTA_FAST_CUDA_ARCHS") or _current_arch()
    mod = _load_extension(
        "deberta_fast_C",
        sources=[str(s) for s in cfg.cuda_sources()],
        extra_cflags=cfg.cxx_flags(),
        extra_cuda_cflags=cfg.nvcc_flags(archs),
        extra_include_paths=[str(src)],
        verbose=verbose,
    )
    with _lock:
        _ext, _error, _tried = mod, None, True
    return mod


def load():
    """The extension module, or None (then :func:`unavailable_reason` says why)."""
    global _ext, _error, _tried
    if _tried:
        return _ext
    with _lock:
        if _tried:
            return _ext
        try:
            from . import _C  # type: ignore[attr-defined]

            _ext = _C
        except ImportError as e:
            _error = f"the CUDA extension deberta_fast._C is not built ({e})"
    if _ext is None and os.environ.get("DEBERTA_FAST_JIT", "0").lower() in ("1", "true", "yes", "on"):
        try:
            build_jit(verbose=os.environ.get("DEBERTA_FAST_JIT_VERBOSE", "0") == "1")
        except Exception as e:  # noqa: BLE001
            with _lock:
                _error = f"the JIT build of the CUDA extension failed (DEBERTA_FAST_JIT=1): {e}"
    _tried = True
    return _ext


def simulating() -> bool:
    """True when ``DEBERTA_FAST_CUDA_SIM=1``: the cuda backend runs its kernels on CPU tensors, simulated."""
    return env_flag("DEBERTA_FAST_CUDA_SIM")


def simulator(verbose: bool = False):
    """The CPU-simulator build of the extension (``csrc/sim/``; cached by torch until a source changes): the
    module of ``deberta_fast._C`` whose kernels run on CPU tensors.  Raises RuntimeError if it cannot be built."""
    global _sim, _sim_error
    with _lock:
        if _sim is not None:
            return _sim
        if _sim_error is not None:
            raise RuntimeError(_sim_error)
        cfg = _build_config()
        try:
            if cfg.cuda_include_dir() is None:
                raise RuntimeError("the CUDA toolkit's headers (cuda_fp16.h) were not found: set CUDA_HOME")
            _sim = _load_extension("deberta_fast_cuda_sim", sources=cfg.sim_sources(), extra_cflags=cfg.sim_cflags(),
                                   extra_include_paths=[str(csrc_dir())], verbose=verbose)
        except Exception as e:  # noqa: BLE001
            _sim_error = f"the CPU simulator of the CUDA kernels (DEBERTA_FAST_CUDA_SIM=1) did not build: {e}"
            raise RuntimeError(_sim_error) from e
        return _sim


def unavailable_reason() -> Optional[str]:
    """None when the extension can run here, else one sentence saying why not and how to fix it."""
    if simulating():
        try:
            simulator()
        except RuntimeError as e:
            return str(e)
        return None
    ext = load()
    if ext is None:
        return f"{_error}; {BUILD_HINT}"
    if not torch.cuda.is_available():
        return "the CUDA extension is built but no CUDA device is available"
    return None


#: band_window's results per (slot table, its version, lengths, band, rows): every layer's backward of a model asks
#: for the same window of the same cached table (argsort + searchsorted: ~7 small launches each time otherwise);
#: an entry leaves with its table (weakref.finalize), and an in-place change of the table bumps its version
_WINDOWS: dict = {}


def band_window(table: torch.Tensor, q_len: int, k_len: int, band_lo: int, band_hi: int, s2: int):
    """``(dmin, W, perm, offs)`` for the relative-gradient band.

    Distances ``d = i - j`` in ``[dmin, dmin + W)`` (strictly inside the band, as the backward op
    requires) are stored explicitly by the backward kernels; smaller ones have the table's slot at
    ``band_lo`` and larger ones its slot at ``band_hi`` (``positions.table_band``).
    ``perm`` lists the window's offsets sorted by slot (stable) and ``offs[s]:offs[s+1]`` is
    slot ``s``'s segment of it: a fixed-order, atomic-free segment sum.  Cached per table (treat the
    tensors as read-only); computed afresh while tracing."""
    if values_unreadable(table) or tracing():  # (no wrapper tensor in the cache either)
        return _band_window(table, q_len, k_len, band_lo, band_hi, s2)
    key = (id(table), table._version, int(q_len), int(k_len), int(band_lo), int(band_hi), int(s2))
    hit = _WINDOWS.get(key)
    if hit is None:
        hit = _band_window(table, q_len, k_len, band_lo, band_hi, s2)
        if len(_WINDOWS) >= 256:  # (tables outlive their windows only through the positions caches' 64 entries)
            _WINDOWS.clear()
        _WINDOWS[key] = hit
        weakref.finalize(table, _WINDOWS.pop, key, None)
    return hit


def _band_window(table, q_len, k_len, band_lo, band_hi, s2):
    dmin = max(band_lo + 1, -(k_len - 1))
    dmax = min(band_hi - 1, q_len - 1)
    dmin = min(dmin, q_len)
    w = max(0, dmax - dmin + 1)
    dev = table.device
    if w == 0:
        perm = torch.zeros(1, dtype=torch.int32, device=dev)
        offs = torch.zeros(s2 + 1, dtype=torch.int32, device=dev)
        return dmin, 0, perm, offs
    slots = table[dmin + k_len - 1: dmin + k_len - 1 + w].long()
    order = torch.argsort(slots, stable=True)
    bounds = torch.searchsorted(slots[order], torch.arange(s2 + 1, device=dev, dtype=torch.long))
    return dmin, w, order.to(torch.int32), bounds.to(torch.int32)


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad [B,H,R,D]`` summed over the batch to ``like``'s shape (``[H,R,D]``, ``[1,H,R,D]`` or ``[B,H,R,D]``)."""
    if grad.dim() > like.dim():
        grad = grad.sum(0)
    elif grad.shape != like.shape:
        grad = grad.sum(0, keepdim=True)
    return grad


def rel_grads(dq, dk, q, k, pos_key, pos_query, dc2p, dp2c):
    """The position tables' share of the gradients, from ``dC2P`` / ``dP2C`` (head-major ``[..., H, L, ...]``
    operands): ``dq += dC2P pos_key``, ``dpos_key = dC2P^T q`` (summed over the batch), and the same for keys
    (``dq`` / ``dk``: the backward op's fresh outputs, accumulated in place where :func:`add_product_` can).
    Returns ``(dq, dk, dpos_key, dpos_query)`` (None for an absent term)."""
    dpk = dpq = None
    if pos_key is not None:
        dq = add_product_(dq, dc2p, pos_key)
        dpk = _sum_to(torch.matmul(dc2p.transpose(-1, -2), q), pos_key)
    if pos_query is not None:
        dk = add_product_(dk, dp2c, pos_query)
        dpq = _sum_to(torch.matmul(dp2c.transpose(-1, -2), k), pos_query)
    return dq, dk, dpk, dpq


def padded_grads(bwd, dout, saved, scale, dropout_p, band_lo, band_hi):
    """``(dq, dk, dv, dpos_key, dpos_query)`` of a padded forward: ``bwd`` (the ``cuda_attn_bwd`` op, or the
    extension's ``bwd`` called directly) and :func:`rel_grads`.  ``saved``: the forward's ``(q, k, v, pos_key,
    pos_query, table, key_mask, uniform, rng, out, lse)``."""
    q, k, v, pos_key, pos_query, table, key_mask, uniform, rng, out, lse = saved
    dmin, w, perm, offs = 0, 0, None, None
    if pos_key is not None or pos_query is not None:
        s2 = (pos_key if pos_key is not None else pos_query).shape[-2]
        dmin, w, perm, offs = band_window(table, q.shape[2], k.shape[2], band_lo, band_hi, s2)
    dq, dk, dv, dc2p, dp2c = bwd(aligned(dout), q, k, v, aligned(out), lse, pos_key, pos_query, table, key_mask,
                                 uniform, rng, scale, dropout_p, dmin, w, perm, offs, band_lo, band_hi)
    dq, dk, dpk, dpq = rel_grads(dq, dk, q, k, pos_key, pos_query, dc2p, dp2c)
    return dq, dk, dv, dpk, dpq


def varlen_grads(bwd, dout, saved, max_q, max_k, scale, dropout_p, band_lo, band_hi):
    """The packed twin of :func:`padded_grads` (``bwd``: ``cuda_varlen_bwd`` or the extension's ``varlen_bwd``;
    ``saved``: ``(q, k, v, pos_key, pos_query, table, cu_seqlens_q, cu_seqlens_k, rng, out, lse)``)."""
    q, k, v, pos_key, pos_query, table, cu_q, cu_k, rng, out, lse = saved
    dmin, w, perm, offs = 0, 0, None, None
    if pos_key is not None or pos_query is not None:
        s2 = (pos_key if pos_key is not None else pos_query).shape[-2]
        # distances i - j of every sequence lie in [-(max_k-1), max_q-1]: one window for all
        dmin, w, perm, offs = band_window(table, max_q, max_k, band_lo, band_hi, s2)
    dq, dk, dv, dc2p, dp2c = bwd(aligned(dout), q, k, v, aligned(out), lse, pos_key, pos_query, table, cu_q, cu_k,
                                 max_q, max_k, rng, scale, dropout_p, dmin, w, perm, offs, band_lo, band_hi)
    # token-major [T, H, D] <-> the head-major tables [H, T, 2S]
    dqh, dkh, dpk, dpq = rel_grads(dq.transpose(0, 1), dk.transpose(0, 1), q.transpose(0, 1), k.transpose(0, 1),
                                   pos_key, pos_query, dc2p, dp2c)
    return dqh.transpose(0, 1), dkh.transpose(0, 1), dv, dpk, dpq


_ops_registered = False


def ops():
    """Register (once) and return ``torch.ops.deberta_fast`` with the CUDA attention ops."""
    global _ops_registered
    if _ops_registered:
        return torch.ops.deberta_fast
    with _lock:
        if not _ops_registered:
            _register_ops()
            _ops_registered = True
    return torch.ops.deberta_fast


WGMMA_ENV = "DEBERTA_FAST_CUDA_WGMMA"  # read by the extension's forward launcher at every launch (csrc/dfa_fwd.cu)
SAT_TERMS_ENV = "DEBERTA_FAST_CUDA_SAT_TERMS"  # read by the extension at every call (csrc/dfa_bindings.cpp)


def wgmma_requested() -> bool:
    """``DEBERTA_FAST_CUDA_WGMMA=1``: the forward and the backward's score kernels run their wgmma variants
    (``csrc/dfa_wgmma.cuh``; the forward's products overlapped with its softmax) where the device runs the extension's
    sm_90a build (and in the simulator); ``=serial``: the same with the forward waiting for each product in turn (an
    A/B of the overlap); elsewhere, and by default, the mma.sync kernels.  Experimental: not yet run on a GPU."""
    return os.environ.get(WGMMA_ENV) in ("1", "serial")


def wgmma_serial() -> bool:
    """``DEBERTA_FAST_CUDA_WGMMA=serial`` (see ``wgmma_requested``)."""
    return os.environ.get(WGMMA_ENV) == "serial"


def use_wgmma(on: "bool | str" = True):
    """Within: ``DEBERTA_FAST_CUDA_WGMMA`` set to ``1`` (``on``), ``0``, or ``serial`` (``on="serial"``), restored
    after (benchmarks, tests)."""
    return switch(WGMMA_ENV, on)


def use_sat_terms(on: bool = True):
    """Within: ``DEBERTA_FAST_CUDA_SAT_TERMS`` set to ``1`` (every call with relative terms precomputes its saturated
    tiles' column terms in one extra kernel, ``launch_sat_terms``) or ``0`` (every score kernel computes them per
    tile); unset, a call precomputes them when at least half of its tiles are saturated.  Restored after (benchmarks,
    tests)."""
    return switch(SAT_TERMS_ENV, on)


def last_fwd_kernel() -> str:
    """The forward kernel the extension (the simulator under ``DEBERTA_FAST_CUDA_SIM=1``) launched last: ``"wgmma"``,
    ``"wgmma serial"``, ``"mma.sync"``, or ``""`` before the first."""
    return _need_ext().last_fwd_kernel()


def last_bwd_kernel() -> str:
    """The same for the backward's score kernels (dq, dK / dV)."""
    return _need_ext().last_bwd_kernel()


def reset_last_kernels() -> None:
    """:func:`last_fwd_kernel` and :func:`last_bwd_kernel` back to ``""`` (a call that launches nothing then shows)."""
    _need_ext().reset_last_kernels()


def _need_ext():
    if simulating():
        return simulator()
    ext = load()
    if ext is None:
        raise RuntimeError(f"deberta_fast: {_error}; {BUILD_HINT}")
    return ext


def _register_ops():
    T = torch.Tensor
    OT = Optional[torch.Tensor]

    @torch.library.custom_op("deberta_fast::cuda_attn_fwd", mutates_args=())
    def cuda_attn_fwd(q: T, k: T, v: T, pos_key: OT, pos_query: OT, table: OT, key_mask: OT, uniform: OT, rng: OT,
                      scale: float, dropout_p: float, band_lo: int, band_hi: int) -> tuple[T, T]:
        out, lse = _need_ext().fwd(q, k, v, pos_key, pos_query, table, key_mask, uniform, rng, scale, dropout_p,
                                   band_lo, band_hi)
        return out, lse

    @cuda_attn_fwd.register_fake
    def _(q, k, v, pos_key, pos_query, table, key_mask, uniform, rng, scale, dropout_p, band_lo, band_hi):
        B, H, Lq, D = q.shape
        return q.new_empty(B, H, Lq, D), q.new_empty(B, H, Lq, dtype=torch.float32)

    @torch.library.custom_op("deberta_fast::cuda_attn_bwd", mutates_args=())
    def cuda_attn_bwd(dout: T, q: T, k: T, v: T, out: T, lse: T, pos_key: OT, pos_query: OT, table: OT,
                      key_mask: OT, uniform: OT, rng: OT, scale: float, dropout_p: float, dmin: int, W: int,
                      perm: OT, offs: OT, band_lo: int = NO_BAND[0],
                      band_hi: int = NO_BAND[1]) -> tuple[T, T, T, T, T]:
        res = _need_ext().bwd(dout, q, k, v, out, lse, pos_key, pos_query, table, key_mask, uniform, rng, scale,
                              dropout_p, dmin, W, perm, offs, band_lo, band_hi)
        return tuple(res)

    @cuda_attn_bwd.register_fake
    def _(dout, q, k, v, out, lse, pos_key, pos_query, table, key_mask, uniform, rng, scale, dropout_p, dmin, W,
          perm, offs, band_lo=NO_BAND[0], band_hi=NO_BAND[1]):
        B, H, Lq, D = q.shape
        Lk = k.shape[2]
        dc2p = q.new_empty(B, H, Lq, pos_key.shape[-2]) if pos_key is not None else q.new_empty(0)
        dp2c = q.new_empty(B, H, Lk, pos_query.shape[-2]) if pos_query is not None else q.new_empty(0)
        return q.new_empty(B, H, Lq, D), q.new_empty(B, H, Lk, D), q.new_empty(B, H, Lk, D), dc2p, dp2c

    def setup_context(ctx, inputs, output):
        q, k, v, pos_key, pos_query, table, key_mask, uniform, rng, scale, dropout_p, band_lo, band_hi = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, pos_key, pos_query, table, key_mask, uniform, rng, out, lse)
        ctx.scale, ctx.dropout_p, ctx.band_lo, ctx.band_hi = scale, dropout_p, band_lo, band_hi

    def backward(ctx, dout, dlse):
        grads = padded_grads(torch.ops.deberta_fast.cuda_attn_bwd, dout, ctx.saved_tensors, ctx.scale, ctx.dropout_p,
                             ctx.band_lo, ctx.band_hi)
        return (*grads, None, None, None, None, None, None, None, None)

    cuda_attn_fwd.register_autograd(backward, setup_context=setup_context)

    # ------------------------------------------------------------------ packed varlen
    @torch.library.custom_op("deberta_fast::cuda_varlen_fwd", mutates_args=())
    def cuda_varlen_fwd(q: T, k: T, v: T, pos_key: OT, pos_query: OT, table: OT, cu_seqlens_q: T, cu_seqlens_k: T,
                        max_seqlen_q: int, max_seqlen_k: int, rng: OT, scale: float, dropout_p: float,
                        band_lo: int, band_hi: int) -> tuple[T, T]:
        out, lse = _need_ext().varlen_fwd(q, k, v, pos_key, pos_query, table, cu_seqlens_q, cu_seqlens_k,
                                          max_seqlen_q, max_seqlen_k, rng, scale, dropout_p, band_lo, band_hi)
        return out, lse

    @cuda_varlen_fwd.register_fake
    def _(q, k, v, pos_key, pos_query, table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rng, scale,
          dropout_p, band_lo, band_hi):
        Tq, H, D = q.shape
        return q.new_empty(Tq, H, D), q.new_empty(H, Tq, dtype=torch.float32)

    @torch.library.custom_op("deberta_fast::cuda_varlen_bwd", mutates_args=())
    def cuda_varlen_bwd(dout: T, q: T, k: T, v: T, out: T, lse: T, pos_key: OT, pos_query: OT, table: OT,
                        cu_seqlens_q: T, cu_seqlens_k: T, max_seqlen_q: int, max_seqlen_k: int, rng: OT,
                        scale: float, dropout_p: float, dmin: int, W: int, perm: OT,
                        offs: OT, band_lo: int = NO_BAND[0], band_hi: int = NO_BAND[1]) -> tuple[T, T, T, T, T]:
        res = _need_ext().varlen_bwd(dout, q, k, v, out, lse, pos_key, pos_query, table, cu_seqlens_q,
                                     cu_seqlens_k, max_seqlen_q, max_seqlen_k, rng, scale, dropout_p, dmin, W, perm,
                                     offs, band_lo, band_hi)
        return tuple(res)

    @cuda_varlen_bwd.register_fake
    def _(dout, q, k, v, out, lse, pos_key, pos_query, table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
          max_seqlen_k, rng, scale, dropout_p, dmin, W, perm, offs, band_lo=NO_BAND[0], band_hi=NO_BAND[1]):
        H = q.shape[1]
        dc2p = q.new_empty(H, q.shape[0], pos_key.shape[-2]) if pos_key is not None else q.new_empty(0)
        dp2c = q.new_empty(H, k.shape[0], pos_query.shape[-2]) if pos_query is not None else q.new_empty(0)
        return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(k.shape), dc2p, dp2c

    def varlen_setup_context(ctx, inputs, output):
        (q, k, v, pos_key, pos_query, table, cu_q, cu_k, max_q, max_k, rng, scale, dropout_p, band_lo,
         band_hi) = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, pos_key, pos_query, table, cu_q, cu_k, rng, out, lse)
        ctx.max_q, ctx.max_k = max_q, max_k
        ctx.scale, ctx.dropout_p, ctx.band_lo, ctx.band_hi = scale, dropout_p, band_lo, band_hi

    def varlen_backward(ctx, dout, dlse):
        grads = varlen_grads(torch.ops.deberta_fast.cuda_varlen_bwd, dout, ctx.saved_tensors, ctx.max_q, ctx.max_k,
                             ctx.scale, ctx.dropout_p, ctx.band_lo, ctx.band_hi)
        return (*grads, None, None, None, None, None, None, None, None, None, None)

    cuda_varlen_fwd.register_autograd(varlen_backward, setup_context=varlen_setup_context)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its rows are 16-byte aligned with a contiguous last dim (what the kernels load), else a copy (a
    clone: ``contiguous()`` keeps a contiguous tensor at a misaligned storage offset, and an empty one's strides)."""
    ok = t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1]) and t.storage_offset() % 8 == 0
    return t if ok else t.clone(memory_format=torch.contiguous_format)
