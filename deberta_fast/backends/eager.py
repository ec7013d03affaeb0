"""When a kernel backend may skip the machinery around its custom ops (shared by the triton and cuda backends).

A custom op's eager dispatch (autograd wrapper, redispatch, default filling, the dynamo-disable wrapper) costs host
time on every call and adds nothing in plain eager mode, so the backends call the ops' implementations directly
when :func:`direct` says nothing traces, and skip their autograd functions when :func:`records_grad` says autograd
records nothing (benchmarks/NOTES.md, "Host path")."""
from __future__ import annotations

import torch
from torch import Tensor

from ..positions import tracing

# the legacy vmap's wrappers (autograd.grad(is_grads_batched=True), jacobian(vectorize=True)): plain Tensors to Python
_legacy_batched = getattr(getattr(torch._C, "_functorch", None), "is_legacy_batchedtensor", lambda t: False)

try:  # torch.set_default_device's mode, and the torch function mode stack (private; absent: every mode traces)
    from torch.overrides import _get_current_function_mode_stack as _function_mode_stack
    from torch.utils._device import DeviceContext
except ImportError:  # pragma: no cover - older / newer torch
    DeviceContext = None

    def _function_mode_stack():
        return [None]


def direct(*tensors) -> bool:
    """True when a custom op's plain implementation may be called instead of the op: eager mode, plain
    tensors, no torch function / dispatch mode and no torch.func transform (torch.compile, export, FakeTensor,
    functionalization, ``vmap`` / ``grad`` / ``functionalize``, the batched gradients of
    ``autograd.grad(is_grads_batched=True)`` and tensor subclasses all see the custom op; its batching rule, a loop,
    serves ``vmap``).  The op's eager dispatch costs host time on every call (60-120 us per forward measured on the
    2-core CPU machine, 2026-12-02; benchmarks/NOTES.md, "Host path") and adds nothing there.
    ``torch.set_default_device``'s mode (a torch function mode that only fills in the device of tensor constructors;
    every constructor on the implementations' path names its device) is no tracer: it keeps the direct path."""
    if tracing():
        return False
    if torch._C._is_torch_function_mode_enabled() and not all(
            type(m) is DeviceContext for m in _function_mode_stack()):
        return False
    for t in tensors:  # (a loop: ~0.3 us less than all() over a generator; 2-core CPU machine, 2026-12-05)
        if t is not None and (type(t) is not Tensor or _legacy_batched(t)):
            return False
    return True


def records_grad(*tensors) -> bool:
    """Whether autograd records this call (grad mode on and an input requiring grad).  When it does not
    (inference), the autograd function is skipped: its ``apply`` cost ~15 us of host time per call
    (measured on the 2-core CPU machine, 2026-12-02; benchmarks/NOTES.md, "Host path")."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False
