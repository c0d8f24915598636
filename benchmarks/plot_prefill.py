"""Plot the prefill kernel A/Bs to a PNG: the LLM prefill of llm_prefill.py (plain transformers' NemotronH and each
kernel variant of ours, seconds per token count) and the vision tower of vision_tower.py (the tower's own blocks and
the fused path under each SDPA backend, time per frame against the compute floor).

    python benchmarks/plot_prefill.py [--llm-json ...] [--vision-json ...] [--out ...]
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

# llm_prefill.py's records, in the order the kernels were added, with the labels the plot gives them.
LLM_SERIES = {
    "plain_torch_conv": "plain transformers (PyTorch conv, as installed)",
    "plain_causal_conv1d": "plain transformers + causal-conv1d",
    "ours_conv_kernel_only": "ours: causal-conv1d",
    "ours_norm_kernel": "+ Triton RMSNorm",
    "ours_norm_cudnn": "+ cuDNN attention (>= 32k tokens)",
    "ours": "+ one-pass squared ReLU, fused residual adds",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm-json", default="benchmarks/results/llm_prefill.json")
    p.add_argument("--vision-json", default="benchmarks/results/vision_tower.json")
    p.add_argument("--out", default="benchmarks/results/prefill_kernels.png")
    return p.parse_args(argv)


def plot_llm(ax, llm):
    tokens = [point["tokens"] for point in llm["points"]]
    for key, label in LLM_SERIES.items():
        ax.plot(tokens, [point[key]["s"] for point in llm["points"]], marker="o", label=label,
                linestyle="--" if key.startswith("plain") else "-")
    last = llm["points"][-1]
    ax.annotate(f"{last['speedup_of_ours']['plain_torch_conv']:.2f}x plain", (last["tokens"], last["ours"]["s"]),
                textcoords="offset points", xytext=(-70, -18))
    ax.set(xscale="log", xlabel="prompt tokens", ylabel="prefill (s)", xticks=tokens,
           title="LLM prefill, Nemotron-Nano-9B-v2 dims")
    ax.set_xticklabels([f"{t:,}" for t in tokens])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7)


def plot_vision(ax, vision):
    paths = vision["paths"]
    backends = [name.removeprefix("blocks_") for name in paths if name.startswith("blocks_")]
    width = 0.38
    for offset, (path, label) in enumerate([("blocks", "the tower's own blocks"), ("fused", "fused path")]):
        values = [paths[f"{path}_{backend}"].get("ms_per_frame", 0) for backend in backends]
        ax.bar([i + (offset - 0.5) * width for i in range(len(backends))], values, width, label=label)
    ax.axhline(vision["floor_ms_per_frame"], color="black", linestyle=":", label="compute floor")
    ax.set(xticks=range(len(backends)), ylabel="ms per frame", title="SigLIP so400m tower, 256-frame chunks")
    ax.set_xticklabels([f"SDPA {backend}" for backend in backends])
    ax.legend(fontsize=7)


def main(argv=None):
    args = parse_args(argv)
    with open(args.llm_json) as f:
        llm = json.load(f)
    with open(args.vision_json) as f:
        vision = json.load(f)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_llm(left, llm)
    plot_vision(right, vision)
    fig.suptitle(f"Prefill kernels, one {llm['meta'].get('gpu', 'GPU')}, bf16")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
