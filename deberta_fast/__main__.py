"""``python -m deberta_fast``: what serves this machine, whether it is exact, and how fast it is
next to HuggingFace's own DeBERTa attention module.

  [1] backends: which ones can run here; each one's reason, once, when it cannot.
  [2] kernel check: the Triton and CUDA kernels themselves, forward and backward, against the fp64
      reference at a small size.  Without a GPU the Triton kernels run under the Triton interpreter
      (``TRITON_INTERPRET=1``, in a subprocess: the variable must be set before triton is imported)
      and the CUDA kernels in their CPU simulator (``DEBERTA_FAST_CUDA_SIM=1``, ``csrc/sim/``, when
      the CUDA headers and a host compiler are there); correctness checks, never timings.
  [3] HF comparison: transformers' ``DisentangledSelfAttention`` (DeBERTa-v2/v3) with seeded random
      weights, called as HF's encoder calls it, against deberta_fast's module sharing its parameters
      (``DisentangledAttention.from_hf``), called as a patched encoder calls it.  Parity against HF's
      module in float64; interleaved, adaptive timing (median, IQR, min-max).  CPU: the torch backend
      (the reference path, not a kernel).  GPU: the headline table, backends triton and cuda,
      bf16 and fp16, L = 512, 2048, 8192 (16,384 tokens per batch).

Exit status 1 when any parity check fails.  Options: ``--quick`` (smaller, for a smoke run),
``--json PATH`` (everything measured), ``--no-kernel-check``, ``--budget SECONDS`` (timed seconds
per candidate and case).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from . import __version__, disentangled_attention, disentangled_attention_reference, last_backend
from ._env import cpu_name as _cpu_name, cpu_torch_hint, cuda_device_problem, explain_import_error, triton_problem
from .backends import BACKENDS
from .dispatch import BackendUnavailableError

# DeBERTa-v3 relative attention (HF resolves max_relative_positions=-1 to max_position_embeddings=512)
BUCKETS, MAX_REL, SPAN = 256, 512, 256
#: parity of the HF comparison: error = max|x - ref| / max(1, max|ref|); pass if <= max(floor, 4 x HF's error)
#: (the rule of benchmarks/harness.py)
TOL_FLOOR = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
HF_FACTOR = 4.0
#: kernel check: fp32 within 2e-5 (relative as above); fp16/bf16 within 4x the torch reference's error in
#: the same dtype (the rule of tests/triton_cases.py)
KERNEL_TOL_FP32 = 2e-5
KERNEL_LOWP_FACTOR = 4.0
#: interpreter time model (fwd + bwd, 32x32 tiles), from the CPU time of the check on a 2-core AMD EPYC
#: (2026-12-01; the interpreter runs on one core): imports and first launches, then per head and tile pair
INTERP_START_S = 7.0
INTERP_TILE_S = 0.75
#: std of the q/k/v projection weights of the HF module in [3] (hidden states ~ N(0,1), hidden 768): scores
#: q.k/sqrt(3D) of std ~3, i.e. peaked attention rows
PROJ_STD = 0.08
RATIO_TEXT = "x HF eager = HF eager median / this median; > 1 means faster than HF eager"
GRAD_NAMES = ("q", "k", "v", "pos_key", "pos_query")


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double().to(x.device)
    err = (x - ref).abs().max().item()
    if not math.isfinite(err):
        return float("inf")
    return err / max(1.0, ref.abs().max().item())


def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    v = {"python": platform.python_version(), "torch": torch.__version__, "deberta_fast": __version__}
    for name in ("triton", "transformers", "numpy"):
        try:
            v[name] = version(name)
        except PackageNotFoundError:
            v[name] = "not installed"
    return v


def _say(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- timing

def _quantile(xs, q):
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats(ts) -> dict:
    return {"median": _quantile(ts, 0.5), "q1": _quantile(ts, 0.25), "q3": _quantile(ts, 0.75),
            "min": min(ts), "max": max(ts), "rounds": len(ts)}


def _time_interleaved(fns: dict, sync, min_rounds: int, budget_s: float, max_rounds: int) -> dict:
    """Seconds per call of each function, timed round by round in alternating order (load changes hit
    every candidate alike), until every one has ``min_rounds`` and ``budget_s`` per candidate have passed."""
    times = {n: [] for n in fns}
    names = list(fns)
    start = time.perf_counter()
    for r in range(max_rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            sync()
            t0 = time.perf_counter()
            fns[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
        if r + 1 >= min_rounds and time.perf_counter() - start >= budget_s * len(names):
            break
    return times


def _ms(s) -> str:
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


# ----------------------------------------------------------------------------- [1] backends

def _backend_status(gpu: bool) -> dict:
    """name -> (state, text): state "ok" | "interpreter" | "unavailable".  On a machine without a CUDA
    device that cause is printed once, above the list, and not repeated per backend."""
    out = {}
    for name, b in BACKENDS.items():
        if name == "torch":
            out[name] = ("ok", "available: the pure-PyTorch reference path (exact, O(L^2) memory; serves CPUs)")
            continue
        why = b.unavailable()
        if name == "triton":
            if why is not None:
                out[name] = ("unavailable", triton_problem() or why)  # the real cause (e.g. numpy, interpreter)
            elif not gpu:
                out[name] = ("interpreter", "importable; without a CUDA device its kernels run only under the "
                                            "Triton interpreter (TRITON_INTERPRET=1): checked in [2], never timed")
            else:
                out[name] = ("ok", "available")
            continue
        if why is None:
            out[name] = ("ok", "available")
        elif not gpu:
            # the extension's build hint does not help a machine without a GPU: name the real cause
            out[name] = ("unavailable", "needs a CUDA device (see above)"
                         + (f"; on a GPU machine: {_short_cuda_hint()}" if "not built" in why else ""))
        else:
            out[name] = ("unavailable", why)
    return out


def _short_cuda_hint() -> str:
    return ("build the CUDA extension: `pip install --no-build-isolation .` with a CUDA torch and nvcc, "
            "or DEBERTA_FAST_JIT=1")


# ----------------------------------------------------------------------------- [2] kernel check

def _kernel_cases(gpu: bool, quick: bool) -> list:
    """(B, H, L, D) cases; the last batch row is right-padded (its last L//3 keys masked)."""
    if gpu:
        return [(1, 2, 96, 32), (2, 4, 512, 64)] if not quick else [(1, 2, 96, 32)]
    return [(1, 2, 64, 32)] if quick else [(1, 2, 64, 32), (1, 2, 96, 32)]


def _kernel_plan(gpu: bool, status: dict) -> list:
    """(backend, dtype) pairs to check."""
    plan = []
    if status.get("triton", ("",))[0] in ("ok", "interpreter"):
        plan += [("triton", torch.float32)] + ([("triton", torch.bfloat16)] if gpu else [])
    if gpu and status.get("cuda", ("",))[0] == "ok":
        plan += [("cuda", torch.bfloat16), ("cuda", torch.float16)]
    return plan


def _interp_estimate(cases) -> float:
    t = INTERP_START_S
    for B, H, L, D in cases:
        n = math.ceil(L / 32)
        t += INTERP_TILE_S * B * H * n * n
    return t


def _kernel_inputs(B, H, L, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ts = [mk(B, H, L, D), mk(B, H, L, D), mk(B, H, L, D), mk(H, 2 * SPAN, D), mk(H, 2 * SPAN, D)]
    dout = mk(B, H, L, D)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[-1, L - L // 3:] = 0
    return [t.to(device) for t in ts], dout.to(device), mask.to(device)


def _fwd_bwd(backend, ts, dout, mask, dtype, reference=False):
    xs = [t.detach().to(dtype).requires_grad_(True) for t in ts]
    kw = dict(position_buckets=BUCKETS, max_relative_positions=MAX_REL, attention_mask=mask)
    t0 = time.perf_counter()
    if reference:
        out = disentangled_attention_reference(*xs, **kw)
    else:
        out = disentangled_attention(*xs, backend=backend, **kw)
    if out.is_cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    out.backward(dout.to(dtype))
    if out.is_cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    return [out] + [x.grad for x in xs], t1 - t0, t2 - t1


def _run_kernel_check(plan, cases, device) -> list:
    """Forward + backward of each (backend, dtype) on each case against the fp64 reference; prints a
    line per check and returns the rows."""
    rows = []
    for B, H, L, D in cases:
        ts, dout, mask = _kernel_inputs(B, H, L, D, device)
        ref, _, _ = _fwd_bwd(None, ts, dout, mask, torch.float64, reference=True)
        for backend, dtype in plan:
            row = dict(backend=backend, dtype=_dt(dtype), B=B, H=H, L=L, D=D)
            try:
                got, t_fwd, t_bwd = _fwd_bwd(backend, ts, dout, mask, dtype)
            except BackendUnavailableError as e:
                row.update(status="refused", reason=str(e))
                _say(f"  {backend:6s} {_dt(dtype):8s} B={B} H={H} L={L} D={D}: refused: {e}")
                rows.append(row)
                continue
            except Exception as e:  # noqa: BLE001 - a kernel that accepted the call must run it: a failure
                row.update(status="FAIL", reason=f"{type(e).__name__}: {e}")
                _say(f"  {backend:6s} {_dt(dtype):8s} B={B} H={H} L={L} D={D}: FAIL: raised {type(e).__name__}: "
                     f"{str(e)[:500]}")
                rows.append(row)
                continue
            served = last_backend()
            names = ("out",) + tuple("d" + n for n in GRAD_NAMES)
            errs = {n: _rel_err(g, r) for n, g, r in zip(names, got, ref)}
            if dtype == torch.float32:
                tols = {n: KERNEL_TOL_FP32 for n in names}
                rule = ""
            else:
                lowp, _, _ = _fwd_bwd(None, ts, dout, mask, dtype, reference=True)
                tols = {n: max(KERNEL_LOWP_FACTOR * _rel_err(g, r), 1e-6) for n, g, r in zip(names, lowp, ref)}
                rule = f" ({KERNEL_LOWP_FACTOR:g} x the torch reference's own {_dt(dtype)} error)"
            ok = all(math.isfinite(errs[n]) and errs[n] <= tols[n] for n in names) and served == backend
            worst = max(names, key=lambda n: errs[n] / tols[n])
            row.update(status="pass" if ok else "FAIL", served_by=served, errors=errs, tolerances=tols,
                       fwd_s=t_fwd, bwd_s=t_bwd)
            rows.append(row)
            _say(f"  {backend:6s} {_dt(dtype):8s} B={B} H={H} L={L} D={D}: "
                 + ", ".join(f"{n} {errs[n]:.1e}" for n in names)
                 + f"; worst {worst} {errs[worst]:.1e} vs tol {tols[worst]:.1e}{rule}: "
                 + ("pass" if ok else "FAIL" + ("" if served == backend else f" (served by {served})"))
                 + f"  [fwd {t_fwd:.2f} s, bwd {t_bwd:.2f} s]")
    return rows


def _kernel_check_child(spec: str, out_path: str) -> int:
    """Runs inside ``python -m deberta_fast --_kernel-check-child`` on CPU: the triton backend under
    ``TRITON_INTERPRET=1``, the cuda backend under ``DEBERTA_FAST_CUDA_SIM=1`` (spec["backend"])."""
    spec = json.loads(spec)
    backend = spec.get("backend", "triton")
    why = BACKENDS[backend].unavailable()
    if why is not None:
        why = (triton_problem() or why) if backend == "triton" else why
        with open(out_path, "w") as f:
            json.dump({"not_run": why}, f)
        return 0
    plan = [(backend, getattr(torch, d)) for d in spec["dtypes"]]
    rows = _run_kernel_check(plan, [tuple(c) for c in spec["cases"]], torch.device("cpu"))
    with open(out_path, "w") as f:
        json.dump({"rows": rows}, f)
    return 0


def kernel_check(gpu: bool, quick: bool, status: dict) -> dict:
    """[2]: returns {"rows": [...], "not_run": reason or None, "seconds": s}."""
    cases = _kernel_cases(gpu, quick)
    plan = _kernel_plan(gpu, status)
    t0 = time.perf_counter()
    if gpu and not plan:
        reason = "; ".join(f"{n}: {status[n][1]}" for n in ("triton", "cuda") if n in status
                           and status[n][0] == "unavailable") or "no kernel backend is available"
        _say("  NOT RUN: no kernel backend can run here (reasons in [1])")
        return {"rows": [], "not_run": reason, "seconds": 0.0}
    desc = ", ".join(f"B={B} H={H} L={L} D={D}" for B, H, L, D in cases)
    _say(f"  cases: {desc}; DeBERTa-v3 positions (buckets {BUCKETS}, max_relative_positions {MAX_REL}, "
         f"span {SPAN}), c2p + p2c, [B, L] padding mask (last sequence: last L//3 keys padded)")
    _say(f"  checked: output and gradients of q, k, v, pos_key, pos_query vs the fp64 reference; "
         f"error = max|x - ref| / max(1, max|ref|); tolerance: fp32 {KERNEL_TOL_FP32:g}, fp16/bf16 "
         f"{KERNEL_LOWP_FACTOR:g} x the torch reference's error in that dtype")
    if gpu:
        rows = _run_kernel_check(plan, cases, torch.device("cuda"))
        return {"rows": rows, "not_run": None, "seconds": time.perf_counter() - t0}
    rows, not_run = [], None
    if plan:  # the Triton kernels under the interpreter
        t_est = _interp_estimate(cases)
        load, cores = _loadavg(), os.cpu_count() or 1
        busy = ""
        if load is not None and load > 0.5 * cores:
            busy = f"; load average now {load} on {cores} cores, expect up to ~{t_est * (load / cores + 1):.0f} s"
        _say(f"  backend triton, float32, under the Triton interpreter in a subprocess (TRITON_INTERPRET=1): "
             f"estimate ~{t_est:.0f} s on an idle 2-core CPU{busy} ...")
        res = _child_check("triton", [_dt(d) for _, d in plan], cases, {"TRITON_INTERPRET": "1"}, "the interpreter")
        _say(f"  took {time.perf_counter() - t0:.1f} s (estimate was ~{t_est:.0f} s)")
        rows, not_run = res.get("rows", []), res.get("not_run")
    else:
        not_run = f"triton: {status['triton'][1]}" if "triton" in status else "triton is not installed"
    sim_why = _simulator_problem()
    if sim_why is None:  # the CUDA kernels in their CPU simulator
        t1 = time.perf_counter()
        _say("  backend cuda, bfloat16 and float16: the CUDA kernels (csrc/*.cu) in their CPU simulator, in a "
             "subprocess (DEBERTA_FAST_CUDA_SIM=1, csrc/sim/; built by the host compiler on first use: ~35 s on "
             "2 cores) ...")
        sim = _child_check("cuda", ["bfloat16", "float16"], cases, {"DEBERTA_FAST_CUDA_SIM": "1"}, "the simulator")
        rows += sim.get("rows", [])
        if sim.get("not_run"):
            _say(f"  cuda (simulator) NOT RUN: {sim['not_run']}")
        _say(f"  took {time.perf_counter() - t1:.1f} s")
    else:
        _say(f"  backend cuda in the CPU simulator: not run ({sim_why})")
    if not_run and rows:  # the simulator ran, the interpreter did not: said, but the check ran
        _say(f"  triton (interpreter) NOT RUN: {not_run}")
        not_run = None
    elif not_run:
        _say(f"  NOT RUN: {not_run}")
    return {"rows": rows, "not_run": not_run, "seconds": time.perf_counter() - t0}


def _simulator_problem():
    """None when the CUDA kernels' CPU simulator can be built here (CUDA headers and a host compiler), else why."""
    import shutil

    from . import _cuda_ext

    if _cuda_ext._build_config().cuda_include_dir() is None:
        return "the CUDA toolkit's headers (cuda_fp16.h) are not installed"
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        return "no host C++ compiler (c++ / g++ / $CXX)"
    return None


def _child_check(backend: str, dtypes: list, cases, env_extra: dict, what: str) -> dict:
    """Runs ``_kernel_check_child`` for one backend in a subprocess with ``env_extra``; a crash is a FAIL row."""
    fd, out_path = tempfile.mkstemp(prefix="deberta_fast_kcheck_", suffix=".json")
    os.close(fd)
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DEBERTA_FAST_CUDA_SIM")}
        env.update(env_extra)
        spec = json.dumps({"backend": backend, "cases": cases, "dtypes": dtypes})
        proc = subprocess.run([sys.executable, "-m", "deberta_fast", "--_kernel-check-child", spec, "--_out", out_path],
                              env=env)
        try:
            with open(out_path) as f:
                res = json.load(f)
        except (OSError, ValueError):  # it crashed: a failure of the check, not a missing prerequisite
            res = {"rows": [dict(backend=backend, dtype=dtypes[0], status="FAIL",
                                 reason=f"{what} subprocess exited with status {proc.returncode} "
                                        f"without a result (its error is printed above)")]}
            _say(f"  FAIL: {res['rows'][0]['reason']}")
    finally:
        try:
            os.unlink(out_path)
        except OSError:
            pass
    return res


# ----------------------------------------------------------------------------- [3] HF comparison

def _hf_config(hidden: int, heads: int):
    from transformers import DebertaV2Config

    return DebertaV2Config(
        vocab_size=128, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
        intermediate_size=hidden, max_position_embeddings=512, relative_attention=True,
        position_buckets=BUCKETS, max_relative_positions=-1, pos_att_type=["p2c", "c2p"], share_att_key=True,
        norm_rel_ebd="layer_norm", position_biased_input=False, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, layer_norm_eps=1e-7)


def _hf_oracle(encoder, config, hidden_states, mask2d, rel_embeddings, n_seq: int, n_heads: int):
    """HF's own module in float64 on the last ``n_seq`` sequences and the first ``n_heads`` heads
    (heads are independent: the projections' rows of those heads, loaded into an HF module built with
    ``num_attention_heads=n_heads``).  Returns ``[n_seq, L, n_heads*D]``."""
    import copy

    from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention

    attn = encoder.layer[0].attention.self
    D = attn.attention_head_size
    cfg = copy.deepcopy(config)
    cfg.num_attention_heads = n_heads
    cfg.attention_head_size = D
    small = DisentangledSelfAttention(cfg)
    keep = n_heads * D
    sd = {k: (v[:keep] if v.shape[0] == attn.all_head_size else v) for k, v in attn.state_dict().items()}
    small.load_state_dict(sd)
    small = small.to(device=hidden_states.device, dtype=torch.float64).eval()
    hs = hidden_states[-n_seq:].double()
    m2 = mask2d[-n_seq:]
    with torch.no_grad():
        mask4 = encoder.get_attention_mask(m2)
        rel_pos = encoder.get_rel_pos(hs)
        out, _ = small(hs, mask4, relative_pos=rel_pos, rel_embeddings=rel_embeddings.double())
    return out


def _hf_cases(gpu: bool, quick: bool):
    """(dtype, L, B) of the comparison; H=12, D=64 (DeBERTa-v3-base attention)."""
    if gpu:
        tokens = 16384
        lens = (512, 2048) if quick else (512, 2048, 8192)
        return [(dt, L, tokens // L) for dt in (torch.bfloat16, torch.float16) for L in lens]
    return [(torch.float32, 128, 2)] if quick else [(torch.float32, 128, 8), (torch.float32, 512, 2)]


def hf_comparison(gpu: bool, quick: bool, status: dict, budget_s: float, cases=None, oracle_elems=None) -> dict:
    """[3]: returns {"rows": [...], "skipped": {reason: [..]}, "not_run": reason or None}.  ``cases``: (dtype, L, B)
    list (default by device); ``oracle_elems``: largest fp64 [sequences x heads x L x L] of the HF oracle."""
    try:
        import transformers  # noqa: F401
        from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Encoder
    except ImportError as e:
        why = explain_import_error(e, "transformers", "pip install -e '.[hf]' (or pip install transformers)")
        _say(f"  NOT RUN: {why}")
        return {"rows": [], "skipped": {}, "not_run": why}
    from .module import DisentangledAttention

    device = torch.device("cuda" if gpu else "cpu")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    hidden, heads = 768, 12
    D = hidden // heads
    if gpu:
        cands = [n for n in ("triton", "cuda") if status.get(n, ("",))[0] == "ok"]
        labels = {n: f"deberta_fast {n}" for n in cands}
    else:
        cands = ["torch"]
        labels = {"torch": "deberta_fast torch (reference path)"}
    min_rounds, max_rounds = 10, (200 if gpu else 100)
    _say(f"  HF's module: transformers DebertaV2Encoder(DebertaV2Config(hidden_size={hidden}, "
         f"num_attention_heads={heads} (H={heads} heads of dim D={D}), 1 layer, v3 relative attention: position_buckets={BUCKETS}, "
         f"max_relative_positions=-1 -> {MAX_REL}, pos_att_type=p2c|c2p, share_att_key=True)), seeded random "
         f"weights (q/k/v projections N(0, {PROJ_STD:g}^2): peaked attention rows, not near-uniform ones), eval, "
         f"no_grad; its layer[0].attention.self is timed")
    _say(f"  inputs: hidden_states [B, L, {hidden}] (seeded N(0,1)); attention mask [B, L], the last sequence "
         f"right-padded to 2/3 of L; rel_embeddings = encoder.get_rel_embedding() (after its LayerNorm), the same "
         f"tensor for both")
    _say("  HF eager gets what HF's encoder passes: the [B,1,L,L] mask of encoder.get_attention_mask and the [L,L] "
         "relative positions of encoder.get_rel_pos (built once, untimed, as for all layers); deberta_fast = "
         "DisentangledAttention.from_hf(that module) (the same parameters) gets the [B, L] mask, as after "
         "deberta_fast.patch(model)")
    _say("  parity: error = max|x - ref| / max(1, max|ref|) against HF's own module run in float64 on the same "
         f"inputs (all rows, padded ones included); pass if <= max(floor, {HF_FACTOR:g} x HF eager's own error in "
         "that dtype); floors: " + ", ".join(f"{_dt(k)} {v:g}" for k, v in TOL_FLOOR.items()))
    _say(f"  timing: forward; rounds interleaved (HF, candidates, reversed every other round) after 2 warm-up "
         f"calls; at least {min_rounds} rounds and ~{budget_s:g} s per candidate (at most {max_rounds} rounds); "
         f"median, IQR (q1-q3) and min-max over rounds{'; CUDA synchronised, warm caches' if gpu else ''}")
    _say(f"  ratio: {RATIO_TEXT}; the bracket is [HF q1 / this q3, HF q3 / this q1]")
    if not gpu:
        _say(f"  torch threads: {torch.get_num_threads()} (torch.get_num_threads()) on {os.cpu_count()} CPUs")
    hdr = (f"  {'dtype':8s} {'B':>3s} {'L':>5s} {'H':>3s} {'D':>3s} {'candidate':36s} {'error':>8s} {'tol':>8s} {'parity':6s} "
           f"{'median ms':>9s} {'IQR ms':>13s} {'min-max ms':>13s} {'rounds':>6s} {'x HF eager':>10s} "
           f"{'[IQR bracket]':>13s}" + (f" {'peak MiB':>8s}" if gpu else ""))
    _say(hdr)
    rows, skipped = [], {}
    for dtype, L, B in (cases or _hf_cases(gpu, quick)):
        torch.manual_seed(0)
        config = _hf_config(hidden, heads)
        encoder = DebertaV2Encoder(config).eval()
        attn = encoder.layer[0].attention.self
        with torch.no_grad():  # peaked attention, as in trained models (torch's default init gives ~uniform rows)
            for lin in (attn.query_proj, attn.key_proj, attn.value_proj):
                lin.weight.normal_(0.0, PROJ_STD)
        encoder.to(device=device, dtype=dtype)
        g = torch.Generator().manual_seed(1)
        hs = torch.randn(B, L, hidden, generator=g).to(device=device, dtype=dtype)
        mask2d = torch.ones(B, L, dtype=torch.long, device=device)
        mask2d[-1, L - L // 3:] = 0
        with torch.no_grad():
            rel_emb = encoder.get_rel_embedding()
            mask4 = encoder.get_attention_mask(mask2d)
            rel_pos = encoder.get_rel_pos(hs)
        # oracle: HF's module in fp64 on a slice that fits (all of it on CPU sizes)
        budget = oracle_elems or ((1 << 27) if gpu else (1 << 24))
        n_seq = B if B * heads * L * L <= budget else 1
        n_heads = heads if n_seq * heads * L * L <= budget else max(1, budget // (L * L))
        try:
            ref = _hf_oracle(encoder, config, hs, mask2d, rel_emb, n_seq, n_heads)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            _say(f"  {_dt(dtype):8s} {B:3d} {L:5d} fp64 oracle out of memory: case skipped")
            continue
        cut = n_heads * D
        fns = {"hf": lambda attn=attn: attn(hs, mask4, relative_pos=rel_pos, rel_embeddings=rel_emb)[0]}
        for n in cands:
            mod = DisentangledAttention.from_hf(attn, backend=n).eval()
            fns[n] = (lambda mod=mod: mod(hs, mask2d, rel_embeddings=rel_emb)[0])
        errs, served, crashed = {}, {}, []
        with torch.no_grad():
            for n in list(fns):
                try:
                    for _ in range(2):  # warm-up: compilation, autotuning, allocator
                        out = fns[n]()
                        sync()
                    served[n] = "hf" if n == "hf" else last_backend()
                    errs[n] = _rel_err(out[-n_seq:, :, :cut], ref)
                    del out
                except BackendUnavailableError as e:
                    why = str(e).split("cannot serve this call: ", 1)[-1].split(". Use backend=", 1)[0]
                    skipped.setdefault(f"{labels[n]}: {why}", []).append(f"{_dt(dtype)} L={L}")
                    del fns[n]
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    skipped.setdefault(f"{labels.get(n, 'HF eager')}: out of memory", []).append(f"{_dt(dtype)} L={L}")
                    del fns[n]
                except Exception as e:  # noqa: BLE001
                    msg = f"{type(e).__name__}: {str(e)[:300]}"
                    if n == "hf":  # HF's module on this transformers/torch: no baseline, not our failure
                        skipped.setdefault(f"HF eager failed here: {msg}", []).append(f"{_dt(dtype)} L={L}")
                    else:  # a backend that accepted the call must run it
                        crashed.append(dict(dtype=_dt(dtype), B=B, L=L, H=heads, D=D, candidate=labels[n], backend=n,
                                            parity="FAIL", error=float("inf"), reason=msg))
                        _say(f"  {_dt(dtype):8s} {B:3d} {L:5d} {heads:3d} {D:3d} {labels[n]:36s} FAIL: raised {msg}")
                    del fns[n]
            times = _time_interleaved(fns, sync, min_rounds, budget_s, max_rounds)
            peaks = {}
            if gpu:
                for n, fn in fns.items():
                    sync()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    fn()
                    sync()
                    peaks[n] = (torch.cuda.max_memory_allocated() - base) / 2**20
        hf_err = errs.get("hf")
        tol = TOL_FLOOR[dtype] if hf_err is None else max(TOL_FLOOR[dtype], HF_FACTOR * hf_err)
        hf_st = _stats(times["hf"]) if "hf" in times else None
        for n in fns:
            st = _stats(times[n])
            is_hf = n == "hf"
            ok = math.isfinite(errs[n]) and errs[n] <= tol and (is_hf or served[n] == n)
            ratio = lo = hi = None
            if hf_st is not None and ok:
                ratio = hf_st["median"] / st["median"]
                lo, hi = hf_st["q1"] / st["q3"], hf_st["q3"] / st["q1"]
            label = "HF eager (transformers' own module)" if is_hf else labels[n]
            row = dict(dtype=_dt(dtype), B=B, L=L, H=heads, D=D, candidate=label, backend=None if is_hf else n,
                       served_by=served[n], error=errs[n], tol=tol, hf_eager_error=hf_err,
                       parity="pass" if ok else "FAIL", oracle=f"HF module fp64, {n_seq} of {B} sequences, "
                       f"{n_heads} of {heads} heads", x_hf_eager=ratio, x_hf_eager_bracket=[lo, hi],
                       peak_mib=peaks.get(n), **{k + "_s": v for k, v in st.items() if k != "rounds"},
                       rounds=st["rounds"])
            rows.append(row)
            rtxt = "1.00" if is_hf else (f"{ratio:.2f}" if ratio is not None else ("WRONG" if not ok else "-"))
            btxt = "" if is_hf or ratio is None else f"[{lo:.2f}, {hi:.2f}]"
            _say(f"  {_dt(dtype):8s} {B:3d} {L:5d} {heads:3d} {D:3d} {label:36s} {errs[n]:8.1e} {tol:8.1e} "
                 f"{'pass' if ok else 'FAIL':6s} {_ms(st['median']):>9s} "
                 f"{_ms(st['q1']) + '-' + _ms(st['q3']):>13s} {_ms(st['min']) + '-' + _ms(st['max']):>13s} "
                 f"{st['rounds']:6d} {rtxt:>10s} {btxt:>13s}"
                 + (f" {peaks[n]:8.0f}" if gpu else ""))
        rows += crashed
        del encoder, attn, fns, ref
        if gpu:
            torch.cuda.empty_cache()
    if skipped:
        _say("  not timed (each reason once):")
        for why, where in skipped.items():
            _say(f"    {why}  [{', '.join(where)}]")
    if gpu:
        _say("  (the torch backend, the O(L^2) reference path, is not timed on a GPU)")
    else:
        _say("  (on a GPU this section is the headline table: backends triton and cuda vs HF eager, bf16 and fp16, "
             "L = 512, 2048, 8192)")
    return {"rows": rows, "skipped": skipped, "not_run": None}


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deberta_fast", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run: ~1 minute on 2 CPU cores)")
    ap.add_argument("--json", help="write everything measured here as JSON")
    ap.add_argument("--no-kernel-check", action="store_true", help="skip [2] (the kernel check)")
    ap.add_argument("--budget", type=float, default=None,
                    help="timed seconds per candidate and case (default 1.0; 0.3 with --quick)")
    ap.add_argument("--_kernel-check-child", dest="child", help=argparse.SUPPRESS)
    ap.add_argument("--_out", dest="child_out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _kernel_check_child(args.child, args.child_out)

    t_start = time.perf_counter()
    gpu = torch.cuda.is_available()
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 1.0)
    info = _versions()
    load0 = _loadavg()
    if gpu:
        dev = f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}, " \
              f"CUDA {torch.version.cuda})"
    else:
        dev = f"CPU {_cpu_name()}, {os.cpu_count()} cores, no GPU"
    _say(f"deberta_fast {__version__} self-check{' (--quick)' if args.quick else ''}: "
         f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    _say(f"device: {dev}; torch threads {torch.get_num_threads()}; 1-min load average {load0}")
    _say("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if not gpu and load0 is not None and load0 > 0.5 * (os.cpu_count() or 1):
        _say(f"note: the machine is busy (load {load0} on {os.cpu_count()} cores): timings below are noisy; "
             f"the IQR columns show how much")
    if not gpu and "+cpu" not in torch.__version__ and torch.version.cuda is not None:
        _say(f"note: this torch is a CUDA build on a machine without a GPU; a CPU-only torch is much smaller: "
             f"{cpu_torch_hint()}")

    _say("\n[1] backends on this machine")
    status = _backend_status(gpu)
    if not gpu:
        _say(f"  ({cuda_device_problem()})")
    for name, (state, text) in status.items():
        _say(f"  {name:7s} {text}" if state != "unavailable" else f"  {name:7s} unavailable: {text}")

    _say("\n[2] kernel check: forward + backward vs the fp64 reference"
         + ("" if gpu else " (Triton kernels under the interpreter, CUDA kernels in their CPU simulator)"))
    if args.no_kernel_check:
        kc = {"rows": [], "not_run": "--no-kernel-check", "seconds": 0.0}
        _say("  skipped (--no-kernel-check)")
    else:
        kc = kernel_check(gpu, args.quick, status)

    _say("\n[3] HF's own attention module vs deberta_fast" + (" (headline table)" if gpu else ""))
    hf = hf_comparison(gpu, args.quick, status, budget)

    load1 = _loadavg()
    k_fail = [r for r in kc["rows"] if r.get("status") == "FAIL"]
    h_fail = [r for r in hf["rows"] if r["parity"] == "FAIL"]
    _say("\nsummary")
    if kc["not_run"]:
        _say(f"  kernel check: NOT RUN ({kc['not_run']})")
    else:
        n_pass = sum(r.get("status") == "pass" for r in kc["rows"])
        _say(f"  kernel check: {n_pass} of {len(kc['rows'])} pass"
             + ("" if gpu else " (CPU: Triton kernels under the interpreter, fp32; CUDA kernels in their "
                                "simulator, bf16 / fp16)")
             + (f"; FAILED: {[(r['backend'], r['dtype'], r['L']) for r in k_fail]}" if k_fail else ""))
    if hf["not_run"]:
        _say(f"  HF comparison: NOT RUN ({hf['not_run']})")
    else:
        _say(f"  HF comparison: {sum(r['parity'] == 'pass' for r in hf['rows'])} of {len(hf['rows'])} rows pass "
             f"parity" + (f"; FAILED: {[(r['candidate'], r['dtype'], r['L']) for r in h_fail]}" if h_fail else ""))
        for r in hf["rows"]:
            if r["backend"] and r.get("x_hf_eager") is not None:
                _say(f"    {r['candidate']}, {r['dtype']}, B={r['B']} L={r['L']}: {r['x_hf_eager']:.2f} x HF eager "
                     f"(IQR bracket {r['x_hf_eager_bracket'][0]:.2f}-{r['x_hf_eager_bracket'][1]:.2f})")
        _say(f"    ({RATIO_TEXT})")
    _say(f"  load average {load0} -> {load1} (1 min) on {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}")
    if k_fail or h_fail:
        _say("PARITY FAILURE (exit status 1)")
    elif kc["rows"] or hf["rows"]:
        _say("all served candidates agree with the fp64 reference"
             + (" (some checks were NOT RUN, see above)" if kc["not_run"] or hf["not_run"] else ""))
    total = time.perf_counter() - t_start
    _say(f"total wall time {total:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "device": dev, "torch_threads": torch.get_num_threads(),
                       "loadavg_1min": [load0, load1], "backends": {k: {"state": s, "text": t} for k, (s, t)
                                                                    in status.items()},
                       "kernel_check": kc, "hf_comparison": hf, "total_s": total}, f, indent=1)
    return 1 if k_fail or h_fail else 0


if __name__ == "__main__":
    sys.exit(main())
