"""A bounds check of the Triton kernels under the interpreter (a CPU stand-in for compute-sanitizer's memcheck).

Inside :func:`bounds_checked`, every launch records the storages of its tensor arguments, and every load and
store checks that the addresses its mask lets through lie inside one of them, all of an access's inside the same
one (whole elements; a tile of pointers comes from one tensor); otherwise ``AssertionError`` names the kernel, the
access and the first stray address.  Storage bounds, as a GPU's memcheck sees allocations: a read into another
``(b, h)`` block of the same tensor is not caught, a read past a tensor's end is, also where it lands in a
neighbouring tensor.  Masked-off lanes are not checked: the interpreter does not dereference them.  Atomics are not
checked (the kernels use none).  Interpreter only, on CPU tensors: with CUDA tensors it reads host copies."""
from __future__ import annotations

import contextlib

import numpy as np


def _storage_ranges(arg, out: list) -> None:
    if isinstance(arg, (tuple, list)):
        for a in arg:
            _storage_ranges(a, out)
    elif hasattr(arg, "base") and hasattr(arg, "block_shape"):  # a TensorDescriptor
        _storage_ranges(arg.base, out)
    elif hasattr(arg, "untyped_storage"):
        st = arg.untyped_storage()
        out.append((st.data_ptr(), st.data_ptr() + st.nbytes()))


class _Checked:
    """The interpreter's native module with its ``load`` / ``store`` checked; everything else passed through."""

    def __init__(self, native, launches: list, seen: list):
        self._native, self._launches, self._seen = native, launches, seen

    def __getattr__(self, name):
        return getattr(self._native, name)

    def _check(self, what, ptrs, mask, itemsize):
        kernel, ranges = self._launches[-1]
        addr = np.asarray(ptrs, dtype=np.uint64)
        if mask is not None:
            addr = addr[np.broadcast_to(np.asarray(mask, dtype=bool), addr.shape)]
        addr = addr.ravel()
        self._seen.append(kernel)
        if addr.size == 0:
            return
        ok = np.zeros(addr.shape, dtype=bool)  # inside the storage that holds the most of the access's lanes
        for lo, hi in ranges:
            inside = (addr >= lo) & (addr + itemsize <= hi)
            if inside.sum() > ok.sum():
                ok = inside
        if not ok.all():
            bad = int(addr[~ok][0])
            near = min(ranges, key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])), default=None)
            where = f"nearest storage {near[0]:#x}-{near[1]:#x}" if near else "no tensor argument"
            raise AssertionError(f"{kernel}: {what} of {int((~ok).sum())} element(s) outside the tensor argument "
                                 f"it addresses, first at {bad:#x} ({where})")

    def load(self, ptrs, mask, other, dtype):
        self._check("load", ptrs, mask, np.dtype(dtype).itemsize)
        return self._native.load(ptrs, mask, other, dtype)

    def store(self, ptrs, value, mask):
        self._check("store", ptrs, mask, np.asarray(value).dtype.itemsize)
        return self._native.store(ptrs, value, mask)


@contextlib.contextmanager
def bounds_checked():
    """Check every Triton launch inside the block; yields the list of kernel names whose accesses were checked."""
    from triton.runtime import interpreter as ti

    launches: list = []
    seen: list = []
    native, call = ti._interpreter, ti.GridExecutor.__call__

    def checked_call(self, *args, **kwargs):
        ranges: list = []
        _storage_ranges(list(args) + list(kwargs.values()), ranges)
        launches.append((getattr(self.fn, "__name__", "kernel"), ranges))
        try:
            return call(self, *args, **kwargs)
        finally:
            launches.pop()

    ti._interpreter = _Checked(native, launches, seen)
    ti.GridExecutor.__call__ = checked_call
    try:
        yield seen
    finally:
        ti._interpreter, ti.GridExecutor.__call__ = native, call
