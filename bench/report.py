"""Turn a pytest-benchmark JSON of ``bench/test_conv_benchmarks.py`` into a Markdown table and plots.

    python -m bench.report RESULTS.json [--out DIR]

Writes DIR/report.md (speed-up of every backend against dense ``nn.Conv2d`` in the same layout, per
layer, rank and layout), DIR/speedup_vs_rank.png (one panel per layer) and DIR/roofline.png (every
backend placed by arithmetic intensity and achieved throughput, under the measured roofline).
DIR defaults to the JSON's folder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict

CP_BACKENDS = ("reference", "cpu", "compiled-reference", "fused")


def save_results(out: str, stem: str, data: dict, markdown: str) -> None:
    """``out/stem.json`` and ``out/stem.md``, and the markdown on stdout."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(markdown)
    print(markdown)


def load_rows(path: str) -> tuple[list[dict], dict]:
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "backend" not in info or not b.get("stats"):
            continue
        rows.append({**info, "median_s": b["stats"]["median"]})
    return rows, data.get("machine_info", {})


def speedup_table(rows: list[dict]) -> list[dict]:
    """One entry per (layer, rank, layout): dense time and each CP backend's time and speed-up."""
    by_key = defaultdict(dict)
    for r in rows:
        rank = f"T{r['rank'][0]}x{r['rank'][1]}" if isinstance(r["rank"], list) else r["rank"]  # Tucker-2 pairs
        by_key[(r["layer"], rank, r["layout"])][r["backend"]] = r
    table = []
    for (layer, rank, layout), backends in by_key.items():
        dense = backends.get("dense")
        four_stage = backends.get("reference")
        entry = {"layer": layer, "rank": rank, "layout": layout,
                 "dense_ms": dense["median_s"] * 1e3 if dense else None,
                 "mac_ratio": four_stage["dense_macs"] / four_stage["macs"] if four_stage else None}
        for name in CP_BACKENDS:
            if name in backends:
                entry[f"{name}_ms"] = backends[name]["median_s"] * 1e3
                entry[f"{name}_speedup"] = dense["median_s"] / backends[name]["median_s"] if dense else None
        table.append(entry)
    order = {name: i for i, name in enumerate(dict.fromkeys(r["layer"] for r in rows))}
    tucker2 = [e for e in table if isinstance(e["rank"], str)]
    cp = [e for e in table if not isinstance(e["rank"], str)]
    return (sorted(cp, key=lambda e: (order[e["layer"]], e["rank"], e["layout"]))
            + sorted(tucker2, key=lambda e: (order[e["layer"]], int(e["rank"][1:].split("x")[0]), e["layout"])))


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def to_markdown(table: list[dict], rows: list[dict]) -> str:
    first = rows[0] if rows else {}
    present = [b for b in CP_BACKENDS if any(f"{b}_ms" in e for e in table)]
    lines = [
        "# Benchmark report",
        "",
        f"Device: {first.get('device', '?')}; torch {first.get('torch', '?')}, triton {first.get('triton', '?')}, "
        f"cuDNN {first.get('cudnn', '-')}; commit {str(first.get('git_commit', '?'))[:10]}; dtype "
        f"{first.get('dtype', '?')}. Speed-up = dense nn.Conv2d median / backend median, same layout.",
        "",
        "| layer | rank | layout | MAC ratio | dense ms | " + " | ".join(f"{b} ms (×)" for b in present) + " |",
        "|---|---|---|---|---|" + "---|" * len(present),
    ]
    for e in table:
        cells = [f"{_fmt(e.get(f'{b}_ms'), '.3f')} ({_fmt(e.get(f'{b}_speedup'), '.2f')}×)" for b in present]
        lines.append(f"| {e['layer']} | {e['rank']} | {e['layout']} | {_fmt(e['mac_ratio'], '.1f')} | "
                     f"{_fmt(e['dense_ms'], '.3f')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_speedups(table: list[dict], path: str) -> None:
    # optional: the plots only (matplotlib comes with the test and bench extras); Agg is chosen before
    # pyplot loads, so no display is needed
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(e["layer"] for e in table))
    cols = min(4, len(layers)) or 1
    rows_n = math.ceil(len(layers) / cols) or 1
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3 * rows_n), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        for backend in CP_BACKENDS:
            for layout, style in (("nchw", "-o"), ("channels_last", "--s")):
                pts = [(e["rank"], e[f"{backend}_speedup"]) for e in table  # CP ranks (Tucker-2 is in the table)
                       if e["layer"] == layer and e["layout"] == layout and e.get(f"{backend}_speedup")
                       and not isinstance(e["rank"], str)]
                if pts:
                    ax.plot(*zip(*sorted(pts)), style, label=f"{backend} {layout}", markersize=3)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(layer, fontsize=8)
        ax.set_xlabel("rank")
        ax.set_ylabel("speed-up vs dense")
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roofline(rows: list[dict], path: str) -> None:
    # optional: the plots only (matplotlib comes with the test and bench extras); Agg is chosen before
    # pyplot loads, so no display is needed
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for backend in ("dense",) + CP_BACKENDS:
        pts = [(2 * r["macs"] / r["min_bytes"], 2 * r["macs"] / r["median_s"] / 1e12)
               for r in rows if r["backend"] == backend]
        if pts:
            ax.scatter(*zip(*pts), label=backend, s=12)
    peaks = next((r["peaks"] for r in rows if r.get("peaks")), None)
    if peaks:
        bw, flops = peaks["copy_bytes_per_s"], peaks["matmul_flop_per_s"]
        xs = [10 ** (k / 10) for k in range(-10, 41)]
        ax.plot(xs, [min(flops, bw * x) / 1e12 for x in xs], "k-", linewidth=1,
                label=f"roofline (measured: {bw / 1e9:.0f} GB/s, {flops / 1e12:.2f} TFLOP/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOPs per minimal byte (X + Y)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"Roofline: {rows[0].get('device', '') if rows else ''}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Markdown table and plots from a benchmark JSON.")
    parser.add_argument("results", help="the --benchmark-json file of bench/test_conv_benchmarks.py")
    parser.add_argument("--out", help="output folder (default: the JSON's folder)")
    args = parser.parse_args(argv)
    rows, _ = load_rows(args.results)
    if not rows:
        raise SystemExit(f"{args.results} holds no timed benchmarks (was it run with --benchmark-disable?)")
    out = args.out or os.path.dirname(os.path.abspath(args.results))
    os.makedirs(out, exist_ok=True)
    table = speedup_table(rows)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(to_markdown(table, rows))
    plot_speedups(table, os.path.join(out, "speedup_vs_rank.png"))
    plot_roofline(rows, os.path.join(out, "roofline.png"))
    print(f"wrote {out}/report.md, speedup_vs_rank.png, roofline.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
