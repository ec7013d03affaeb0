"""Attention-core candidates: every way to compute DeBERTa disentangled attention from
``query/key/value [B,H,L,D]``, ``pos_key/pos_query [H,2*span,D]`` and a ``[B,L]`` padding mask.

Every candidate is a :class:`Candidate`; ``skip_reason`` says why it cannot run here,
``prepare`` turns the canonical inputs into its own leaves (layout conversions happen
there, untimed) and returns a :class:`Prepared` whose ``fn()`` is what gets timed.

Parity is judged on the valid (unpadded) query rows only: HF makes padded query rows
uniform over all keys, SDPA and FlexAttention with a key-padding mask do not, and no
model reads those rows.  The backward seed ``dout`` is zero on padded rows for the same
reason.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .harness import gpu_only_reason
from .profiles import Batch, V3_BUCKETS, V3_MAX_REL, V3_SPAN

GRAD_NAMES = ("query", "key", "value", "pos_key", "pos_query")


@dataclass
class CoreInputs:
    batch: Batch
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    pos_key: torch.Tensor
    pos_query: torch.Tensor
    mask: torch.Tensor  # bool [B, L]
    dout: torch.Tensor  # [B, H, L, D], zero on padded query rows
    position_buckets: int = V3_BUCKETS
    max_relative_positions: int = V3_MAX_REL

    @property
    def dtype(self):
        return self.query.dtype

    @property
    def device(self):
        return self.query.device

    @property
    def span(self):
        return self.pos_key.shape[-2] // 2

    @property
    def scale(self):
        from deberta_fast.reference import default_scale

        return default_scale(self.query.shape[-1], 2)

    def tensors(self):
        return (self.query, self.key, self.value, self.pos_key, self.pos_query)

    def slice(self, b: slice, h: slice) -> "CoreInputs":
        sel = lambda t: t[b, h].contiguous()  # noqa: E731
        lengths = self.batch.lengths[b]
        return CoreInputs(Batch(self.batch.name + "-slice", tuple(lengths), self.batch.padded_len),
                          sel(self.query), sel(self.key), sel(self.value),
                          self.pos_key[h].contiguous(), self.pos_query[h].contiguous(), self.mask[b].contiguous(),
                          sel(self.dout), self.position_buckets, self.max_relative_positions)

    def to(self, dtype) -> "CoreInputs":
        c = lambda t: t.detach().to(dtype)  # noqa: E731
        return CoreInputs(self.batch, c(self.query), c(self.key), c(self.value), c(self.pos_key),
                          c(self.pos_query), self.mask, c(self.dout), self.position_buckets,
                          self.max_relative_positions)


def make_inputs(batch: Batch, heads: int, head_dim: int, dtype, device, seed: int = 0) -> CoreInputs:
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, L, H, D, S = batch.batch, batch.padded_len, heads, head_dim, V3_SPAN

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    mask = batch.mask(device)
    dout = rnd(B, H, L, D) * mask[:, None, :, None]
    return CoreInputs(batch, rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D), rnd(H, 2 * S, D), rnd(H, 2 * S, D),
                      mask, dout.to(dtype))


@dataclass
class Prepared:
    fn: Callable[[], torch.Tensor]
    leaves: dict  # name -> leaf tensor in the candidate's layout
    out_to_canon: Callable[[torch.Tensor], torch.Tensor] = lambda o: o  # noqa: E731
    grads_to_canon: Callable[[dict], dict] = lambda g: g  # noqa: E731
    dout: torch.Tensor | None = None  # backward seed in the candidate's output layout

    def grads(self) -> dict:
        return self.grads_to_canon({k: v.grad for k, v in self.leaves.items()})

    def zero_grads(self):
        for v in self.leaves.values():
            v.grad = None


@dataclass
class Candidate:
    name: str
    kind: str  # "deberta_fast" | "baseline" | "peer" | "ceiling"
    skip_reason: Callable[[CoreInputs, str], str | None]
    prepare: Callable[[CoreInputs, bool], Prepared]
    exact: bool = True  # False: computes a different function (no parity)
    notes: str = ""
    meta: dict = field(default_factory=dict)


def _leaves(inp: CoreInputs, grad: bool) -> dict:
    return {n: t.detach().clone().requires_grad_(grad) for n, t in zip(GRAD_NAMES, inp.tensors())}


# ----------------------------------------------------------------------------- deberta_fast

def _df_skip(backend: str):
    def skip(inp: CoreInputs, mode: str):
        try:
            import deberta_fast
        except Exception as e:  # pragma: no cover - the package is the subject
            return f"deberta_fast not importable: {e!r}"
        if backend != "torch" and inp.device.type != "cuda":
            return gpu_only_reason(backend)
        # ask the dispatcher with a tiny call of the same dtype/device/mask kind
        q = inp.query[:1, :, :8]
        try:
            deberta_fast.disentangled_attention(
                q, q, q, inp.pos_key, inp.pos_query, position_buckets=inp.position_buckets,
                max_relative_positions=inp.max_relative_positions, attention_mask=inp.mask[:1, :8],
                backend=backend)
        except deberta_fast.BackendUnavailableError as e:
            return str(e)
        return None
    return skip


def _df_prepare(backend: str, wgmma: bool = False, tma: bool = False):
    """``wgmma`` (cuda): the kernels' wgmma variants or (False) the mma.sync ones, set process-wide from here on
    (DEBERTA_FAST_CUDA_WGMMA, read at each launch: the backward runs outside ``fn``), until the next cuda prepare;
    ``tma`` (triton): the forward's loads through tensor descriptors or not (DEBERTA_FAST_TRITON_TMA), the same way."""
    def prepare(inp: CoreInputs, grad: bool) -> Prepared:
        import deberta_fast

        if backend == "cuda":
            from deberta_fast import _cuda_ext

            os.environ[_cuda_ext.WGMMA_ENV] = "1" if wgmma else "0"
        elif backend == "triton":
            from deberta_fast._kernels import triton_attention_launch as launch

            os.environ[launch.TMA_ENV] = "1" if tma else "0"
        lv = _leaves(inp, grad)
        mask = inp.mask
        pb, mr = inp.position_buckets, inp.max_relative_positions

        def fn():
            return deberta_fast.disentangled_attention(
                lv["query"], lv["key"], lv["value"], lv["pos_key"], lv["pos_query"], position_buckets=pb,
                max_relative_positions=mr, attention_mask=mask, backend=backend)
        return Prepared(fn, lv, dout=inp.dout)
    return prepare


