"""Training features through patch(): torch.autocast and HF gradient checkpointing (CPU, torch backend)."""
import copy

import pytest
import torch

from deberta_fast import patched
from hf_configs import v2_config

transformers = pytest.importorskip("transformers")


def _batch(B=3, L=21):
    ids = torch.randint(1, 97, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 13:] = 0
    mask[2, 5:] = 0
    return ids, mask, torch.tensor([0, 1, 1])


def _loss_and_grads(model, ids, mask, labels, autocast_dtype=None):
    model.zero_grad()
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach().double(), [p.grad.detach().double().clone() for p in model.parameters()]


@pytest.mark.parametrize("pack", [False, True])
def test_autocast_bf16_within_eager_error(pack):
    """Under autocast the patched model is as close to the fp64 truth as HF's own bf16 eager run (x4)."""
    cfg = v2_config(conv=3)
    model = transformers.DebertaV2ForSequenceClassification(cfg).train()
    ids, mask, labels = _batch()
    truth = _loss_and_grads(copy.deepcopy(model).double(), ids, mask, labels)
    eager = _loss_and_grads(model, ids, mask, labels, torch.bfloat16)
    with patched(model, backend="torch", pack=pack):
        fast = _loss_and_grads(model, ids, mask, labels, torch.bfloat16)
    assert torch.isfinite(fast[0])
    eager_err = (eager[0] - truth[0]).abs().item()
    assert (fast[0] - truth[0]).abs().item() <= 4 * eager_err + 1e-3
    for f, e, t in zip(fast[1], eager[1], truth[1]):
        assert torch.isfinite(f).all()
        assert (f - t).norm() <= 4 * (e - t).norm() + 1e-3 * t.norm() + 1e-6


@pytest.mark.parametrize("pack", [False, True])
def test_gradient_checkpointing_matches(pack):
    cfg = v2_config()
    model = transformers.DebertaV2ForSequenceClassification(cfg).double().train()
    ids, mask, labels = _batch()
    want = _loss_and_grads(model, ids, mask, labels)
    model.gradient_checkpointing_enable()
    with patched(model, backend="torch", pack=pack):
        got = _loss_and_grads(model, ids, mask, labels)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


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
