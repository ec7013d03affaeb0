"""Turn a pytest-benchmark JSON of this suite into a markdown table and PNG plots.

    pytest benchmarks/ --benchmark-json=bench.json
    python -m benchmarks.report bench.json [--out benchmarks/results/]

``pytest benchmarks/`` calls this itself at the end of a session (benchmarks/conftest.py), unless
``DEBERTA_FAST_BENCH_SAVE=0`` or ``--no-results``.

Writes ``<out>/<date>-<device>-<profile>/``: ``results.json`` (the input, verbatim),
``env.json`` (device, versions, date, profile), ``table.md`` and ``*.png`` (TFLOP/s and
peak memory vs sequence length per candidate; skipped with a message when matplotlib is
not installed).

Rules of the table: latency is the median of the timed rounds; a candidate whose
parity check failed is shown as WRONG and gets no TFLOP/s or speed-up; ratios are
``other median / this median`` (> 1: this one is faster), against HF eager and against
each peer library present in the same group.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import sys
from collections import OrderedDict, defaultdict


def _fmt_ms(s):
    if s is None:
        return "—"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _fmt_mib(b):
    if b is None:
        return "?"
    return f"{b / 2**20:.1f}" if b < 100 * 2**20 else f"{b / 2**20:.0f}"


def _fmt_err(e):
    if e is None:
        return ""
    if isinstance(e, float) and not math.isfinite(e):
        return "inf"
    return f"{e:.1e}"


def load(path):
    with open(path) as f:
        data = json.load(f)
    return data, rows_of(data)


def rows_of(data) -> list:
    """One flat dict per benchmark of a pytest-benchmark JSON (or of the same structure built from a
    live session: ``{"benchmarks": [b.as_dict(include_data=False) ...]}``): its extra_info plus
    median, IQR, rounds, group, name and candidate."""
    rows = []
    for b in data.get("benchmarks", []):
        ei = dict(b.get("extra_info") or {})
        st = b.get("stats") or {}
        ei["median"] = st.get("median")
        ei["iqr"] = st.get("iqr")
        ei["rounds_timed"] = st.get("rounds")
        ei["group"] = b.get("group") or ei.get("suite", "?")
        ei["name"] = b.get("name")
        ei.setdefault("candidate", b.get("name"))
        rows.append(ei)
    return rows


def _parity_cell(r):
    p = r.get("parity")
    if p == "pass":
        return f"pass ({_fmt_err(r.get('max_err'))})"
    if p == "WRONG":
        return f"**WRONG** ({_fmt_err(r.get('max_err'))} > {_fmt_err(r.get('tol'))})"
    if p == "baseline":  # HF eager: its own error sets the others' tolerance
        return f"baseline ({_fmt_err(r.get('max_err'))})"
    return p or "?"


def _ok(r):
    return r.get("parity") != "WRONG" and r.get("median")


def groups_of(rows) -> "OrderedDict[str, list]":
    """Rows by benchmark group (suite, then group name), each sorted by median (skipped last)."""
    groups = OrderedDict()
    for r in sorted(rows, key=lambda r: (r.get("suite", ""), r["group"])):
        groups.setdefault(r["group"], []).append(r)
    for rs in groups.values():
        rs.sort(key=lambda r: (r.get("median") is None, r.get("median") or 0))
    return groups


def ratio_cell(r, other) -> str:
    """``other median / r median`` (> 1: r is faster); WRONG results get none."""
    if not _ok(r):
        return "WRONG"
    if other is None or not _ok(other):
        return "—"
    if other is r:
        return "1.00"
    return f"{other['median'] / r['median']:.2f}"


def summary_lines(rows) -> list:
    """Terminal summary of a session: per group, each candidate's median, IQR, parity vs the fp64
    reference and × HF eager (HF eager median / this median; > 1: faster)."""
    out = []
    for g, rs in groups_of(rows).items():
        hf = next((r for r in rs if r["candidate"] == "hf-eager"), None)
        first = rs[0]
        out.append(f"{g}  (B={first.get('B')} L={first.get('L')} tokens={first.get('tokens')})")
        for r in rs:
            parity = _parity_cell(r).replace("**", "")
            out.append(f"  {r['candidate']:28s} median {_fmt_ms(r.get('median')):>6s} ms  IQR {_fmt_ms(r.get('iqr')):>6s} ms"
                       f"  parity {parity:28s} × HF eager {ratio_cell(r, hf)}")
    return out


def build_table(data, rows) -> str:
    meta = data.get("deberta_fast", {})
    env = meta.get("env") or (data.get("machine_info", {}).get("deberta_fast_env") or {})
    peers = sorted({r["candidate"] for r in rows if r.get("kind") == "peer"})
    out = []
    out.append(f"# deberta_fast benchmarks — profile `{meta.get('profile', '?')}`\n")
    out.append(f"- device: **{env.get('device', '?')}**")
    vers = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "transformers", "deberta_fast",
                                                "disentangled-flash", "flashdeberta", "cuda") if env.get(k))
    out.append(f"- versions: {vers}")
    out.append(f"- date: {meta.get('date') or data.get('datetime', '?')}")
    if meta.get("loadavg_1min"):
        out.append(f"- machine load (1-min load average at start, end): {meta['loadavg_1min']} on "
                   f"{meta.get('cpu_count')} CPUs, torch threads {meta.get('torch_threads')}")
    if meta.get("pytest_args") is not None:
        out.append(f"- command: `pytest {' '.join(meta['pytest_args'])}`")
    if rows:
        methods = sorted({r.get("peak_mem_method") for r in rows if r.get("peak_mem_method")})
        out.append(f"- peak memory: {'; '.join(methods)}")
    out.append("- latency: median of the timed rounds (warm-up excluded); TFLOP/s from benchmarks/flops.py "
               "(useful FLOPs of valid tokens); `× HF` / `× peer` = their median / this median "
               "(> 1: faster); WRONG results get no ratio.\n")
    if meta.get("profile") == "quick":
        out.append("> The quick profile is a CPU smoke run of the harness (small shapes, fp32, 2 cores shared "
                   "with other work). Its numbers say nothing about GPU kernels.\n")

    for g, rs in groups_of(rows).items():
        by = {r["candidate"]: r for r in rs}
        hf = by.get("hf-eager")
        gpeers = [p for p in peers if p in by]
        head = ["candidate", "median ms", "IQR ms", "TFLOP/s", "peak MiB", "parity vs fp64", "× HF eager"]
        head += [f"× {p}" for p in gpeers]
        first = rs[0]
        shape = f"B={first.get('B')} L={first.get('L')} tokens={first.get('tokens')}"
        out.append(f"## {g}\n\n{shape}\n")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for r in rs:
            ok = _ok(r)
            tf = r.get("tflops")
            cells = [r["candidate"] + (" (ceiling)" if r.get("kind") == "ceiling" and "ceiling" not in r["candidate"] else ""),
                     _fmt_ms(r.get("median")), _fmt_ms(r.get("iqr")),
                     (f"{tf:.3g}" if ok and tf and r.get("kind") != "ceiling" else ("WRONG" if not ok else "—")),
                     _fmt_mib(r.get("peak_mem_bytes")), _parity_cell(r)]

            cells.append(ratio_cell(r, hf))
            cells += [ratio_cell(r, by.get(p)) for p in gpeers]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")

    wrong = [r for r in rows if r.get("parity") == "WRONG"]
    if wrong:
        out.append("## WRONG results\n")
        for r in wrong:
            out.append(f"- `{r['name']}`: max_err {_fmt_err(r.get('max_err'))} > tol {_fmt_err(r.get('tol'))} "
                       f"({r.get('parity_of')})")
        out.append("")
    skips = meta.get("skipped") or []
    if skips:
        out.append("## Skipped candidates\n")
        agg = defaultdict(list)
        for s in skips:
            agg[s["reason"]].append(s["test"])
        out.append("| cases | reason |")
        out.append("|---:|---|")
        for reason, tests in sorted(agg.items(), key=lambda x: -len(x[1])):
            out.append(f"| {len(tests)} | {reason.replace('|', '/')} |")
        out.append("")
    notes = {(r.get("suite", ""), r["candidate"]): r.get("notes") for r in rows if r.get("notes")}
    if notes:
        out.append("## Candidates\n")
        for (suite, c), n in sorted(notes.items()):
            out.append(f"- {suite} **{c}**: {n}")
        out.append("")
    return "\n".join(out)


def plots(rows, outdir) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        print(f"report: matplotlib unavailable ({e}); plots skipped (pip install matplotlib)", file=sys.stderr)
        return []
    made = []
    # attention core: dense batches (one L per batch) -> TFLOP/s and memory vs L per candidate
    series = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if not _ok(r):
            continue
        if r.get("suite") == "core" and str(r.get("batch", "")).startswith("dense"):
            key = f"core-{r['mode']}-{r['dtype']}"
        elif r.get("suite") == "model":
            key = f"model-{r['mode']}-{r['dtype']}-{r['model']}"
        else:
            continue
        series[key][r["candidate"]][r["L"]] = r
    for key, cands in sorted(series.items()):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for cand, pts in sorted(cands.items()):
            xs = sorted(pts)
            tf = [pts[x].get("tflops") if pts[x].get("kind") != "ceiling" else None for x in xs]
            mem = [(pts[x].get("peak_mem_bytes") or float("nan")) / 2**20 for x in xs]
            style = "--" if pts[xs[0]].get("kind") in ("ceiling",) else "-"
            if any(t is not None for t in tf):
                axes[0].plot(xs, [t if t is not None else float("nan") for t in tf], style, marker="o", label=cand)
            axes[1].plot(xs, mem, style, marker="o", label=cand)
        for ax, yl in zip(axes, ("TFLOP/s (useful FLOPs)", "peak memory (MiB, incremental)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length L (padded)")
            ax.set_ylabel(yl)
            ax.grid(True, alpha=0.3)
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.suptitle(key)
        fig.tight_layout()
        path = os.path.join(outdir, f"{key}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="pytest-benchmark JSON (pytest benchmarks/ --benchmark-json=...)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    help="results root (default benchmarks/results/)")
    ap.add_argument("--name", default=None, help="folder name (default <date>-<device>-<profile>)")
    ap.add_argument("--unique", action="store_true",
                    help="never overwrite: append -2, -3, ... when the folder already holds results")
    args = ap.parse_args(argv)
    data, rows = load(args.json)
    meta = data.get("deberta_fast", {})
    env = meta.get("env") or {}
    date = (meta.get("date") or datetime.datetime.now().isoformat())[:10]
    from benchmarks.envinfo import device_slug

    name = args.name or f"{date}-{device_slug(env) if env else 'unknown'}-{meta.get('profile', 'x')}"
    outdir = base = os.path.join(args.out, re.sub(r"[^A-Za-z0-9._-]+", "-", name))
    n = 1
    while args.unique and os.path.exists(os.path.join(outdir, "results.json")):
        n += 1
        outdir = f"{base}-{n}"
    os.makedirs(outdir, exist_ok=True)
    if os.path.abspath(args.json) != os.path.abspath(os.path.join(outdir, "results.json")):
        shutil.copyfile(args.json, os.path.join(outdir, "results.json"))
    with open(os.path.join(outdir, "env.json"), "w") as f:
        json.dump({"profile": meta.get("profile"), "date": meta.get("date"), **env}, f, indent=2)
    table = build_table(data, rows)
    made = plots(rows, outdir)
    if made:
        table += "\n## Plots\n\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in made) + "\n"
    with open(os.path.join(outdir, "table.md"), "w") as f:
        f.write(table)
    print(f"report: {len(rows)} results -> {outdir}/table.md ({len(made)} plots)")
    return outdir


if __name__ == "__main__":
    main()
