"""Where a short-sequence training step spends its time: HF eager against the patched model, under the profiler.

    python -m benchmarks.profile_model --out DIR                 # GPU: v3-base, MNLI-like batch (32 pairs, <= 128)
    python -m benchmarks.profile_model --out DIR --rehearse      # CPU: a 2-layer model, the torch backend

Why: on MNLI-like batches a v3-base training step measured HF eager 52.0 ms, ``cuda`` 54.5 ms, ``triton`` 66.2 ms
(measured on an H200, 2026-12-04; NOTES, "First GPU session"): the attention kernels are microseconds there, so the
step is bound by something else (host work and launches per layer, packing, the position terms' extra GEMMs).
Per candidate (a training step as ``bench_model``'s: bf16 autocast over float32 weights, AdamW), after warm-up
steps, ``torch.profiler`` over a few steps: the step's wall time, the device's busy time (sum of its kernels; the
rest of the wall time the device waited for the host), kernel launches per step, and the top operators by
device time and by host time.  Writes ``profile_model.json`` and ``profile_model.md``.
"""
from __future__ import annotations

import copy
import sys
import time

import torch

STEPS = 3


def _candidates(rehearse: bool) -> list[tuple[str, str | None]]:
    """``(name, deberta_fast backend or None for HF eager)``."""
    return [("hf-eager", None), ("deberta_fast-torch", "torch")] if rehearse else \
        [("hf-eager", None), ("deberta_fast-cuda", "cuda"), ("deberta_fast-triton", "triton")]


def _step_fn(model, ids, mask, labels, device, dtype):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        with torch.autocast(device, dtype=dtype):
            out = model(input_ids=ids, attention_mask=mask)
        loss = torch.nn.functional.cross_entropy(out.logits.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _device_time_us(e) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(e, attr):
            return float(getattr(e, attr))
    return 0.0


def profile_one(step, device: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(STEPS):
        step()
    sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / STEPS
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(STEPS):
            step()
        sync()
    ev = prof.key_averages()
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                    "cuLaunchKernelEx"))
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) is not None
               and str(e.device_type).endswith("CUDA")]
    busy_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / STEPS if kernels else None
    by_dev = sorted(ev, key=_device_time_us, reverse=True)[:15]
    by_cpu = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {"wall_ms": round(wall_ms, 3), "device_busy_ms": None if busy_ms is None else round(busy_ms, 3),
            "launches_per_step": launches / STEPS,
            "top_device": [(e.key, e.count // STEPS, round(_device_time_us(e) / 1e3 / STEPS, 3)) for e in by_dev
                           if _device_time_us(e) > 0],
            "top_host": [(e.key, e.count // STEPS, round(e.self_cpu_time_total / 1e3 / STEPS, 3)) for e in by_cpu]}


def run(rehearse: bool, progress=print) -> dict:
    import deberta_fast
    from benchmarks.envinfo import environment
    from benchmarks.model import build_hf_model, make_batch_inputs
    from benchmarks.profiles import V3_BASE, V3_BASE_2L, mnli_batch

    device = "cpu" if rehearse else "cuda"
    dtype = torch.bfloat16
    shape = V3_BASE_2L if rehearse else V3_BASE
    batch = mnli_batch(4, 32, seed=99) if rehearse else mnli_batch(32, 128, seed=99)
    base = build_hf_model(shape, device, torch.float32)
    ids, mask, labels = make_batch_inputs(batch, shape.vocab, device)
    rows = []
    for name, backend in _candidates(rehearse):
        model = copy.deepcopy(base)
        if backend is not None:
            deberta_fast.patch(model, backend=backend)
        row = {"candidate": name}
        try:
            row.update(profile_one(_step_fn(model, ids, mask, labels, device, dtype), device))
        except Exception as e:  # noqa: BLE001 - recorded; the other candidates still run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        progress(f"profile_model: {name}: {row.get('wall_ms', row.get('error'))} ms")
        rows.append(row)
        del model
    return {"env": environment(), "rehearse": rehearse, "model": shape.name, "batch": batch.name,
            "B": batch.batch, "L": batch.padded_len, "tokens": batch.tokens, "steps": STEPS, "rows": rows}


def table(res: dict) -> str:
    title = "CPU rehearsal: not a measurement" if res["rehearse"] else "GPU"
    lines = [f"# Training step under the profiler ({title}; {res['model']}, {res['batch']}: B={res['B']}, "
             f"L={res['L']}, {res['tokens']} tokens; bf16 autocast, AdamW; mean of {res['steps']} steps)", "",
             "| candidate | step ms | device busy ms | device idle | launches / step |", "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['candidate']} | {r['error'][:80]} | | | |")
            continue
        busy = r["device_busy_ms"]
        idle = f"{1 - busy / r['wall_ms']:.0%}" if busy is not None and r["wall_ms"] else ""
        lines.append(f"| {r['candidate']} | {r['wall_ms']:.2f} | {'' if busy is None else f'{busy:.2f}'} | {idle} | "
                     f"{r['launches_per_step']:.0f} |")
    for key, what in (("top_device", "device time"), ("top_host", "host (self CPU) time")):
        for r in res["rows"]:
            if r.get(key):
                lines += ["", f"## {r['candidate']}: top operators by {what} (ms per step)", "",
                          "| operator | calls / step | ms |", "|---|---:|---:|"]
                lines += [f"| `{k[:70]}` | {n} | {ms} |" for k, n, ms in r[key]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from benchmarks.harness import report_cli

    res = report_cli(argv, "profile_model", __doc__, run, table, "profile_model",
                     "CPU: a 2-layer model, the torch backend", interpreter=False)
    return 1 if res is None or any("error" in r for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
