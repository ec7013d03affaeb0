"""Training features through patch(): torch.autocast and HF gradient checkpointing (CPU, torch backend)."""
import copy
import os

import pytest
import torch

from deberta_fast import patched
from hf_configs import v2_config

transformers = pytest.importorskip("transformers")

# the fused Triton path runs here too: on a GPU, or under the interpreter on CPU (TRITON_INTERPRET=1)
from deberta_fast.backends import BACKENDS as _ALL  # noqa: E402

FUSED = ["triton"] if ((torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
                       and _ALL["triton"].unavailable() is None) else []
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(B=3, L=21):
    ids = torch.randint(1, 97, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 13:] = 0
    mask[2, 5:] = 0
    return ids, mask, torch.tensor([0, 1, 1])


def _loss_and_grads(model, ids, mask, labels, autocast_dtype=None):
    model.zero_grad()
    dev = next(model.parameters()).device.type
    with torch.autocast(dev, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach().double(), [p.grad.detach().double().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend,pack", [("torch", False), ("torch", True)] + [(b, True) for b in FUSED])
def test_autocast_bf16_within_eager_error(backend, pack):
    """Under autocast the patched model is as close to the fp64 truth as HF's own bf16 eager run (x4)."""
    cfg = v2_config(conv=3)
    dev = DEV if backend != "torch" else "cpu"
    model = transformers.DebertaV2ForSequenceClassification(cfg).to(dev).train()
    ids, mask, labels = (t.to(dev) for t in _batch())
    truth = _loss_and_grads(copy.deepcopy(model).double(), ids, mask, labels)
    eager = _loss_and_grads(model, ids, mask, labels, torch.bfloat16)
    with patched(model, backend=backend, pack=pack):
        fast = _loss_and_grads(model, ids, mask, labels, torch.bfloat16)
    assert torch.isfinite(fast[0])
    eager_err = (eager[0] - truth[0]).abs().item()
    assert (fast[0] - truth[0]).abs().item() <= 4 * eager_err + 1e-3
    for f, e, t in zip(fast[1], eager[1], truth[1]):
        assert torch.isfinite(f).all()
        assert (f - t).norm() <= 4 * (e - t).norm() + 1e-3 * t.norm() + 1e-6


@pytest.mark.parametrize("backend,pack", [("torch", False), ("torch", True)] + [
    pytest.param(b, p, marks=[pytest.mark.slow] if not p else []) for b in FUSED for p in (False, True)])
def test_gradient_checkpointing_matches(backend, pack):
    """HF gradient checkpointing recomputes the patched attention; loss and grads as without it."""
    cfg = v2_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    dtype, dev = (torch.float64, "cpu") if backend == "torch" else (torch.float32, DEV)
    model = transformers.DebertaV2ForSequenceClassification(cfg).to(dev, dtype).train()
    ids, mask, labels = (t.to(dev) for t in _batch())
    with patched(model, backend=backend, pack=pack):
        torch.manual_seed(5)  # dropout (in the fused kernels too) must replay in the recomputation
        want = _loss_and_grads(model, ids, mask, labels)
        model.gradient_checkpointing_enable()
        torch.manual_seed(5)
        got = _loss_and_grads(model, ids, mask, labels)
        model.gradient_checkpointing_disable()
    tol = dict(rtol=1e-8, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[0], want[0], **tol)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, **tol)


def test_named_backend_without_varlen_runs_padded(monkeypatch):
    """pack=True with a backend that has no packed path keeps HF's padded layout (no error)."""
    from deberta_fast.backends import BACKENDS

    monkeypatch.setattr(type(BACKENDS["torch"]), "supports_varlen", False)
    model = transformers.DebertaV2Model(v2_config()).double().eval()
    ids, mask, _ = _batch()
    want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    with patched(model, backend="torch", pack=True):
        assert model.encoder._deberta_fast_pack is False
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)  # padded positions too
