"""The ``"triton"`` backend (kernels in ``kernels/``)."""
from __future__ import annotations

from .base import AttentionCall, Backend


class TritonBackend(Backend):
    name = "triton"
    summary = "fused Triton kernels (not implemented yet)"

    def unavailable(self):
        return "the Triton kernels are not implemented yet"

    def refusals(self, call: AttentionCall) -> list[str]:
        return [self.unavailable()]
