"""Full model: HF DeBERTa-v3 (base/large shaped, random weights) inference and training step,
HF eager vs deberta_fast-patched vs the peer libraries, on padded MNLI-like batches and
(full profile) long-document batches.

Inference: ``model.eval()``, ``torch.no_grad()``, forward of ``DebertaV2ForSequenceClassification``.
Training step: ``model.train()`` (dropout 0.1 as configured), forward, cross-entropy,
backward, ``AdamW.step()``, ``zero_grad``; on GPU under ``torch.autocast(bf16)`` with fp32 weights.

Parity (before timing): the candidate's last hidden state (eval mode, valid tokens) and, for
the training group, the gradient of the word-embedding table (which flows through every
layer's backward) against an fp64 HF eager copy of the same weights.
"""
from __future__ import annotations

import copy
import gc

import pytest
import torch

from benchmarks import harness
from benchmarks.flops import model_flops
from benchmarks.model import _Unavailable, build_hf_model, make_batch_inputs
from benchmarks.profiles import V3_SPAN

pytestmark = pytest.mark.model

_BASE: dict = {}
_REF: dict = {}
_HF_ERR: dict = {}
#: the fp64 HF oracle is run only while one [B, H, L, L] fp64 tensor stays below this
ORACLE_ELEMS = 1 << 28


def _free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _base(profile, shape, mode, dtype):
    wdtype = dtype if mode == "inference" else torch.float32
    key = (shape, wdtype)
    if key not in _BASE:
        _BASE.clear()
        _REF.clear()
        _free(profile.device)
        _BASE[key] = build_hf_model(shape, profile.device, wdtype)
    return _BASE[key]


def _loss_fn(out, labels):
    return torch.nn.functional.cross_entropy(out.logits.float(), labels)


def _probe(model, ids, mask, want_grad: bool, autocast_dtype=None):
    """eval-mode last hidden state on valid tokens (+ grad of the word embeddings)."""
    model.eval()
    emb = model.deberta.embeddings.word_embeddings.weight
    emb.grad = None
    g = torch.Generator().manual_seed(7)
    ctx = torch.autocast(ids.device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(
        ids.device.type, enabled=False)
    with torch.set_grad_enabled(want_grad), ctx:
        h = model.deberta(input_ids=ids, attention_mask=mask).last_hidden_state
        h = h * mask[..., None].to(h.dtype)
        grad = None
        if want_grad:
            seed = torch.randn(h.shape, generator=g).to(device=h.device, dtype=h.dtype)
            (h.float() * seed.float()).sum().backward()
            grad = emb.grad.detach().clone()
            emb.grad = None
    return h.detach(), grad


def _reference(base, shape, batch, ids, mask, want_grad):
    key = (shape, batch, want_grad)
    if key not in _REF:
        ref = copy.deepcopy(base).double()
        _REF[key] = _probe(ref, ids, mask, want_grad)
        del ref
    return _REF[key]


def _oom_types():
    t = [torch.cuda.OutOfMemoryError] if hasattr(torch.cuda, "OutOfMemoryError") else []
    return tuple(t) + (MemoryError,)


def _check(cand, base, shape, batch, mode, dtype, ids, mask, profile):
    B, L = batch.batch, batch.padded_len
    if B * shape.heads * L * L > ORACLE_ELEMS:
        return None, f"unchecked: no fp64 HF oracle fits ({B}x{shape.heads}x{L}x{L})"
    want_grad = mode == "train"
    ref_h, ref_g = _reference(base, shape, batch, ids, mask, want_grad)
    model = cand.build(copy.deepcopy(base), mode, batch)
    ac = dtype if (mode == "train" and dtype != torch.float32) else None
    h, g = _probe(model, ids, mask, want_grad, ac)
    err = harness.rel_max_err(h, ref_h)
    what = "last hidden state (valid tokens, eval)"
    if want_grad:
        err = max(err, harness.rel_max_err(g, ref_g))
        what += " and word-embedding gradient"
    del model
    return err, what + " vs fp64 HF eager"


def bench_model(benchmark, profile, model_case, request):
    mode, dtype, shape, batch, cand = model_case
    dts = str(dtype).replace("torch.", "")
    benchmark.group = f"model {mode} {dts} {shape.name} {batch.name}"
    reason = cand.skip_reason(profile.device, mode)
    if reason:
        pytest.skip(f"{cand.name}: {reason}")
    base = _base(profile, shape, mode, dtype)
    ids, mask, labels = make_batch_inputs(batch, shape.vocab, profile.device)
    info = {"suite": "model", "candidate": cand.name, "kind": cand.kind, "mode": mode, "dtype": dts,
            "model": shape.name, "batch": batch.name, "B": batch.batch, "L": batch.padded_len,
            "tokens": batch.tokens, "notes": cand.notes,
            "precision": "weights " + ("fp32, autocast " + dts if mode == "train" and dtype != torch.float32 else dts)}
    model = opt = None
    try:
        hkey = (shape, batch, mode, dtype)
        if cand.name != "hf-eager" and hkey not in _HF_ERR:
            from benchmarks.model import candidates

            hf = next(c for c in candidates() if c.name == "hf-eager")
            try:
                _HF_ERR[hkey] = _check(hf, base, shape, batch, mode, dtype, ids, mask, profile)[0]
            except _oom_types():
                _HF_ERR[hkey] = None
            _free(profile.device)
        err, what = _check(cand, base, shape, batch, mode, dtype, ids, mask, profile)
        if cand.name == "hf-eager":
            _HF_ERR[hkey] = err
        if err is None:
            info.update({"parity": "unchecked", "parity_of": what})
        else:
            hf = cand.name == "hf-eager"
            info.update(harness.parity_info(err, dtype, None if hf else _HF_ERR.get(hkey), what, baseline=hf))
        _free(profile.device)

        model = cand.build(copy.deepcopy(base), mode, batch)
        if mode == "inference":
            model.eval()

            def fn():
                with torch.no_grad():
                    return model(input_ids=ids, attention_mask=mask).logits
            setup = None
        else:
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            ac = dtype != torch.float32

            def fn():
                with torch.autocast(profile.device, dtype=dtype, enabled=ac):
                    out = model(input_ids=ids, attention_mask=mask)
                loss = _loss_fn(out, labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach()
            setup = None
        flops = model_flops(mode, batch.lengths, layers=shape.layers, hidden=shape.hidden, heads=shape.heads,
                            intermediate=shape.intermediate, span=V3_SPAN)
        harness.run_benchmark(benchmark, profile, fn, setup, flops=flops, extra=info)
    except _Unavailable as e:
        pytest.skip(f"{cand.name}: {e}")
    except _oom_types() as e:
        model = opt = None
        _free(profile.device)
        pytest.skip(f"{cand.name}: out of memory at {shape.name} {batch.name} {mode}: {str(e).splitlines()[0][:200]}")
    except Exception as e:
        import deberta_fast

        if cand.kind == "deberta_fast" and not isinstance(e, deberta_fast.BackendUnavailableError):
            raise
        if isinstance(e, deberta_fast.BackendUnavailableError):
            pytest.skip(f"{cand.name}: {e}")
        pytest.skip(f"{cand.name}: failed here: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    finally:
        model = opt = None
        _free(profile.device)
    if info.get("parity") == "WRONG":
        harness.record_wrong(request.node.nodeid, info)
        if harness.strict():
            pytest.fail(f"{cand.name} is WRONG: max_err {info['max_err']:.3g} > tol {info['tol']:.3g}")
