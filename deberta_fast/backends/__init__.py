"""Backend registry.  Each backend declares what it serves; :mod:`deberta_fast.dispatch` picks one."""
from __future__ import annotations

from .base import AttentionCall, Backend, VarlenCall
from .torch_backend import TorchBackend

BACKENDS: dict[str, Backend] = {"torch": TorchBackend()}


def _register_optional() -> None:
    # Kernel backends import triton / the CUDA extension lazily; registering them is always safe.
    from .triton_backend import TritonBackend
    from .cuda_backend import CudaBackend

    BACKENDS["triton"] = TritonBackend()
    BACKENDS["cuda"] = CudaBackend()


_register_optional()

#: order in which ``backend="auto"`` tries backends.  Not measured: no kernel has run on a GPU yet; the
#: Triton backend comes first because it serves the most calls (fp32, every mask kind, any head dim) and
#: is the better-tested one (interpreter).  To be set from the first GPU profile (benchmarks/results/).
AUTO_ORDER = ("triton", "cuda", "torch")

__all__ = ["AttentionCall", "VarlenCall", "Backend", "BACKENDS", "AUTO_ORDER"]
