"""Small tensor helpers the backends' host paths share."""
from __future__ import annotations

import torch


def add_product_(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x + a @ b``: in place, one batched GEMM accumulating into ``x`` (no product temporary, no add), where the
    operands are 3-D (packed calls' head-major views) or ``x`` / ``a`` are 4-D with a batch of one (``b``: 3-D, or
    4-D with a batch of one); else a product and an add (a new tensor).  ``x`` must be a fresh buffer of the
    caller's (it may be overwritten)."""
    if x.dim() == a.dim() == b.dim() == 3:
        return x.baddbmm_(a, b)
    if x.dim() == a.dim() == 4 and x.shape[0] == 1 and (b.dim() == 3 or b.shape[0] == 1):
        x[0].baddbmm_(a[0], b[0] if b.dim() == 4 else b)
        return x
    return x + torch.matmul(a, b)
