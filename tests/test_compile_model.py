"""Patched HF models under ``torch.compile(fullgraph=True, dynamic=True)`` and ``torch.export``: one graph for
every batch size and length, no recompile, outputs and gradients equal to HF's eager model on real tokens."""
import copy
import os

import pytest
import torch
import torch._dynamo.testing

import deberta_fast as df
from deberta_fast.backends import BACKENDS

from hf_configs import transformers, v1_config, v2_config

BACKEND_PARAMS = ["torch"]
if (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1") and BACKENDS["triton"].unavailable() is None:
    BACKEND_PARAMS.append("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
#: (batch, length): odd lengths past 2 * position_buckets (8), batch sizes that change (not to 1: torch
#: specializes size-1 dimensions, for HF's own model too)
SHAPES = [(2, 11), (3, 17), (2, 23)]


def _models(family, backend, pack):
    cfg = v2_config(position_buckets=4, max_relative_positions=8) if family == "v2" else v1_config()
    cls = transformers.DebertaV2Model if family == "v2" else transformers.DebertaModel
    torch.manual_seed(0)
    ref = cls(cfg).to(DEV)
    model = df.patch(copy.deepcopy(ref), backend=backend, pack=pack)
    return ref, model


def _batch(B, L, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[-1, L - 1 - L // 3:] = 0  # the last row right-padded
    return ids.to(DEV), mask.to(DEV)


def _hidden(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.slow  # ~30 s each on 2 CPU cores (aot_eager tracing of forward and backward): .ci/run's extended stage
@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("family", ["v2", "v1"])
def test_fullgraph_dynamic_compile_one_graph_forward_and_backward(family, backend, pack):
    if family == "v1" and backend == "triton":
        pytest.skip("v1 through triton: the same attention entry point as v2 (covered by the v2 case)")
    ref, model = _models(family, backend, pack)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    tol = 1e-5 if backend == "torch" else 2e-5
    for i, (B, L) in enumerate(SHAPES):
        ids, mask = _batch(B, L, seed=i)
        real = mask.bool()
        out = _hidden(compiled, ids, mask)
        want = _hidden(ref, ids, mask)
        torch.testing.assert_close(out[real], want[real], rtol=tol, atol=tol)
        out[real].square().sum().backward()
        want[real].square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=20 * tol, atol=20 * tol, msg=lambda m: f"{name}: {m}")
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        if i == 0:
            first = counter.frame_count  # (dynamo may restart its first analysis once: still one graph)
    # fullgraph=True: a graph break raises; a new frame after the first shape is a recompile
    assert counter.frame_count == first, f"recompiled for new shapes: {counter.frame_count - first} more graphs"


@pytest.mark.parametrize("pack", [False, True])
def test_export_dynamic_batch_and_length_is_correct_at_other_lengths(pack):
    ref, model = _models("v2", "torch", pack)
    ref.eval(), model.eval()
    ids, mask = _batch(2, 13, seed=0)
    batch, length = torch.export.Dim("batch", min=1, max=32), torch.export.Dim("length", min=2, max=64)
    ep = torch.export.export(model, (), {"input_ids": ids, "attention_mask": mask},
                             dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}})
    assert str(ep.graph).count("deberta_fast.torch_attention") == model.config.num_hidden_layers  # one op per layer
    run = ep.module()
    for i, (B, L) in enumerate([(2, 13), (3, 29), (1, 7), (4, 64)]):
        ids, mask = _batch(B, L, seed=10 + i)
        with torch.no_grad():
            got, want = _hidden(run, ids, mask), _hidden(ref, ids, mask)
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_export_of_the_triton_backend_keeps_its_custom_ops():
    if "triton" not in BACKEND_PARAMS:
        pytest.skip("triton cannot run here")
    ref, model = _models("v2", "triton", False)
    ref.eval(), model.eval()
    ids, mask = _batch(2, 11, seed=0)
    length = torch.export.Dim("length", min=2, max=64)
    ep = torch.export.export(model, (), {"input_ids": ids, "attention_mask": mask},
                             dynamic_shapes={"input_ids": {1: length}, "attention_mask": {1: length}})
    assert "deberta_fast.triton_fwd" in str(ep.graph)
    ids, mask = _batch(2, 19, seed=1)
    with torch.no_grad():
        got, want = _hidden(ep.module(), ids, mask), _hidden(ref, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=2e-5, atol=2e-5)


def test_onnx_dynamo_export_runs_in_onnxruntime_at_other_shapes(tmp_path):
    """The dynamo ONNX exporter with dynamic batch and length (backend torch: plain aten ops), run by ONNX
    Runtime at other shapes (.ci/run's integrations stage installs onnxscript and onnxruntime)."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    ref, model = _models("v2", "torch", True)
    ref, model = ref.cpu().eval(), model.cpu().eval()
    ids, mask = (t.cpu() for t in _batch(2, 13, seed=0))
    batch, length = torch.export.Dim("batch", min=1, max=32), torch.export.Dim("length", min=2, max=64)
    prog = torch.onnx.export(model, (), kwargs={"input_ids": ids, "attention_mask": mask}, dynamo=True,
                             dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
                             input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"])
    prog.save(str(tmp_path / "deberta.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "deberta.onnx"))
    for i, (B, L) in enumerate([(3, 29), (1, 7), (2, 64)]):
        ids, mask = (t.cpu() for t in _batch(B, L, seed=20 + i))
        got = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
        with torch.no_grad():
            want = _hidden(ref, ids, mask)
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_jit_trace_is_refused_with_what_to_do():
    """torch.jit.trace (and the TorchScript ONNX exporter) would freeze one length's position tables."""
    _, model = _models("v2", "torch", False)
    ids, mask = _batch(2, 11, seed=0)
    with pytest.raises(RuntimeError, match="torch.export.export"):
        torch.jit.trace(model.eval(), (ids, mask), strict=False)
