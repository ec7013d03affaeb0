"""Where the attention op's time goes on a GPU: the same call with and without each relative term, the host-built
tables alone, and the Triton forward with its tables prebuilt, next to plain SDPA and the cuda backend.

    python -m benchmarks.breakdown --out DIR                          # GPU
    TRITON_INTERPRET=1 python -m benchmarks.breakdown --out DIR --rehearse   # CPU: the code path, tiny sizes, a
                                                                             # head group per head
    (with DEBERTA_FAST_CUDA_SIM=1 the cuda rows run in the CUDA simulator)

Why: the first H200 session measured the Triton forward 2.5-6x below the roofline model's prediction (NOTES, "First
GPU session"), and an instruction count cannot say which part is slow.  Per length (L = 128, MNLI's scale, to
8192; bf16, H=12, D=64, v3 buckets, 16,384 tokens, no mask), median ms of ``triton.testing.do_bench``:

- ``sdpa``: plain ``scaled_dot_product_attention`` (content only: the ceiling);
- ``triton none`` / ``c2p`` / ``p2c`` / ``both``: the Triton launcher with those relative terms (``none``: the
  kernels' content loop alone, against ``sdpa`` its base efficiency; ``both`` minus ``none``: the relative terms);
- ``triton tables``: the two ``[B, H, L, NSLOT]`` float32 table GEMMs the forward builds first, alone;
- ``triton both, tables prebuilt``: the forward with those GEMMs replaced by the prebuilt tables (the kernel, its
  gathers and the rest of the host path);
- ``triton both, key mask (all ones)``: the forward with a bool padding mask that masks nothing (the same bits as
  ``triton both``): what the kernels' per-key mask reads cost (NOTES, "the kernels read the caller's key mask");
- ``triton both, 16-bit tables`` (forward, and forward+backward) and ``triton tables, 16-bit``: the launcher's
  ``TABLE_DTYPE = "input"`` experiment, tables in bf16 (half the bytes, a widening per gathered entry);
- ``triton both, skew (no tables)``: the launcher's ``REL_SOURCE = "skew"`` experiment, the forward without tables
  (band tiles: window products on tensor cores skewed through a per-program scratch);
- ``triton both, distance tables`` (forward, and forward+backward): ``REL_SOURCE = "distance"``, tables with a column
  per distance in both passes (2.2-2.6x the bytes at v3 buckets; band tiles read them as aligned vector tiles with no
  slot-table load, so every load of the forward's band loop is prefetched: NOTES, "Distance tables"); forward also
  with those tables prebuilt (the kernel alone), and both passes in 16-bit (``TABLE_DTYPE = "input"``: half the
  bytes, about the slot tables' float32 bytes);
- ``triton both, relative share on host`` (forward+backward): ``REL_SHARE = "host"``, the backward kernels without
  their epilogue adding dQ's / dK's relative share from their run sums; the host adds it with a float32 GEMM into
  float32 dq / dk (as until 2026-12-07: one more HBM read of the sums per term against the epilogue's scalar L2
  reads; NOTES, "The backward adds the relative share of dQ / dK itself");
- ``triton both, dropout 0.1`` (forward+backward, DeBERTa's training rate) and ``, Philox in dK/dV``:
  ``DROPOUT_BITS = "philox"``, the dK/dV kernel drawing its dropout decisions itself instead of reading the dq
  kernel's bytes (the same decisions; NOTES, "Dropout decisions passed from dq to dK/dV as bytes");
- ``triton both, one launch`` (forward, and forward+backward): ``TABLE_BUDGET = None``, every head in one launch
  (the shipped budget runs 16k tokens' 805 MB of tables in head groups: the time that costs or saves, and the
  memory it saves);
- ``cuda none`` / ``cuda both``: the cuda backend's op (no tables: relative terms on tensor cores);
- ``torch both (HF eager's math)``: the reference backend, HF's eager computation ``[B, H, L, L]``;
- ``fwd+bwd`` of ``sdpa``, ``triton none`` / ``both`` and ``cuda none`` / ``both``;
- per length, ``triton both`` and ``cuda both`` forward + backward under ``torch.profiler``: device time per kernel
  and operator (the backward's score kernels, the band reductions, the table and position-gradient GEMMs, ...).

On a GPU each row also has the peak memory of one call (``torch.cuda.max_memory_allocated`` above what was
allocated before it).  Writes ``breakdown.json`` and ``breakdown.md``.  A variant a backend refuses is a row with
its reason.
"""
from __future__ import annotations

