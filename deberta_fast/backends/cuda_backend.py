"""The ``"cuda"`` backend: the CUDA C++ extension ``deberta_fast._C`` built from ``csrc/``.

Serves fp16 / bf16 inputs on sm_80+ GPUs, head dims 32 / 64 / 128, any ``Lq``/``Lk``,
c2p / p2c / both / neither, bucketed or not, ``[B, Lk]`` key-padding masks (with HF's
uniform rows) and dropout (Philox, regenerated in the backward).  The relative terms
enter as tables ``C2P = Q pos_key^T`` ``[B,H,Lq,2*span]`` and ``P2C = K pos_query^T``
computed here with torch GEMMs (autograd carries their gradients to Q, K and the
position embeddings); the kernels gather them in-tile through the slot table.
Refused (with the reason): CPU tensors, float32/float64, other head dims, 3-D/4-D masks,
GPUs older than sm_80, and everything when the extension is not built.
"""
from __future__ import annotations

import torch

from .. import _cuda_ext
from .base import AttentionCall, Backend

_HALF = (torch.float16, torch.bfloat16)


class CudaBackend(Backend):
    name = "cuda"
    summary = ("CUDA C++ extension (mma.sync, fp16/bf16, sm_80+): head dim 32/64/128, any Lq/Lk, c2p/p2c, "
               "key-padding masks, dropout; O(L*span) memory")

    def unavailable(self):
        return _cuda_ext.unavailable_reason()

    def refusals(self, call: AttentionCall) -> list[str]:
        why = []
        if call.device.type != "cuda":
            why.append(f"inputs are on {call.device}, the cuda backend needs CUDA tensors")
        if call.dtype not in _HALF:
            why.append(f"dtype {call.dtype} is not supported: the CUDA kernels use fp16/bf16 tensor cores "
                       "(cast with .half()/.bfloat16() or run under torch.autocast; backend='triton' or 'torch' "
                       "serve float32)")
        if call.head_dim not in _cuda_ext.HEAD_DIMS:
            why.append(f"head_dim {call.head_dim} is not compiled (supported: "
                       f"{', '.join(map(str, _cuda_ext.HEAD_DIMS))})")
        if call.mask_kind == "full":
            why.append("3-D/4-D attention masks are not supported (only [B, Lk] key-padding masks); "
                       "use backend='triton' or backend='torch'")
        if call.batch * call.heads > 65535:
            why.append(f"B*H = {call.batch * call.heads} exceeds the grid limit 65535")
        if call.q_len + call.k_len >= (1 << 30):
            why.append("sequence too long (Lq + Lk must be < 2^30)")
        if call.device.type == "cuda" and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(call.device)
            if major < 8:
                why.append(f"needs an sm_80+ GPU (mma.sync fp16/bf16), {call.device} is sm_{major}{minor}")
        return why

    def forward(self, call: AttentionCall) -> torch.Tensor:
        ops = _cuda_ext.ops()
        q = _cuda_ext.aligned(call.query)
        k = _cuda_ext.aligned(call.key)
        v = _cuda_ext.aligned(call.value)
        c2p = p2c = table = None
        if call.pos_key is not None:
            c2p = torch.matmul(call.query, call.pos_key.transpose(-1, -2)).contiguous()
        if call.pos_query is not None:
            p2c = torch.matmul(call.key, call.pos_query.transpose(-1, -2)).contiguous()
        if call.has_rel:
            table = call.slot_table()
            band = call.band()
            band_lo, band_hi = int(band.lo), int(band.hi)
        else:
            band_lo, band_hi = 0, 0
        key_mask = uniform = None
        if call.mask_kind == "key":
            key_mask = call.key_mask.contiguous()
        if call.uniform_rows is not None:
            uniform = call.uniform_rows.contiguous()
        rng = None
        if call.dropout_p > 0.0:
            rng = torch.randint(0, 1 << 62, (2,), device=call.device, dtype=torch.int64)
        out, _lse = ops.cuda_attn_fwd(q, k, v, c2p, p2c, table, key_mask, uniform, rng, float(call.scale),
                                      float(call.dropout_p), band_lo, band_hi)
        return out
