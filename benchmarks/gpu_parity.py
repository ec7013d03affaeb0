"""Parity at real sizes: every kernel backend against the fp64 reference, output and all five gradients.

    python -m benchmarks.gpu_parity --out DIR            # GPU: L = 512, 2048, 8192; H=12, D=64 (+ D=128 at 2048)
    python -m benchmarks.gpu_parity --out DIR --rehearse # CPU: the same code at L = 64, 96 (Triton interpreter)

DeBERTa-v3 positions (buckets 256, max_relative_positions 512), c2p + p2c, ``[B, L]`` padding mask (the last
sequence's last L//3 keys padded); fresh N(0,1) inputs, a random upstream gradient.  The check and its rule are
the main job's kernel check (``deberta_fast.__main__``): error = max|x - ref| / max(1, max|ref|); fp32 within
2e-5, fp16/bf16 within 4x the torch reference's own error in the same dtype; NaN/inf fail.  Writes
``parity.json`` and ``parity.md`` to ``--out``; exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

GPU_CASES = [(2, 12, 512, 64), (1, 12, 2048, 64), (1, 12, 8192, 64), (1, 12, 2048, 128)]
REHEARSAL_CASES = [(2, 2, 64, 32), (1, 2, 96, 64)]


def plan(gpu: bool, backends: list[str]) -> list:
    """(backend, dtype) pairs: triton in fp32 and both half types, cuda in both half types (no fp32 kernel)."""
    out = []
    if "triton" in backends:
        out += [("triton", torch.float32)] + ([("triton", torch.bfloat16), ("triton", torch.float16)] if gpu else [])
    if "cuda" in backends and gpu:
        out += [("cuda", torch.bfloat16), ("cuda", torch.float16)]
    return out


def table(rows: list) -> str:
    names = ("out", "dq", "dk", "dv", "dpos_key", "dpos_query")
    lines = ["| backend | dtype | B | H | L | D | status | " + " | ".join(names) + " | worst / tol | fwd+bwd s |",
             "|" + "---|" * (10 + len(names) - 2)]
    for r in rows:
        errs, tols = r.get("errors") or {}, r.get("tolerances") or {}
        cells = [f"{errs[n]:.1e}" if n in errs else "" for n in names]
        worst = max(errs, key=lambda n: errs[n] / tols[n]) if errs else None
        ratio = f"{errs[worst] / tols[worst]:.2f} ({worst})" if worst else r.get("reason", "")[:80]
        secs = f"{r['fwd_s'] + r['bwd_s']:.2f}" if "fwd_s" in r else ""
        lines.append(f"| {r['backend']} | {r['dtype']} | {r['B']} | {r['H']} | {r['L']} | {r['D']} | {r['status']} | "
                     + " | ".join(cells) + f" | {ratio} | {secs} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_parity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for parity.json and parity.md")
    ap.add_argument("--backends", default="triton,cuda")
    ap.add_argument("--rehearse", action="store_true", help="CPU sizes under the Triton interpreter")
    args = ap.parse_args(argv)
    from benchmarks.harness import gpu_or_interpreter
    gpu = gpu_or_interpreter(args.rehearse, "gpu_parity")
    if gpu is None:
        return 2
    from deberta_fast.__main__ import _run_kernel_check

    cases = GPU_CASES if gpu else REHEARSAL_CASES
    pairs = plan(gpu, args.backends.split(","))
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for B, H, L, D in cases:  # one case at a time (the fp64 reference at L=8192 holds ~40 GB), saved after each
        try:
            rows += _run_kernel_check(pairs, [(B, H, L, D)], torch.device("cuda" if gpu else "cpu"))
        except Exception as e:  # noqa: BLE001 - e.g. the fp64 reference out of memory: recorded, next case
            rows.append(dict(backend="(reference)", dtype="float64", B=B, H=H, L=L, D=D, status="FAIL",
                             reason=f"{type(e).__name__}: {str(e)[:300]}"))
        if gpu:
            torch.cuda.empty_cache()
        with open(os.path.join(args.out, "parity.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if gpu else "cpu (Triton interpreter)",
                       "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows,
                       "seconds": time.perf_counter() - t0}, f, indent=1)
        with open(os.path.join(args.out, "parity.md"), "w") as f:
            f.write(table(rows))
    failed = [r for r in rows if r.get("status") == "FAIL"]
    print(f"gpu_parity: {len(rows) - len(failed)} of {len(rows)} checks pass, {len(failed)} fail "
          f"({time.perf_counter() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
