"""Plot the multi-GPU benchmark's step times (against the step's floor) and peak memory per GPU, one bar per results
file, to a PNG.

    PYTHONPATH=. python benchmarks/multi_gpu/plot.py benchmarks/multi_gpu/results/{fsdp,fsdp_profiled,zero3,\\
        zero3_profiled,zero3_memory_efficient_linear_on}.json --out benchmarks/multi_gpu/results/step_time.png
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from floor import step_floor  # noqa: E402
from report import ENGINE_LABELS  # noqa: E402

COLORS = {"fsdp": "tab:blue", "zero3": "tab:orange"}


def bars(paths: list[str]) -> list[dict]:
    """One bar per engine of each results file: label, median / fastest / slowest of steps 2-N, peak GiB, floor."""
    rows = []
    for path in paths:
        results = json.loads(Path(path).read_text())
        for engine, result in results["engines"].items():
            s = result["summary"]
            steps = [step["step_s"] for step in result["ranks"][0]["steps"][1:] if not step.get("profiled")]
            floor = step_floor(results["prepared"], s["device"], s["world_size"])
            rows.append({"label": f"{ENGINE_LABELS[engine]}\n{Path(path).stem}", "engine": engine,
                         "median": s["median_step_s"], "low": min(steps), "high": max(steps),
                         "peak_gib": max(m["max_allocated_gib"] for m in s["peak_train"].values()),
                         "floor": floor["floor_s"] if floor else None, "device": f"{s['world_size']}x {s['device']}"})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results JSON files of run.sh")
    p.add_argument("--out", default="benchmarks/multi_gpu/results/step_time.png")
    args = p.parse_args()
    rows = bars(args.results)
    labels = [row["label"] for row in rows]
    colors = [COLORS[row["engine"]] for row in rows]
    fig, (steps, memory) = plt.subplots(1, 2, figsize=(13, 0.9 * len(rows) + 1.5), sharey=True)

    medians = [row["median"] for row in rows]
    spread = [[row["median"] - row["low"] for row in rows], [row["high"] - row["median"] for row in rows]]
    steps.barh(labels, medians, xerr=spread, color=colors, capsize=3)
    for y, row in enumerate(rows):
        steps.text(row["median"] / 2, y, f"{row['median']:.2f} s" + (f"\n{row['median'] / row['floor']:.1f}x floor"
                                                                     if row["floor"] else ""),
                   va="center", ha="center", color="white", fontsize=8)
    floors = {row["floor"] for row in rows if row["floor"]}
    for floor in floors:
        steps.axvline(floor, color="black", linestyle="--", linewidth=1)
        steps.text(floor, len(rows) - 0.5, f" floor {floor:.2f} s", fontsize=8, va="bottom")
    steps.set_xlabel("optimizer step (s): median of steps 2-N, whiskers fastest / slowest")
    steps.invert_yaxis()

    memory.barh(labels, [row["peak_gib"] for row in rows], color=colors)
    for y, row in enumerate(rows):
        memory.text(row["peak_gib"] / 2, y, f"{row['peak_gib']:.1f} GiB", va="center", ha="center", color="white",
                    fontsize=8)
    memory.set_xlabel("peak allocated GiB per GPU (training)")
    fig.suptitle(f"TimeViper full-size fine-tuning, {rows[0]['device']}: 256-frame videos, batch 1 per GPU")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
