"""The ``"cuda"`` backend (CUDA C++ extension built from ``csrc/``)."""
from __future__ import annotations

from .base import AttentionCall, Backend


class CudaBackend(Backend):
    name = "cuda"
    summary = "CUDA C++ extension (not implemented yet)"

    def unavailable(self):
        return "the CUDA C++ extension is not implemented yet"

    def refusals(self, call: AttentionCall) -> list[str]:
        return [self.unavailable()]
