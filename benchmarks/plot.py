"""Plot benchmarks/results/long_video.json (from long_video.py) to a PNG.

    python benchmarks/plot.py [--json benchmarks/results/long_video.json] [--out benchmarks/results/long_video.png]
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"a": "tab:blue", "b": "tab:green", "c": "tab:red"}
LABELS = {"a": "Nano-9B hybrid", "b": "Nano-9B + TransV", "c": "Qwen2.5-7B arch"}
VARIANTS = {"as_is": "eager (dynamic cache)", "static_graph": "CUDA graph (static cache)"}
GIB = 2**30


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="benchmarks/results/long_video.json")
    p.add_argument("--out", default="benchmarks/results/long_video.png")
    args = p.parse_args()
    with open(args.json) as f:
        res = json.load(f)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    plot_peak_memory(axes[0, 0], res)
    plot_prefill_time(axes[0, 1], res)
    plot_prefill_split(axes[1, 0], res)
    plot_decode(axes[1, 1], res)
    fig.suptitle(f"TimeViper long-video benchmark, random bf16 weights, {res['meta'].get('gpu', '?')}", fontsize=12)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print("wrote", args.out)


def plot_peak_memory(ax, res):
    """Peak memory vs frames, with the linear fit up to the predicted maximum."""
    cap = res["meta"].get("memory_cap_bytes", 80e9)
    for name in "abc":
        runs = sorted((r for r in res["runs"] if r["config"] == name and not r.get("oom")), key=lambda r: r["frames"])
        if not runs:
            continue
        ax.plot([r["frames"] for r in runs], [r["peak_bytes"] / GIB for r in runs], "o-", color=COLORS[name],
                label=LABELS[name])
        ooms = [r["frames"] for r in res["runs"] if r["config"] == name and r.get("oom")]
        ax.plot(ooms, [cap / GIB] * len(ooms), "x", color=COLORS[name], ms=10)
        fit = res.get("fit", {}).get(name)
        if fit:
            xs = [fit["points"][0][0], fit["predicted_max_frames"]]
            ax.plot(xs, [(fit["intercept_bytes"] + fit["bytes_per_frame"] * x) / GIB for x in xs], ":",
                    color=COLORS[name])
            ax.annotate(f"max ≈{fit['predicted_max_frames'] / 1000:.0f}k", (fit["predicted_max_frames"], cap / GIB),
                        color=COLORS[name], fontsize=8, rotation=90, va="top")
    ax.axhline(cap / GIB, color="k", lw=0.8)
    ax.set(xlabel="frames (16 tokens/frame)", ylabel="peak GPU memory (GiB)",
           title="Peak memory, prefill + 16 tokens (x = OOM, dotted = linear fit)")
    ax.legend(fontsize=8)


def plot_prefill_time(ax, res):
    """Prefill time vs frames (vision extrapolated beyond the e2e points) and compute floors."""
    for name in "abc":
        runs = sorted((r for r in res["runs"] if r["config"] == name and not r.get("oom") and "prefill_e2e_s" in r),
                      key=lambda r: r["frames"])
        if not runs:
            continue
        ax.plot([r["frames"] for r in runs], [r["prefill_e2e_s"] for r in runs], "o-", color=COLORS[name],
                label=f"{LABELS[name]} measured")
        ax.plot([r["frames"] for r in runs], [r["floor_s"]["prefill"] for r in runs], "--", color=COLORS[name],
                alpha=0.6, label=f"{LABELS[name]} compute floor")
        ext = [r for r in runs if r.get("vision_extrapolated")]
        ax.plot([r["frames"] for r in ext], [r["prefill_e2e_s"] for r in ext], "s", mfc="none", color=COLORS[name])
    ax.set(xscale="log", yscale="log", xlabel="frames", ylabel="prefill time (s)",
           title="Prefill (vision + ToMe/proj + LLM); open squares: vision time extrapolated")
    ax.legend(fontsize=7)


def plot_prefill_split(ax, res):
    """Prefill split at the largest e2e frame count: measured phases beside their compute floors."""
    e2e = [r for r in res["runs"] if r["mode"] == "e2e" and not r.get("oom")]
    if not e2e:
        return
    frames = max(r["frames"] for r in e2e)
    rows = [next(r for r in e2e if r["config"] == n and r["frames"] == frames) for n in "abc"
            if any(r["config"] == n and r["frames"] == frames for r in e2e)]
    phases = [("vision", "vision tower"), ("tome_proj", "ToMe+projector"), ("llm", "LLM")]
    ticks, labels = [], []
    for x, r in enumerate(rows):
        bottom = 0
        for i, (key, label) in enumerate(phases):
            ax.bar(x, r[key + "_s"], bottom=bottom, color=f"C{i}", label=label if x == 0 else None)
            bottom += r[key + "_s"]
        ax.bar(x, r.get("other_prefill_s", 0), bottom=bottom, color="0.6", label="other" if x == 0 else None)
        floor_bottom = 0
        for i, (key, _) in enumerate(phases):
            ax.bar(x + 0.35, r["floor_s"][key], bottom=floor_bottom, color=f"C{i}", alpha=0.4, width=0.3)
            floor_bottom += r["floor_s"][key]
        ticks.append(x + 0.15)
        labels.append(f"{LABELS[r['config']]}\n{r['prefill_e2e_s'] / r['floor_s']['prefill']:.2f}x floor")
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set(ylabel="seconds", title=f"Prefill split at {frames} frames (left: measured, right: compute floor)")
    ax.legend(fontsize=8)


def plot_decode(ax, res):
    """Decode throughput vs the bandwidth floor."""
    dec = [d for d in res.get("decode", []) if not d.get("oom")]
    for x, d in enumerate(dec):
        ax.bar(x, d["tokens_per_s"], color=COLORS[d["config"]], alpha=1.0 if d["variant"] == "static_graph" else 0.5)
        ax.plot([x - 0.4, x + 0.4], [d["floor_tokens_per_s"]] * 2, "k-")
        ax.text(x, d["tokens_per_s"], f"{d['tokens_per_s']:.0f}\n{d['fraction_of_floor']:.0%}", ha="center",
                va="bottom", fontsize=7)
    labels = [f"{LABELS[d['config']]}\n{VARIANTS.get(d['variant'], d['variant'])} b={d['batch']}" for d in dec]
    ax.set_xticks(list(range(len(dec))), labels, fontsize=6, rotation=30, ha="right")
    ax.set(yscale="log", ylabel="decode tokens/s", title=f"Decode at {dec[0]['context'] if dec else '?'} context "
           "(black line: bandwidth floor, % = fraction of it)")


if __name__ == "__main__":
    main()
