"""Every shipped Triton kernel variant lowers to PTX (and cubin) for sm_80 and sm_90 — no GPU needed.

Runs in a subprocess without ``TRITON_INTERPRET`` so the kernels are real ``JITFunction``s, and
compiles with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``.
Coverage: (a) the full constexpr matrix (c2p x p2c x mask kind x dropout) of all three kernels
on sm_80 (D=16, short-sequence tiles); (b) every head-dim bucket 16..256 with its long-sequence
launch config on sm_90; (c) bf16 and float32 (IEEE and TF32) at D=32 on sm_80, bf16 also on sm_90;
(d) the packed (``VARLEN``) variants: four c2p / p2c / dropout combinations on sm_80, and fp16 / bf16
long-sequence configs at D=64 / 128 on sm_90, fp32 TF32 on sm_80.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import itertools, json, multiprocessing, os, sys
import triton
from triton.backends.compiler import GPUTarget
import deberta_fast
from deberta_fast._kernels import triton_attention_bwd as bwd, triton_attention_fwd as fwd
from deberta_fast._kernels.triton_attention_launch import launch_config, interpreting

KERNELS = {"fwd": fwd.disentangled_fwd_kernel, "dkdv": bwd.disentangled_bwd_dkdv_kernel,
           "dq": bwd.disentangled_bwd_dq_kernel}
SCALARS = {"H": "i32", "Lq": "i32", "Lk": "i32", "MAXQ": "i32", "MAXK": "i32", "D": "i32", "NSLOT": "i32",
           "band_lo": "i32", "band_hi": "i32", "seed": "i32", "scale": "fp32", "p_drop": "fp32"}
POINTERS = {"TABLE": "*i32", "CU_Q": "*i32", "CU_K": "*i32", "KMASK": "*u8", "FMASK": "*u8", "UNI": "*u8"}
INPUT_DTYPE = ("Q", "K", "V", "OUT", "DO")


def signature(kernel, dtype, constexprs):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.startswith("s_"):
            sig[name] = "i32"
        elif name in SCALARS:
            sig[name] = SCALARS[name]
        elif name in POINTERS:
            sig[name] = POINTERS[name]
        else:
            sig[name] = "*" + (dtype if name in INPUT_DTYPE else "fp32")
    return sig


def compile_one(job):
    kname, cc, dtype, prec, head_dim, seq_len, flags = job
    kernel = KERNELS[kname]
    cfg = launch_config("fwd" if kname == "fwd" else "bwd", seq_len, seq_len, head_dim)
    cx = dict(flags, UPCAST=False, PREC=prec, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
              BLOCK_D=max(16, triton.next_power_of_2(head_dim)))
    try:
        c = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature(kernel, dtype, cx),
                                                     constexprs=cx),
                           target=GPUTarget("cuda", cc, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        ptx = c.asm["ptx"]
        ok = (".target sm_%d" % cc) in ptx and ".entry " + kernel.__name__ in ptx and "cubin" in c.asm
        return [job, ok, "" if ok else "PTX lacks target/entry"]
    except Exception as e:
        return [job, False, "%s: %s" % (type(e).__name__, str(e)[-2000:])]


def flags(c2p, p2c, mask, drop, varlen=False):
    return dict(HAS_C2P=c2p, HAS_P2C=p2c, MASK_KIND=mask, DROPOUT=drop, VARLEN=varlen)


ALL_ON = flags(True, True, 2, True)
jobs = [(k, 80, "fp16", "ieee", 16, 64, flags(c, p, m, d))
        for k in KERNELS for c, p, m, d in itertools.product((False, True), (False, True), (0, 1, 2), (False, True))]
jobs += [(k, 90, "fp16", "ieee", D, 4096, ALL_ON) for k in KERNELS for D in (16, 32, 64, 128, 256)]
jobs += [(k, 80, dt, prec, 32, 64, ALL_ON) for k in KERNELS
         for dt, prec in (("bf16", "ieee"), ("fp32", "ieee"), ("fp32", "tf32"))]
jobs += [(k, 90, "bf16", "ieee", 32, 4096, flags(True, True, 1, False)) for k in KERNELS]
# packed sequences (no masks)
jobs += [(k, 80, "fp16", "ieee", 16, 64, flags(c, p, 0, d, True))
         for k in KERNELS for c, p, d in ((False, False, False), (True, False, True), (False, True, False),
                                          (True, True, True))]
VARLEN_ON = flags(True, True, 0, True, True)
jobs += [(k, 90, dt, "ieee", D, 4096, VARLEN_ON) for k in KERNELS for dt, D in (("fp16", 64), ("bf16", 128))]
jobs += [(k, 80, "fp32", "tf32", 32, 64, VARLEN_ON) for k in KERNELS]
assert not interpreting() and hasattr(KERNELS["fwd"], "arg_names")
with multiprocessing.Pool(max(1, min(8, os.cpu_count() or 1))) as pool:
    results = pool.map(compile_one, jobs, chunksize=1)
print("RESULTS" + json.dumps(results))
'''


def test_all_variants_lower_to_ptx_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    assert len(results) == 72 + 15 + 9 + 3 + 12 + 6 + 3
    failed = [(job, why) for job, ok, why in results if not ok]
    assert not failed, f"{len(failed)} variants failed to compile, first: {failed[0]}"
    variants = {(job[0], json.dumps(job[6], sort_keys=True)) for job, _, _ in results}
    assert len(variants) >= 3 * (24 + 4)  # the padded constexpr matrix and four packed variants per kernel