def _wgmma_skip(inp: CoreInputs, mode: str):
    """The cuda backend's kernels on their wgmma variants (DEBERTA_FAST_CUDA_WGMMA=1): where the device runs the
    extension's sm_90a build."""
    why = _df_skip("cuda")(inp, mode)
    if why:
        return why
    from deberta_fast import _cuda_ext

    if torch.cuda.get_device_capability(inp.device)[0] != 9:
        return "the wgmma kernels are sm_90 only (Hopper)"
    import deberta_fast

    q = inp.query[:1, :, :8].detach().requires_grad_()
    _cuda_ext.reset_last_kernels()
    with _cuda_ext.use_wgmma():
        out = deberta_fast.disentangled_attention(q, q, q, inp.pos_key, inp.pos_query, backend="cuda",
                                                  position_buckets=inp.position_buckets,
                                                  max_relative_positions=inp.max_relative_positions)
        out.sum().backward()
    ran = (_cuda_ext.last_fwd_kernel(), _cuda_ext.last_bwd_kernel())
    return None if ran == ("wgmma", "wgmma") else f"the extension ran {ran}: no sm_90a build for this device"


def _wgmma_prepare(inp: CoreInputs, grad: bool) -> Prepared:
    return _df_prepare("cuda", wgmma=True)(inp, grad)


def _tma_skip(inp: CoreInputs, mode: str):
    """The triton backend with the forward's loads through tensor descriptors (DEBERTA_FAST_TRITON_TMA=1): where the
    forward takes them (sm_90, 16-bit, aligned inputs)."""
    why = _df_skip("triton")(inp, mode)
    if why:
        return why
    import deberta_fast
    from deberta_fast._kernels import triton_attention_launch as launch

    q = inp.query[:1, :, :16]
    launch.reset_last_forward_tma()
    with launch.use_tma():
        deberta_fast.disentangled_attention(q, q, q, inp.pos_key, inp.pos_query, backend="triton",
                                            position_buckets=inp.position_buckets,
                                            max_relative_positions=inp.max_relative_positions)
    return None if launch.last_forward_tma() else "the forward read through pointers (TMA: sm_90, 16-bit inputs)"


def _tma_prepare(inp: CoreInputs, grad: bool) -> Prepared:
    return _df_prepare("triton", tma=True)(inp, grad)


# ----------------------------------------------------------------------------- HF eager

