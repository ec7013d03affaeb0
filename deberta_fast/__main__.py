"""``python -m deberta_fast``: which backends serve this machine, their parity with the fp64
reference, and their speed side by side with HF eager attention.

Options: ``--quick`` (smaller sizes), ``--json PATH`` (write the rows).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from . import disentangled_attention, disentangled_attention_reference, last_backend
from .backends import BACKENDS
from .dispatch import BackendUnavailableError


def _versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            v[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            v[name] = "not installed"
    v["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    return v


def _case(B, H, L, D, span, dtype, device, pad=True):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = mk(B, H, L, D), mk(B, H, L, D), mk(B, H, L, D)
    pk, pq = mk(H, 2 * span, D), mk(H, 2 * span, D)
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    if pad and B > 1:
        mask[-1, L - L // 3:] = False
    return q, k, v, pk, pq, mask


def _time(fn, device, reps):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def _hf_eager(q, k, v, pk, pq, mask, buckets, max_rel):
    """HF's eager math on the same projected tensors (4-D mask, [L, L] positions, gathers)."""
    from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

    B, H, L, D = q.shape
    span = pk.shape[-2] // 2
    scale = torch.sqrt(torch.tensor(D, dtype=torch.float) * 3)
    rel = hf.build_relative_position(q[0, 0], k[0, 0], bucket_size=buckets, max_position=max_rel).to(q.device)
    idx = torch.clamp(rel + span, 0, 2 * span - 1)
    s = q @ (k.transpose(-1, -2) / scale.to(q.dtype))
    s = s + torch.gather(q @ pk.transpose(-1, -2), -1, idx.expand(B, H, L, L)) / scale.to(q.dtype)
    p2c = torch.gather(k @ pq.transpose(-1, -2), -1, torch.clamp(-rel + span, 0, 2 * span - 1).expand(B, H, L, L))
    s = s + p2c.transpose(-1, -2) / scale.to(q.dtype)
    m4 = mask[:, None, None, :] & mask[:, None, :, None]
    s = s.masked_fill(~m4, torch.finfo(q.dtype).min)
    return torch.softmax(s, -1) @ v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deberta_fast", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = dev.type == "cuda"
    info = _versions()
    print("deberta_fast report  " + "  ".join(f"{k}={v}" for k, v in info.items()))
    print("\nbackends:")
    for name, b in BACKENDS.items():
        why = b.unavailable()
        print(f"  {name:7s} {'available' if why is None else 'unavailable: ' + why}  [{b.summary}]")

    buckets, max_rel, span, H, D = 256, 512, 256, 12, 64
    dtypes = [torch.bfloat16, torch.float16] if gpu else [torch.float32]
    lens = ([128, 512, 2048, 8192] if not args.quick else [128, 512]) if gpu else ([64, 256] if not args.quick else [64])
    tokens = 16384 if gpu else 512
    reps = 20 if gpu else 3
    rows = []
    print(f"\nparity vs fp64 reference and forward latency (H={H}, D={D}, buckets={buckets}, "
          f"max_rel={max_rel}, c2p+p2c, padded batch, {tokens} tokens per batch):")
    print(f"  {'dtype':9s} {'L':>6s} {'candidate':10s} {'max abs err':>12s} {'ref err':>10s} {'ok':>4s} "
          f"{'ms':>9s} {'vs HF eager':>11s}")
    for dtype in dtypes:
        for L in lens:
            B = max(1, tokens // L)
            q, k, v, pk, pq, mask = _case(B, H, L, D, span, dtype, dev)
            kw = dict(position_buckets=buckets, max_relative_positions=max_rel, attention_mask=mask)
            # parity on the last batch row (it has padding) and 2 heads: the fp64 reference is O(L^2)
            sub = dict(kw, attention_mask=mask[-1:])
            part = (q[-1:, :2], k[-1:, :2], v[-1:, :2], pk[:2], pq[:2])
            ref = disentangled_attention_reference(*(t.double() for t in part), **sub)
            ref_lp = disentangled_attention_reference(*part, **sub)
            ref_err = (ref_lp.double() - ref).abs().max().item()
            cands = {name: (lambda name=name: disentangled_attention(q, k, v, pk, pq, backend=name, **kw))
                     for name in BACKENDS}
            try:
                import transformers  # noqa: F401
                cands["hf_eager"] = lambda: _hf_eager(q, k, v, pk, pq, mask, buckets, max_rel)
            except ImportError:
                pass
            base = None
            skipped = []
            for name, fn in cands.items():
                try:
                    out = fn()
                except BackendUnavailableError as e:
                    why = str(e).split("cannot serve this call: ", 1)[-1].split(". Use backend=", 1)[0]
                    skipped.append(f"  {str(dtype)[6:]:9s} {L:6d} {name:10s} skipped: {why}")
                    continue
                except torch.cuda.OutOfMemoryError:
                    print(f"  {str(dtype)[6:]:9s} {L:6d} {name:10s} out of memory")
                    torch.cuda.empty_cache()
                    continue
                err = (out[-1:, :2].double() - ref).abs().max().item()
                # fp32: ~1e-5 relative; low precision: within 4x the eager low-precision error
                bound = 4 * ref_err + 1e-6 if dtype != torch.float32 else 1e-5 * ref.abs().max().item()
                ok = bool(torch.isfinite(out).all()) and err <= max(bound, 1e-5 * ref.abs().max().item())
                ms = _time(fn, dev, reps) * 1e3
                if name == "hf_eager":
                    base = ms
                rows.append(dict(dtype=str(dtype), L=L, B=B, candidate=name, max_abs_err=err, ref_err=ref_err,
                                 ok=ok, ms=ms, served_by=last_backend() if name != "hf_eager" else "hf"))
            for r in rows:
                if r["dtype"] == str(dtype) and r["L"] == L:
                    ratio = f"{base / r['ms']:.2f}x" if base else "-"
                    print(f"  {str(dtype)[6:]:9s} {L:6d} {r['candidate']:10s} {r['max_abs_err']:12.2e} "
                          f"{r['ref_err']:10.2e} {'yes' if r['ok'] else 'NO':>4s} {r['ms']:9.3f} {ratio:>11s}")
            print("\n".join(skipped))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    if bad:
        print(f"\nPARITY FAILURES: {[(r['candidate'], r['dtype'], r['L']) for r in bad]}")
        return 1
    print("\nall served candidates agree with the fp64 reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