import sys

import torch

TERMS = ("none", "c2p", "p2c", "both")
#: forward variant -> the forward variant whose output it must equal bitwise (recorded as ``same_output``)
SAME = {"triton both, tables prebuilt": "triton both", "triton both, key mask (all ones)": "triton both",
        "triton both, distance tables prebuilt": "triton both, distance tables",
        # (the same values through tensor descriptors: on a GPU a difference would be the compiler's scheduling)
        "triton both, TMA": "triton both", "triton both, key mask (all ones), TMA": "triton both"}
BUCKETS = (256, 512)


def _lengths(rehearse: bool) -> list[tuple[int, int, int, int]]:
    """``(B, H, L, D)``."""
    return [(2, 2, 40, 32)] if rehearse else [(16384 // L, 12, L, 64) for L in (128, 512, 2048, 8192)]


def _inputs(B, H, L, D, device, dtype, grad=False):
    from deberta_fast.positions import attention_span

    g = torch.Generator().manual_seed(0)
    span = attention_span(*BUCKETS)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return mk(B, H, L, D), mk(B, H, L, D), mk(B, H, L, D), mk(H, 2 * span, D), mk(H, 2 * span, D)


def _rel(terms, pk, pq):
    return (pk if terms in ("c2p", "both") else None), (pq if terms in ("p2c", "both") else None)


def variants(B, H, L, D, device, dtype):
    """``(name, pass, fn)`` of every timed variant at one length; ``fn`` runs it once."""
    import torch.nn.functional as F

    from deberta_fast import disentangled_attention
    from deberta_fast._kernels import triton_attention_launch as launch
    from deberta_fast.backends.triton_backend import kernel_masks
    from deberta_fast.dispatch import build_call

    plain = q, k, v, pk, pq = _inputs(B, H, L, D, device, dtype)
    grads = qg, kg, vg, pkg, pqg = _inputs(B, H, L, D, device, dtype, grad=True)
    do = torch.randn(B, H, L, D, device=device, dtype=dtype)
    out = []

    def api(backend, terms, ts):  # the public op on ts = (q, k, v, pos_key, pos_query)
        return lambda: disentangled_attention(*ts[:3], *_rel(terms, *ts[3:]), position_buckets=BUCKETS[0],
                                              max_relative_positions=BUCKETS[1], backend=backend)

    def tri(terms, mask=None):
        c = build_call(q, k, v, *_rel(terms, pk, pq), position_buckets=BUCKETS[0],
                       max_relative_positions=BUCKETS[1], attention_mask=mask, scale=None, dropout_p=0.0)
        args = (c.query, c.key, c.value, c.pos_key, c.pos_query, *kernel_masks(c))
        kw = dict(position_buckets=BUCKETS[0], max_relative_positions=BUCKETS[1], span=c.span, scale=c.scale,
                  dropout_p=0.0, seed=0)
        return args, kw

    out.append(("sdpa", "fwd", lambda: F.scaled_dot_product_attention(q, k, v)))
    for terms in TERMS:
        args, kw = tri(terms)
        out.append((f"triton {terms}", "fwd", lambda a=args, k_=kw: launch.attention_forward(*a, **k_)))
    args, kw = tri("both")

    def tables():  # as _prepare builds them
        rows = launch._layout(L, L, BUCKETS[0], BUCKETS[1], kw["span"], q.device, True, False).rows
        return launch._table_gemm(args[0], args[3][..., rows, :]), launch._table_gemm(args[1], args[4][..., rows, :])

    out.append(("triton tables", "fwd", tables))

    def prebuilt(built):  # the launcher's own tables (per head group, see launch.TABLE_BUDGET), built before the timing
        def run():
            real = launch._tables

            def cached(q, k, pos_key, pos_query, pr, hs, *layout):  # (launch._tables' signature)
                key = None if hs is None else (hs.start, hs.stop)  # None: the call's only group
                if key not in built:
                    built[key] = real(q, k, pos_key, pos_query, pr, hs, *layout)
                return built[key]
            launch._tables = cached
            try:
                return launch.attention_forward(*args, **kw)
            finally:
                launch._tables = real
        return run

    out.append(("triton both, tables prebuilt", "fwd", prebuilt({})))
    # the kernels' per-key cost of a padding mask (a patched encoder's bool mask; all ones: the same bits)
    margs, mkw = tri("both", torch.ones(B, L, dtype=torch.bool, device=device))
    out.append(("triton both, key mask (all ones)", "fwd", lambda: launch.attention_forward(*margs, **mkw)))
    out.append(("triton both, 16-bit tables", "fwd", _setting("TABLE_DTYPE", "input",
                                                              lambda: launch.attention_forward(*args, **kw))))
    out.append(("triton tables, 16-bit", "fwd", _setting("TABLE_DTYPE", "input", tables)))
    out.append(("triton both, one launch", "fwd", _setting("TABLE_BUDGET", None,
                                                           lambda: launch.attention_forward(*args, **kw))))
    out.append(("triton both, skew (no tables)", "fwd", _setting("REL_SOURCE", "skew",
                                                                 lambda: launch.attention_forward(*args, **kw))))
    fwd = lambda: launch.attention_forward(*args, **kw)  # noqa: E731
    out.append(("triton both, distance tables", "fwd", _setting("REL_SOURCE", "distance", fwd)))
    out.append(("triton both, distance tables prebuilt", "fwd", _setting("REL_SOURCE", "distance", prebuilt({}))))
    out.append(("triton both, distance tables, 16-bit", "fwd",
                _setting("REL_SOURCE", "distance", _setting("TABLE_DTYPE", "input", fwd))))
    out.append(("torch both (HF eager's math)", "fwd", api("torch", "both", plain)))
    out += [(f"cuda {terms}", "fwd", api("cuda", terms, plain)) for terms in ("none", "both")]
    out.append(("cuda both, wgmma", "fwd", _wgmma(api("cuda", "both", plain))))
    out.append(("cuda both, wgmma serial", "fwd", _wgmma(api("cuda", "both", plain), "serial")))
    # the saturated tiles' column terms from one extra kernel, or per tile in every block (the default picks by the
    # share of saturated tiles: csrc/dfa_bindings.cpp, sat_terms_wanted)
    for on in (True, False):
        out.append((f"cuda both, saturated terms {'precomputed' if on else 'per tile'}", "fwd",
                    _sat_terms(api("cuda", "both", plain), on)))
    out.append(("sdpa", "fwd+bwd", _grad_run(lambda: F.scaled_dot_product_attention(qg, kg, vg), (qg, kg, vg), do)))
    out.append(("torch both (HF eager's math)", "fwd+bwd", _grad_run(api("torch", "both", grads), grads, do)))
    for backend in ("triton", "cuda"):
        for terms in ("none", "both"):
            leaves = (qg, kg, vg) + tuple(t for t in _rel(terms, pkg, pqg) if t is not None)
            out.append((f"{backend} {terms}", "fwd+bwd", _grad_run(api(backend, terms, grads), leaves, do)))
    out.append(("cuda both, wgmma", "fwd+bwd", _wgmma(_grad_run(api("cuda", "both", grads), grads, do))))
    for on in (True, False):
        out.append((f"cuda both, saturated terms {'precomputed' if on else 'per tile'}", "fwd+bwd",
                    _sat_terms(_grad_run(api("cuda", "both", grads), grads, do), on)))
    both = _grad_run(api("triton", "both", grads), grads, do)
    out.append(("triton both, 16-bit tables", "fwd+bwd", _setting("TABLE_DTYPE", "input", both)))
    out.append(("triton both, one launch", "fwd+bwd", _setting("TABLE_BUDGET", None, both)))
    out.append(("triton both, relative share on host", "fwd+bwd", _setting("REL_SHARE", "host", both)))
    out.append(("triton both, distance tables", "fwd+bwd", _setting("REL_SOURCE", "distance", both)))
    out.append(("triton both, distance tables, 16-bit", "fwd+bwd",
                _setting("REL_SOURCE", "distance", _setting("TABLE_DTYPE", "input", both))))
    dropped = _grad_run(lambda: disentangled_attention(*grads[:3], *grads[3:], position_buckets=BUCKETS[0],
                                                       max_relative_positions=BUCKETS[1], dropout_p=0.1,
                                                       backend="triton"), grads, do)
    out.append(("triton both, dropout 0.1", "fwd+bwd", dropped))
    out.append(("triton both, dropout 0.1, Philox in dK/dV", "fwd+bwd", _setting("DROPOUT_BITS", "philox", dropped)))
    # the Triton forward's TMA loads (never run on a GPU before): last, so that a device fault of theirs cannot take
    # the other rows with it
    out.append(("triton both, TMA", "fwd", _tma(fwd)))
    out.append(("triton both, key mask (all ones), TMA", "fwd", _tma(lambda: launch.attention_forward(*margs, **mkw))))
    out.append(("triton both, TMA", "fwd+bwd", _tma(both)))
    return out


def _setting(name, value, fn):
    """``fn`` with the launcher's module setting ``name`` (``TABLE_DTYPE``, ``TABLE_BUDGET``, ``REL_SOURCE``) at
    ``value``."""
    from deberta_fast._kernels import triton_attention_launch as launch

    def run():
        old = getattr(launch, name)
        setattr(launch, name, value)
        try:
            return fn()
        finally:
            setattr(launch, name, old)
    return run


def _tma(fn):
    """``fn`` with the Triton forward reading through tensor descriptors (DEBERTA_FAST_TRITON_TMA=1; sm_90: elsewhere,
    or on misaligned inputs, the row records an error)."""
    from deberta_fast._kernels import triton_attention_launch as launch

    def run():
        launch.reset_last_forward_tma()
        with launch.use_tma():
            out = fn()
        if not launch.last_forward_tma():
            raise RuntimeError("the forward read through pointers, not tensor descriptors (sm_90 and 16-byte aligned "
                               "inputs needed)")
        return out
    return run


def _wgmma(fn, mode: bool | str = True):
    """``fn`` with the cuda backend's kernels on their wgmma variants (sm_90a; elsewhere the row records an error: the
    mma.sync kernels ran); ``mode="serial"``: the forward without its products overlapped with the softmax."""
    from deberta_fast import _cuda_ext

    def run():
        _cuda_ext.reset_last_kernels()
        with _cuda_ext.use_wgmma(mode):
            out = fn()
        ran = (_cuda_ext.last_fwd_kernel(), _cuda_ext.last_bwd_kernel())  # (no backward: "")
        want = "wgmma serial" if mode == "serial" else "wgmma"
        if ran[0] != want or ran[1] not in ("", "wgmma"):
            raise RuntimeError(f"the kernels ran {ran}, not {want} (the sm_90a build needed)")
        return out
    return run


def _sat_terms(fn, on: bool):
    """``fn`` with the cuda backend's saturated column terms precomputed (``on``) or computed per tile, whatever the
    call's share of saturated tiles (``DEBERTA_FAST_CUDA_SAT_TERMS``)."""
    from deberta_fast import _cuda_ext

    def run():
        with _cuda_ext.use_sat_terms(on):
            return fn()
    return run


def _grad_run(fn, leaves, do):
    def run():
        o = fn()
        torch.autograd.grad(o, leaves, do)
    return run


def run(rehearse: bool, progress=print) -> dict:
    from benchmarks.envinfo import environment

    device = "cpu" if rehearse else "cuda"
    dtype = torch.float16 if rehearse else torch.bfloat16  # (fp16: the interpreter upcasts; the CUDA simulator)
    from benchmarks.harness import median_ms_timer

    bench = median_ms_timer(rehearse)
    rows = []
    if rehearse:  # every head a group of its own: the grouped paths (and the per-group prebuilt tables) run too
        from deberta_fast._kernels import triton_attention_launch as launch
        launch.TABLE_BUDGET = 1
    splits = []
    for B, H, L, D in _lengths(rehearse):
        outs = {}
        vs = variants(B, H, L, D, device, dtype)
        for name, pass_, fn in vs:
            row = dict(L=L, B=B, H=H, D=D, variant=name, pass_=pass_)
            try:
                if name in SAME and pass_ == "fwd":  # a variant that only moves work around must give the same bits
                    got, want = fn()[0], outs[SAME[name]][0]
                    row["same_output"] = bool(torch.equal(got, want))
                elif name.startswith("triton") and pass_ == "fwd" and name != "triton tables":
                    outs[name] = fn()
                row["ms"] = round(bench(fn), 4)
                if device == "cuda":  # one more call, its peak above what was allocated before it
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    fn()
                    torch.cuda.synchronize()
                    row["peak_mib"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
            except Exception as e:  # noqa: BLE001 - a refusal (cuda on CPU, a missing extension) is a row
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            progress(f"breakdown: L={L} {pass_:8s} {name:30s} {row.get('ms', row.get('error'))}")
            rows.append(row)
        splits += _kernel_split(vs, L, device, progress)
    return {"env": environment(), "rehearse": rehearse, "dtype": str(dtype), "buckets": BUCKETS, "rows": rows,
            "kernels": splits}


#: the forward + backward rows split per kernel (torch.profiler) at each length
SPLIT = ("triton both", "cuda both")


def _kernel_split(vs, L, device, progress) -> list[dict]:
    """The :data:`SPLIT` rows' forward + backward under the profiler (``profile_model.profile_one``: its device time
    per kernel and operator, and host time per operator): what the measured time of the backward is made of (the
    first H200 session measured the cuda backend's L = 512 backward at ~4.7 ms against ~2.6 ms predicted, with no
    split)."""
    from benchmarks.profile_model import profile_one

    out = []
    for name in SPLIT:
        fn = next(f for n, p, f in vs if n == name and p == "fwd+bwd")
        row = {"L": L, "variant": name, "pass_": "fwd+bwd"}
        try:
            row.update(profile_one(fn, device))
        except Exception as e:  # noqa: BLE001 - a refusal (cuda on CPU without the simulator) is a row
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        progress(f"breakdown: L={L} split    {name:30s} {row.get('wall_ms', row.get('error'))}")
        out.append(row)
    return out


def table(res: dict) -> str:
    title = "CPU rehearsal, interpreter: not a measurement" if res["rehearse"] else "GPU"
    lengths = sorted({r["L"] for r in res["rows"]})
    lines = [f"# Attention op breakdown ({title}, {res['dtype']}, buckets {tuple(res['buckets'])}, no mask)", "",
             "median ms (triton.testing.do_bench); x sdpa: this / plain SDPA of the same pass and length; on a GPU the "
             "peak memory of one call above what was allocated before it", "",
             "| pass | variant | " + " | ".join(f"L={L} ms (x sdpa)" for L in lengths) + " |",
             "|---|---|" + "---:|" * len(lengths)]
    sdpa = {(r["L"], r["pass_"]): r.get("ms") for r in res["rows"] if r["variant"] == "sdpa"}
    seen = []
    for r in res["rows"]:
        if (r["pass_"], r["variant"]) not in seen:
            seen.append((r["pass_"], r["variant"]))
    for pass_, name in seen:
        cells = []
        for L in lengths:
            r = next((x for x in res["rows"] if x["L"] == L and x["pass_"] == pass_ and x["variant"] == name), None)
            if r is None:
                cells.append("")
            elif "ms" in r:
                base = sdpa.get((L, pass_))
                cells.append(f"{r['ms']:.4g}" + (f" ({r['ms'] / base:.1f}x)" if base else "")
                             + (f", {r['peak_mib']:.0f} MiB" if "peak_mib" in r else "")
                             + (" DIFFERENT OUTPUT" if r.get("same_output") is False else ""))
            else:
                cells.append(r["error"][:60])
        lines.append(f"| {pass_} | {name} | " + " | ".join(cells) + " |")
    for r in res.get("kernels", []):
        key, what = ("top_device", "device") if r.get("top_device") else ("top_host", "host (self CPU)")
        lines += ["", f"## L={r['L']}, {r['variant']}, forward + backward: {what} time per kernel / operator "
                      f"(ms per call; wall {r.get('wall_ms', '-')} ms, device busy {r.get('device_busy_ms', '-')} ms)",
                  ""]
        if "error" in r:
            lines.append(r["error"])
            continue
        lines += ["| kernel / operator | calls | ms |", "|---|---:|---:|"]
        lines += [f"| `{k[:90]}` | {n} | {ms} |" for k, n, ms in r[key]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from benchmarks.harness import report_cli

    res = report_cli(argv, "breakdown", __doc__, run, table, "breakdown",
                     "CPU tensors under TRITON_INTERPRET=1, tiny sizes")
    if res is None:
        return 2
    failed = [r for r in res["rows"] if ("error" in r and not r["variant"].startswith("cuda"))
              or r.get("same_output") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