class _Const(torch.nn.Module):
    """Stands in for a projection ``nn.Linear``: returns a fixed tensor (so HF's own
    ``DisentangledSelfAttention.forward`` runs unchanged on our q/k/v/pos tensors)."""

    def __init__(self, t):
        super().__init__()
        self.t = t

    def forward(self, x):
        return self.t


def _hf_skip(inp: CoreInputs, mode: str):
    try:
        from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention  # noqa: F401
    except Exception as e:
        return f"transformers DeBERTa-v2 not importable: {e!r}"
    return None


def _hf_prepare(inp: CoreInputs, grad: bool) -> Prepared:
    from transformers import DebertaV2Config
    from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention, build_relative_position

    B, H, L, D = inp.query.shape
    cfg = DebertaV2Config(hidden_size=H * D, num_attention_heads=H, intermediate_size=4 * H * D,
                          relative_attention=True, position_buckets=inp.position_buckets,
                          max_relative_positions=inp.max_relative_positions, max_position_embeddings=512,
                          pos_att_type=["p2c", "c2p"], share_att_key=False, attention_probs_dropout_prob=0.0,
                          hidden_dropout_prob=0.0)
    mod = DisentangledSelfAttention(cfg).to(inp.device).eval()

    def hf_layout(t):  # [B,H,L,D] -> [B,L,H*D]
        return t.detach().transpose(1, 2).reshape(B, L, H * D).contiguous().requires_grad_(grad)

    def pos_layout(t):  # [H,2S,D] -> [1,2S,H*D]
        return t.detach().transpose(0, 1).reshape(1, t.shape[1], H * D).contiguous().requires_grad_(grad)

    lv = {"query": hf_layout(inp.query), "key": hf_layout(inp.key), "value": hf_layout(inp.value),
          "pos_key": pos_layout(inp.pos_key), "pos_query": pos_layout(inp.pos_query)}
    mod.query_proj, mod.key_proj, mod.value_proj = _Const(lv["query"]), _Const(lv["key"]), _Const(lv["value"])
    mod.pos_key_proj, mod.pos_query_proj = _Const(lv["pos_key"]), _Const(lv["pos_query"])
    # HF's encoder builds these once per forward for all layers: untimed here, as in an encoder
    m = inp.mask.to(torch.long)
    ext = m[:, None, None, :]
    mask4 = (ext * ext.squeeze(-2).unsqueeze(-1)).to(torch.uint8)
    hs = torch.empty(B, L, H * D, device=inp.device, dtype=inp.dtype)
    rel_pos = build_relative_position(hs, hs, bucket_size=mod.position_buckets, max_position=mod.max_relative_positions)
    rel_emb = torch.empty(2 * inp.span, H * D, device=inp.device, dtype=inp.dtype)

    def fn():
        return mod(hs, mask4, relative_pos=rel_pos, rel_embeddings=rel_emb)[0]

    def out_to_canon(o):
        return o.view(B, L, H, D).transpose(1, 2)

    def grads_to_canon(g):
        res = {}
        for n in ("query", "key", "value"):
            res[n] = None if g[n] is None else g[n].view(B, L, H, D).transpose(1, 2)
        for n in ("pos_key", "pos_query"):
            res[n] = None if g[n] is None else g[n][0].view(-1, H, D).transpose(0, 1)
        return res

    dout = inp.dout.transpose(1, 2).reshape(B, L, H * D).contiguous()
    return Prepared(fn, lv, out_to_canon, grads_to_canon, dout)


# ----------------------------------------------------------------------------- SDPA + materialised bias

def _slot_idx(inp: CoreInputs):
    from deberta_fast.reference import slot_index

    L = inp.query.shape[2]
    idx, _ = slot_index(L, L, inp.position_buckets, inp.max_relative_positions, inp.span, inp.device)
    return idx


def _sdpa_skip(inp, mode):
    if not hasattr(F, "scaled_dot_product_attention"):
        return "torch.nn.functional.scaled_dot_product_attention missing in this torch"
    return None


