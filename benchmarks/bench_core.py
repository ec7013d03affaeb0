"""Attention core: forward, backward, forward+backward of DeBERTa disentangled attention.

Each case: one (mode, dtype, batch) and one candidate.  Before timing, the candidate's
output (and gradients, for the backward modes) is checked against the fp64 reference
(``deberta_fast.disentangled_attention_reference``); the result is stored in
``extra_info`` and a failing candidate is reported as WRONG (by the report and the
terminal summary; with DEBERTA_FAST_BENCH_STRICT=1 the test also fails).
"""
from __future__ import annotations

import gc

import pytest
import torch

from benchmarks import harness
from benchmarks.core import (GRAD_NAMES, make_inputs, oracle_slices, reference_fp64, reference_rows_fp64)
from benchmarks.flops import attention_flops

pytestmark = pytest.mark.core

_INPUTS: dict = {}
_HF_ERR: dict = {}
_REF: dict = {}


def _inputs(profile, batch, dtype):
    key = (batch, dtype)
    if key not in _INPUTS:
        _INPUTS.clear()
        _REF.clear()
        gc.collect()
        if profile.device == "cuda":
            torch.cuda.empty_cache()
        _INPUTS[key] = make_inputs(batch, profile.heads, profile.head_dim, dtype, profile.device)
    return _INPUTS[key]


def _valid_rows(t, mask):  # zero padded query rows of a [B,H,L,*] tensor
    return t * mask[:, None, :, None].to(t.dtype)


def _parity(cand, inp, mode, hf_err):
    grads = mode != "fwd"
    sl = oracle_slices(inp)
    if sl is not None:
        sub = inp.slice(*sl)
        rkey = (sl[0].stop, sl[1].stop, grads)
        if rkey not in _REF:
            _REF[rkey] = reference_fp64(sub, grads)
        ref_out, ref_grads = _REF[rkey]
        p = cand.prepare(sub, grads)
        with torch.set_grad_enabled(grads):
            out = p.fn()
            if grads:
                out.backward(p.dout)
        err = harness.rel_max_err(_valid_rows(p.out_to_canon(out), sub.mask), _valid_rows(ref_out, sub.mask))
        what = "output"
        if grads:
            g = p.grads()
            for n in GRAD_NAMES:
                if g.get(n) is None:
                    err = float("inf")
                else:
                    err = max(err, harness.rel_max_err(g[n], ref_grads[n]))
            what = "output and grads of q, k, v, pos_key, pos_query"
        B, H = sub.query.shape[:2]
        what += f" (fp64 reference, {B} of {inp.query.shape[0]} sequences, {H} of {inp.query.shape[1]} heads)"
        return err, what
    # too large for the full reference: forward on sampled rows of the first sequence
    L = inp.query.shape[2]
    n = min(256, L)
    rows = torch.linspace(0, inp.batch.lengths[0] - 1, n).round().long().unique()
    with torch.no_grad():
        p = cand.prepare(inp, False)
        out = p.out_to_canon(p.fn())[0][:, rows.to(out_device(inp))]
        ref = reference_rows_fp64(inp, 0, rows)
    err = harness.rel_max_err(out, ref)
    return err, (f"output at {rows.numel()} sampled query rows of sequence 0 (row-chunked fp64 reference; "
                 f"grads unchecked: no fp64 oracle fits at L={L})")


def out_device(inp):
    return inp.device


def _oom_types():
    t = [torch.cuda.OutOfMemoryError] if hasattr(torch.cuda, "OutOfMemoryError") else []
    return tuple(t) + (MemoryError,)


def bench_core(benchmark, profile, core_case, request):
    mode, dtype, batch, cand = core_case
    benchmark.group = f"core {mode} {str(dtype).replace('torch.', '')} {batch.name}"
    inp = _inputs(profile, batch, dtype)
    reason = cand.skip_reason(inp, mode)
    if reason:
        pytest.skip(f"{cand.name}: {reason}")

    info = {"suite": "core", "candidate": cand.name, "kind": cand.kind, "mode": mode,
            "dtype": str(dtype).replace("torch.", ""), "batch": batch.name, "B": batch.batch,
            "L": batch.padded_len, "tokens": batch.tokens, "heads": profile.heads, "head_dim": profile.head_dim,
            "notes": cand.notes}
    try:
        if cand.exact:
            hkey = (batch, dtype, mode != "fwd")
            if hkey not in _HF_ERR and cand.name != "hf-eager":
                from benchmarks.core import candidates

                hf = next(c for c in candidates() if c.name == "hf-eager")
                try:
                    _HF_ERR[hkey] = None if hf.skip_reason(inp, mode) else _parity(hf, inp, mode, None)[0]
                except _oom_types():
                    _HF_ERR[hkey] = None
                _free(profile)
            err, what = _parity(cand, inp, mode, None)
            if cand.name == "hf-eager":
                _HF_ERR[hkey] = err
            hf = cand.name == "hf-eager"
            info.update(harness.parity_info(err, dtype, None if hf else _HF_ERR.get(hkey), what, baseline=hf))
        else:
            info.update({"parity": "n/a", "parity_of": "computes a different function (no relative terms)"})
        _free(profile)

        grad = mode != "fwd"
        prep = cand.prepare(inp, grad)
        if mode == "fwd":
            def fn():
                with torch.no_grad():
                    return prep.fn()
            setup = None
        elif mode == "bwd":
            out = prep.fn()
            dout = prep.dout

            def fn():
                out.backward(dout, retain_graph=True)
            setup = prep.zero_grads
        else:
            dout = prep.dout

            def fn():
                prep.fn().backward(dout)
            setup = prep.zero_grads
        flops = attention_flops(mode, batch.lengths, profile.heads, profile.head_dim, inp.span)
        harness.run_benchmark(benchmark, profile, fn, setup, flops=flops, extra=info)
    except _oom_types() as e:
        _free(profile)
        pytest.skip(f"{cand.name}: out of memory at {batch.name} {mode}: {str(e).splitlines()[0][:200]}")
    except Exception as e:
        # a deberta_fast backend that accepted the call must run it; baselines/peers that
        # fail on this torch/device are unavailable here, with the error as the reason
        import deberta_fast

        if cand.kind == "deberta_fast" and not isinstance(e, deberta_fast.BackendUnavailableError):
            raise
        _free(profile)
        pytest.skip(f"{cand.name}: failed here: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    finally:
        prep = out = None  # noqa: F841
    if info.get("parity") == "WRONG":
        harness.record_wrong(request.node.nodeid, info)
        if harness.strict():
            pytest.fail(f"{cand.name} is WRONG: max_err {info['max_err']:.3g} > tol {info['tol']:.3g}")


def _free(profile):
    gc.collect()
    if profile.device == "cuda":
        torch.cuda.empty_cache()
