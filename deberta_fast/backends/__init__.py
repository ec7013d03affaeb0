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

#: order in which ``backend="auto"`` tries backends: the CUDA kernels first where they serve a call (fp16/bf16, key
#: masks): measured faster than the Triton ones in every case of the first GPU profile (H200, bf16, H=12, D=64,
#: 16k tokens: forward 3.4x / 2.7x / 1.5x and forward+backward 2.1x / 2.0x / 1.6x at L = 512 / 2048 / 8192; v3-base
#: inference 1.4x; 2026-12-04, benchmarks/results/2026-12-04-nvidia-h200-session), both exact there at L = 512 -
#: 8192; Triton serves the rest (fp32, full masks, other head dims), torch everything.
AUTO_ORDER = ("cuda", "triton", "torch")
#: the order while tracing (torch.compile, export, FakeTensor): the cuda backend's host path reads the slot table's
#: values, which a trace cannot; the triton backend is one custom op with a fake implementation there
AUTO_ORDER_TRACING = ("triton", "cuda", "torch")

__all__ = ["AttentionCall", "VarlenCall", "Backend", "BACKENDS", "AUTO_ORDER", "AUTO_ORDER_TRACING"]