def _sdpa_bias_prepare(inp: CoreInputs, grad: bool) -> Prepared:
    lv = _leaves(inp, grad)
    B, H, L, D = inp.query.shape
    idx = _slot_idx(inp)  # [L, L] (untimed: a model builds it once for all layers)
    idx_q = idx.expand(B, H, L, L)
    idx_k = idx.t().expand(B, H, L, L)
    key_pad = ~inp.mask[:, None, None, :]
    scale = inp.scale

    def fn():
        q, k = lv["query"], lv["key"]
        c2p = torch.gather(torch.matmul(q, lv["pos_key"].transpose(-1, -2)), -1, idx_q)
        p2c = torch.gather(torch.matmul(k, lv["pos_query"].transpose(-1, -2)), -1, idx_k).transpose(-1, -2)
        bias = ((c2p + p2c) * scale).masked_fill(key_pad, float("-inf"))
        return F.scaled_dot_product_attention(q, k, lv["value"], attn_mask=bias, scale=scale)
    return Prepared(fn, lv, dout=inp.dout)


def _sdpa_plain_prepare(inp: CoreInputs, grad: bool) -> Prepared:
    lv = _leaves(inp, grad)
    keep = inp.mask[:, None, None, :]
    scale = inp.scale
    dense = inp.batch.dense

    def fn():
        return F.scaled_dot_product_attention(lv["query"], lv["key"], lv["value"],
                                              attn_mask=None if dense else keep, scale=scale)
    return Prepared(fn, lv, dout=inp.dout)


# ----------------------------------------------------------------------------- FlexAttention

_FLEX_COMPILED = {}


def _flex_skip(inp: CoreInputs, mode: str):
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except Exception as e:
        return f"torch.nn.attention.flex_attention unavailable in torch {torch.__version__}: {e!r}"
    if inp.device.type == "cpu" and mode != "fwd":
        return (f"FlexAttention in torch {torch.__version__} does not support backward on CPU "
                f"(NotImplementedError from flex_attention)")
    if inp.device.type == "cpu" and inp.dtype != torch.float32:
        return "FlexAttention on CPU benchmarked in float32 only"
    return None


def _flex_prepare(inp: CoreInputs, grad: bool) -> Prepared:
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _FLEX_COMPILED:
        # one compiled graph per shape/dtype/mode: allow as many as the suite has cases, or dynamo
        # would silently fall back to eager flex_attention (which materialises the scores)
        from torch._dynamo import config as dynamo_config

        for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 512))
        _FLEX_COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX_COMPILED["fn"]
    lv = _leaves(inp, grad)
    B, H, L, D = inp.query.shape
    from deberta_fast.positions import relative_slot_table

    table = relative_slot_table(L, L, inp.position_buckets, inp.max_relative_positions, inp.span,
                                inp.device).long()
    valid = inp.mask
    scale = inp.scale
    block_mask = None
    if not inp.batch.dense and inp.device.type == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, qi, ki):
            return valid[b, ki]
        block_mask = create_block_mask(mask_mod, B, None, L, L, device=inp.device)

    def fn():
        # per-(query row, slot) and per-(key row, slot) tables: the two relative GEMMs, timed
        c2p = torch.matmul(lv["query"], lv["pos_key"].transpose(-1, -2)) * scale  # [B,H,L,2S]
        p2c = torch.matmul(lv["key"], lv["pos_query"].transpose(-1, -2)) * scale  # [B,H,L,2S]

        def score_mod(score, b, h, qi, ki):
            s = table[qi - ki + (L - 1)]
            out = score + c2p[b, h, qi, s] + p2c[b, h, ki, s]
            if block_mask is None and not inp.batch.dense:
                out = torch.where(valid[b, ki], out, -float("inf"))
            return out
        return flex(lv["query"], lv["key"], lv["value"], score_mod=score_mod, block_mask=block_mask, scale=scale)
    return Prepared(fn, lv, dout=inp.dout)


# ----------------------------------------------------------------------------- peers

def _peer_skip(pkg: str):
    def skip(inp, mode):
        return (f"{pkg} exposes only a Hugging Face module/model API (its attention takes hidden states and "
                f"projects them itself); it is compared in the model groups, not on raw q/k/v tensors")
    return skip


