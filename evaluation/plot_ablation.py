"""Plot the needle ablation (evaluation/synthetic_ablation.py) as an SVG: accuracy versus clip length, one line per
method, error bars of one standard deviation over the held-out sets. Plain SVG text, so it needs no plotting
library.

    python -m evaluation.plot_ablation evaluation/results/needle_ablation.json evaluation/results/needle_ablation.svg
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 150, 40, 60
STYLE = {"none": ("#1f77b4", "no compression"), "drop": ("#d62728", "dropping only"), "transv": ("#2ca02c", "TransV")}


def scale(value: float, low: float, high: float, start: float, end: float) -> float:
    return start + (value - low) / (high - low) * (end - start) if high > low else (start + end) / 2


def render(results: dict) -> str:
    lengths = sorted({run["num_frames"] for run in results["runs"]})
    low, high = math.log2(lengths[0]), math.log2(lengths[-1])
    plot_right, plot_bottom = WIDTH - RIGHT, HEIGHT - BOTTOM

    def x_of(frames):
        return scale(math.log2(frames), low, high, LEFT + 20, plot_right - 20)

    def y_of(accuracy):
        return scale(accuracy, 0, 100, plot_bottom, TOP)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2 - 60}" y="22" text-anchor="middle" font-size="14">Needle colour accuracy vs clip length</text>',
        f'<line x1="{LEFT}" y1="{plot_bottom}" x2="{plot_right}" y2="{plot_bottom}" stroke="black"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{plot_bottom}" stroke="black"/>',
    ]
    for accuracy in range(0, 101, 25):
        y = y_of(accuracy)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{plot_right}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{accuracy}</text>')
    chance = y_of(results.get("chance", 25.0))
    parts.append(f'<line x1="{LEFT}" y1="{chance:.1f}" x2="{plot_right}" y2="{chance:.1f}" stroke="#888" stroke-dasharray="4 4"/>')
    parts.append(f'<text x="{plot_right + 6}" y="{chance + 4:.1f}" fill="#888">chance</text>')
    for frames in lengths:
        x = x_of(frames)
        parts.append(f'<text x="{x:.1f}" y="{plot_bottom + 18}" text-anchor="middle">{frames}</text>')
    parts.append(f'<text x="{(LEFT + plot_right) / 2}" y="{HEIGHT - 15}" text-anchor="middle">clip length (frames, 1 fps; 4 vision tokens each)</text>')
    parts.append(f'<text x="18" y="{(TOP + plot_bottom) / 2}" text-anchor="middle" transform="rotate(-90 18 {(TOP + plot_bottom) / 2})">accuracy (%)</text>')
    for row, (method, (color, label)) in enumerate(STYLE.items()):
        runs = sorted((r for r in results["runs"] if r["method"] == method), key=lambda r: r["num_frames"])
        if not runs:
            continue
        offset = (row - 1) * 4  # spread the methods' markers apart where they coincide
        points = [(x_of(r["num_frames"]) + offset, y_of(r["mean"])) for r in runs]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}"/>')
        for (x, y), run in zip(points, runs):
            top, bottom = y_of(min(100, run["mean"] + run["std"])), y_of(max(0, run["mean"] - run["std"]))
            parts.append(f'<line x1="{x:.1f}" y1="{top:.1f}" x2="{x:.1f}" y2="{bottom:.1f}" stroke="{color}"/>')
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"/>')
        legend_y = TOP + 20 * row + 10
        parts.append(f'<line x1="{plot_right + 10}" y1="{legend_y}" x2="{plot_right + 30}" y2="{legend_y}" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{plot_right + 36}" y="{legend_y + 4}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def markdown_table(results: dict) -> str:
    """The README table: one row per length, mean +- std per method."""
    lengths = sorted({run["num_frames"] for run in results["runs"]})
    by_key = {(r["method"], r["num_frames"]): r for r in results["runs"]}
    methods = [m for m in STYLE if any(r["method"] == m for r in results["runs"])]
    lines = ["| frames | vision tokens | " + " | ".join(STYLE[m][1] for m in methods) + " |",
             "|---:|---:|" + "---:|" * len(methods)]
    for frames in lengths:
        cells = [f"{by_key[m, frames]['mean']:.1f} ± {by_key[m, frames]['std']:.1f}" if (m, frames) in by_key else "-" for m in methods]
        lines.append(f"| {frames} | {4 * frames} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="results JSON of evaluation.synthetic_ablation")
    parser.add_argument("svg", type=Path, help="where the plot goes")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    if not results.get("runs"):
        raise SystemExit(f"error: {args.results} has no runs")
    args.svg.write_text(render(results))
    print(markdown_table(results))


if __name__ == "__main__":
    main()
