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

WIDTH, HEIGHT = 720, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 210, 40, 60
STYLE = {"none": ("#1f77b4", "no compression"), "drop": ("#d62728", "drop"), "transv": ("#2ca02c", "TransV")}
DASHES = ("none", "6 3", "2 3")  # one per keep-ratio pair


def scale(value: float, low: float, high: float, start: float, end: float) -> float:
    return start + (value - low) / (high - low) * (end - start) if high > low else (start + end) / 2


def series(results: dict) -> dict:
    """(method, keep ratios) -> its runs by length; no compression first, then each ratio pair's drop and TransV."""
    grouped = {}
    for run in results["runs"]:
        key = (run["method"], tuple(run["keep_ratios"]) if run.get("keep_ratios") else None)
        grouped.setdefault(key, []).append(run)
    order = {method: i for i, method in enumerate(STYLE)}
    keys = sorted(grouped, key=lambda k: (k[1] is not None, tuple(-r for r in k[1] or ()), order[k[0]]))
    return {key: sorted(grouped[key], key=lambda r: r["num_frames"]) for key in keys}


def series_label(key) -> str:
    method, keep_ratios = key
    return STYLE[method][1] if keep_ratios is None else f"{STYLE[method][1]} {'/'.join(map(str, keep_ratios))}"


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
    all_series = series(results)
    pairs = list(dict.fromkeys(k[1] for k in all_series if k[1] is not None))
    for row, (key, runs) in enumerate(all_series.items()):
        method, keep_ratios = key
        color = STYLE[method][0]
        dash = DASHES[0 if keep_ratios is None else pairs.index(keep_ratios) % len(DASHES)]
        offset = (row - (len(all_series) - 1) / 2) * 3  # spread the series' markers apart where they coincide
        points = [(x_of(r["num_frames"]) + offset, y_of(r["mean"])) for r in runs]
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}" '
            f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}"/>'
        )
        for (x, y), run in zip(points, runs):
            top, bottom = y_of(min(100, run["mean"] + run["std"])), y_of(max(0, run["mean"] - run["std"]))
            parts.append(f'<line x1="{x:.1f}" y1="{top:.1f}" x2="{x:.1f}" y2="{bottom:.1f}" stroke="{color}"/>')
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"/>')
        legend_y = TOP + 20 * row + 10
        parts.append(
            f'<line x1="{plot_right + 10}" y1="{legend_y}" x2="{plot_right + 30}" y2="{legend_y}" stroke="{color}" '
            f'stroke-width="2" stroke-dasharray="{dash}"/>'
        )
        parts.append(f'<text x="{plot_right + 36}" y="{legend_y + 4}">{series_label(key)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def markdown_table(results: dict) -> str:
    """The README table: one row per length, mean +- std per series."""
    all_series = series(results)
    lengths = sorted({run["num_frames"] for run in results["runs"]})
    cells = {key: {r["num_frames"]: f"{r['mean']:.1f} ± {r['std']:.1f}" for r in runs} for key, runs in all_series.items()}
    lines = ["| frames | vision tokens | " + " | ".join(series_label(k) for k in all_series) + " |",
             "|---:|---:|" + "---:|" * len(all_series)]
    for frames in lengths:
        lines.append(f"| {frames} | {4 * frames} | " + " | ".join(cells[k].get(frames, "-") for k in all_series) + " |")
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