def candidates() -> list[Candidate]:
    c = [Candidate(f"deberta_fast-{b}", "deberta_fast", _df_skip(b), _df_prepare(b)) for b in ("torch", "triton", "cuda")]
    c.append(Candidate("deberta_fast-cuda-wgmma", "deberta_fast", _wgmma_skip, _wgmma_prepare,
                       notes="the cuda backend with its kernels' wgmma variants (sm_90a, DEBERTA_FAST_CUDA_WGMMA=1)"))
    c.append(Candidate("deberta_fast-triton-tma", "deberta_fast", _tma_skip, _tma_prepare,
                       notes="the triton backend, the forward's loads through tensor descriptors (sm_90, "
                             "DEBERTA_FAST_TRITON_TMA=1)"))
    c += [
        Candidate("hf-eager", "baseline", _hf_skip, _hf_prepare,
                  notes="transformers DisentangledSelfAttention.forward, projections replaced by the given tensors"),
        Candidate("sdpa+bias", "baseline", _sdpa_skip, _sdpa_bias_prepare,
                  notes="F.scaled_dot_product_attention with a materialised float c2p+p2c bias"),
        Candidate("flex", "baseline", _flex_skip, _flex_prepare,
                  notes="torch.compile(flex_attention) with a score_mod over precomputed C2P/P2C tables"),
        Candidate("disentangled-flash", "peer", _peer_skip("disentangled-flash"), None),
        Candidate("flashdeberta", "peer", _peer_skip("flashdeberta"), None),
        Candidate("sdpa-no-rel (ceiling)", "ceiling", _sdpa_skip, _sdpa_plain_prepare, exact=False,
                  notes="plain SDPA without relative terms: a ceiling, not DeBERTa attention"),
    ]
    return c


# ----------------------------------------------------------------------------- oracle

#: at most this many elements per [B', H', L, L] fp64 tensor of the reference oracle
ORACLE_ELEMS = 1 << 26


def oracle_slices(inp: CoreInputs):
    """(batch slice, head slice) of the inputs small enough for the fp64 reference, or None."""
    B, H, L, _ = inp.query.shape
    per = L * L
    if per > ORACLE_ELEMS:
        return None
    if B * H * per <= ORACLE_ELEMS:
        return slice(0, B), slice(0, H)
    if H * per <= ORACLE_ELEMS:
        nb = max(1, ORACLE_ELEMS // (H * per))
        return slice(0, nb), slice(0, H)
    nh = max(1, ORACLE_ELEMS // per)
    return slice(0, 1), slice(0, nh)


def reference_fp64(inp: CoreInputs, grads: bool):
    """fp64 reference output (and grads w.r.t. all five inputs for the ``dout`` seed)."""
    from deberta_fast import disentangled_attention_reference

    lv = {n: t.detach().double().requires_grad_(grads) for n, t in zip(GRAD_NAMES, inp.tensors())}
    with torch.set_grad_enabled(grads):
        out = disentangled_attention_reference(
            lv["query"], lv["key"], lv["value"], lv["pos_key"], lv["pos_query"],
            position_buckets=inp.position_buckets, max_relative_positions=inp.max_relative_positions,
            attention_mask=inp.mask)
        if grads:
            out.backward(inp.dout.double())
    return out.detach(), ({n: t.grad for n, t in lv.items()} if grads else None)


def reference_rows_fp64(inp: CoreInputs, b: int, rows: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """fp64 output of batch element ``b`` at query ``rows`` (all heads): ``[H, len(rows), D]``.

    Same math as :func:`deberta_fast.disentangled_attention_reference` (checked against it
    in tests/test_benchmarks_smoke.py), computed row-chunk by row-chunk so that it fits at
    L = 65,536 where the full ``[L, L]`` reference does not."""
    from deberta_fast.positions import relative_slot_table

    q = inp.query[b].double()
    k = inp.key[b].double()
    v = inp.value[b].double()
    pk = inp.pos_key.double()
    pq = inp.pos_query.double()
    L = k.shape[1]
    table = relative_slot_table(L, L, inp.position_buckets, inp.max_relative_positions, inp.span, inp.device).long()
    p2c_full = torch.matmul(k, pq.transpose(-1, -2))  # [H, L, 2S]
    keep = inp.mask[b]
    j = torch.arange(L, device=inp.device)
    outs = []
    for r0 in range(0, rows.numel(), chunk):
        r = rows[r0:r0 + chunk].to(inp.device)
        slot = table[r[:, None] - j[None, :] + (L - 1)]  # [R, L]
        qr = q[:, r]  # [H, R, D]
        s = torch.matmul(qr, k.transpose(-1, -2))
        c2p = torch.matmul(qr, pk.transpose(-1, -2))  # [H, R, 2S]
        s = s + torch.gather(c2p, -1, slot.expand(q.shape[0], -1, -1))
        p2c = torch.gather(p2c_full, -1, slot.t().expand(q.shape[0], -1, -1))  # [H, L, R]
        s = (s + p2c.transpose(-1, -2)) * inp.scale
        s = s.masked_fill(~keep[None, None, :], float("-inf"))
        outs.append(torch.matmul(torch.softmax(s, -1), v))
    return torch.cat(outs, dim=1)
