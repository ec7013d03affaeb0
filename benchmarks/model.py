"""Full-model candidates: a HF ``DebertaV2ForSequenceClassification`` with random weights
(seeded; no hub access) run as is (HF eager), patched by deberta_fast, or converted by
a peer library.  Every candidate gets the *same weights* (a state-dict copy of one model).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from .harness import gpu_only_reason
from .profiles import Batch, ModelShape


@dataclass
class ModelCandidate:
    name: str
    kind: str  # "deberta_fast" | "baseline" | "peer"
    skip_reason: Callable[[str, str], str | None]  # (device, mode) -> reason or None
    build: Callable[[torch.nn.Module, str, Batch], torch.nn.Module]  # (hf model, mode, batch) -> model to run
    notes: str = ""


def build_hf_model(shape: ModelShape, device: str, dtype, seed: int = 0):
    from transformers import DebertaV2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = shape.config()
    cfg._attn_implementation = "eager"
    model = DebertaV2ForSequenceClassification(cfg)
    return model.to(device=device, dtype=dtype)


def make_batch_inputs(batch: Batch, vocab: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch.batch, batch.padded_len), generator=g)
    mask = batch.mask()
    ids = ids.masked_fill(~mask, 0)
    labels = torch.randint(0, 3, (batch.batch,), generator=g)
    return ids.to(device), mask.to(device=device, dtype=torch.long), labels.to(device)


# ----------------------------------------------------------------------------- candidates

def _hf_build(model, mode, batch):
    return model


def _df_skip(backend):
    def skip(device, mode):
        try:
            import deberta_fast
        except Exception as e:
            return f"deberta_fast not importable: {e!r}"
        if not hasattr(deberta_fast, "patch"):
            return "deberta_fast.patch (HF model patching) is not available in this checkout yet"
        if backend != "torch" and device != "cuda":
            return gpu_only_reason(backend)
        return None
    return skip


def _df_build(backend):
    def build(model, mode, batch):
        import deberta_fast

        return deberta_fast.patch(model, backend=backend)
    return build


def _dflash_skip(backend):
    def skip(device, mode):
        try:
            import disentangled_flash  # noqa: F401
        except Exception as e:
            return f"disentangled-flash not installed/importable ({type(e).__name__}: {e}); pip install disentangled-flash"
        if backend == "triton" and device != "cuda":
            return "disentangled-flash's Triton kernels need a CUDA device (on CPU it keeps HF's attention)"
        return None
    return skip


def _dflash_build(backend):
    def build(model, mode, batch):
        import disentangled_flash
        from disentangled_flash import DebertaV2OptimizedEncoder

        if mode == "inference":
            # its inference path runs on prepared length buckets: prepare this batch's padded length
            model.eval()
            disentangled_flash.optimize_deberta(model.deberta, backend=backend, inference=True,
                                                sequence_lengths=[batch.padded_len])
        else:
            disentangled_flash.optimize_deberta(model.deberta, backend=backend, inference=False)
        if not isinstance(model.deberta.encoder, DebertaV2OptimizedEncoder):
            raise _Unavailable(f"disentangled-flash left the HF encoder in place (backend={backend!r} "
                               f"unsupported for this model/device/dtype)")
        got = getattr(model.deberta.encoder, "backend", backend)
        if got != backend:
            raise _Unavailable(f"disentangled-flash resolved backend={got!r} instead of {backend!r}")
        return model
    return build


def _fd_skip(device, mode):
    try:
        import flashdeberta  # noqa: F401
    except Exception as e:
        return f"flashdeberta not installed/importable ({type(e).__name__}: {e}); pip install flashdeberta einops"
    if device != "cuda":
        return "flashdeberta has Triton CUDA kernels only (no CPU path)"
    return None


def _fd_build(model, mode, batch):
    from flashdeberta import FlashDebertaV2ForSequenceClassification

    cfg = copy.deepcopy(model.config)
    p = next(model.parameters())
    fd = FlashDebertaV2ForSequenceClassification(cfg).to(device=p.device, dtype=p.dtype)
    missing, unexpected = fd.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise _Unavailable(f"flashdeberta model lacks HF weights {missing[:3]}...: not the same model")
    return fd


class _Unavailable(RuntimeError):
    """A candidate found at build time that it cannot run this case (skip, with this reason)."""


def candidates() -> list[ModelCandidate]:
    c = [ModelCandidate("hf-eager", "baseline", lambda d, m: None, _hf_build,
                        notes="transformers DebertaV2ForSequenceClassification, attn_implementation=eager")]
    c += [ModelCandidate(f"deberta_fast-{b}", "deberta_fast", _df_skip(b), _df_build(b),
                         notes=f"deberta_fast.patch(model, backend={b!r}) (packs padded batches by default)")
          for b in ("torch", "triton", "cuda")]
    c += [ModelCandidate(f"disentangled-flash-{b}", "peer", _dflash_skip(b), _dflash_build(b),
                         notes="disentangled_flash.optimize_deberta(model.deberta, backend=..., inference=..., sequence_lengths=[L])") for b in ("torch", "triton")]
    c += [ModelCandidate("flashdeberta", "peer", _fd_skip, _fd_build,
                         notes="flashdeberta.FlashDebertaV2ForSequenceClassification with the HF weights")]
    return c
