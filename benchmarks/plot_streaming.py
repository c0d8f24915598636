"""Plot the file -> first token benchmark (streaming_video.py) to a PNG: the 3,000-frame file (streaming path against
the one-shot path, split into phases, with host and GPU peaks), each long file's points (streaming path, decode
alone, GPU alone, and the streaming path's peaks), and the LLM-side points at large frame counts (GPU peak against
the 79 GiB cap of an 80 GB H100).

    python benchmarks/plot_streaming.py [--json ...] [--long-json A.json B.json] [--llm-json A.json B.json]
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GIB = 2**30


def streaming_row(stream):
    """Decoding runs in a thread under the vision tower, so the vision bar spans it."""
    return ("streaming", [("open (first chunk)", 0, stream["open_s"], "tab:gray"),
                          ("vision, decode overlapped", stream["open_s"], stream["vision_s_overlapped_with_decode"],
                           "tab:green"),
                          ("chunked LLM prefill", stream["open_s"] + stream["vision_s_overlapped_with_decode"],
                           stream["llm_prefill_s"], "tab:blue")])


def one_shot_row(one_shot):
    pixels_s = one_shot["file_to_first_token_s"] - one_shot["decode_and_preprocess_s"] - one_shot["vision_and_llm_s"]
    return ("one-shot", [("decode + preprocess (all frames)", 0, one_shot["decode_and_preprocess_s"], "tab:orange"),
                         ("float32 pixels to the GPU", one_shot["decode_and_preprocess_s"], pixels_s, "tab:red"),
                         ("vision + LLM", one_shot["file_to_first_token_s"] - one_shot["vision_and_llm_s"],
                          one_shot["vision_and_llm_s"], "tab:blue")])


def alone_rows(record):
    return [("decode alone", [("decode + resize", 0, record["decode_alone_s"], "tab:orange")]),
            ("GPU alone", [("vision + LLM", 0, record["gpu_alone_s"], "tab:blue")])]


def draw_times(ax, rows, title):
    seen = set()
    for y, (_, parts) in enumerate(rows):
        for label, start, width, color in parts:
            ax.barh(y, width, left=start, color=color, label=None if label in seen else label)
            seen.add(label)
        end = max(start + width for _, start, width, _ in parts)
        ax.text(end, y, f" {end:.1f} s", va="center")
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds from the file to the first answer token")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")


def draw_memory(ax, paths):
    """paths: [(label, record with host_peak_rss_bytes and gpu_peak_bytes, colour)]."""
    width = 0.8 / len(paths)
    for i, (label, record, color) in enumerate(paths):
        ax.bar([i * width, 2 + i * width], [record["host_peak_rss_bytes"] / GIB, record["gpu_peak_bytes"] / GIB],
               width=width, color=color, label=label)
    ax.set_xticks([0.4 - width / 2, 2.4 - width / 2], ["host peak RSS", "GPU peak"])
    ax.set_ylabel("GiB")
    ax.legend(fontsize=8)


def file_title(frames, spec):
    return f"{frames:,} frames: {spec['size']} H.264, {spec['seconds']} s at {spec['fps']} fps, GOP {spec['gop']}"


def draw_llm_points(ax, records, limit_bytes):
    """records: [(config, llm record, card name)] of `--steps llm` runs that fit; limit_bytes: the memory they had."""
    labels = [f"config {config}, {r['frames']:,} frames\n({r['tokens_in'] / 1e6:.1f}M tokens, {card})"
              for config, r, card in records]
    for i, (_, r, _) in enumerate(records):
        ax.bar(i - 0.2, r["gpu_peak_bytes"] / GIB, width=0.4, color="tab:blue", label=None if i else "peak allocated")
        ax.bar(i + 0.2, r["gpu_reserved_peak_bytes"] / GIB, width=0.4, color="tab:cyan",
               label=None if i else "peak reserved")
        ax.text(i, r["gpu_reserved_peak_bytes"] / GIB, f"{r['prefill_and_first_token_s']:.0f} s to the first token",
                ha="center", va="bottom", fontsize=8)
    ax.axhline(limit_bytes / GIB, color="tab:red", linestyle="--",
               label=f"GPU memory the runs had ({limit_bytes / GIB:.0f} GiB)")
    ax.set_xticks(range(len(records)), labels, fontsize=8)
    ax.set_ylabel("GiB")
    ax.set_ylim(0, 90)
    ax.set_title("LLM side, features streamed into the chunked prefill", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="benchmarks/results/streaming_video.json")
    p.add_argument("--long-json", nargs="*", default=["benchmarks/results/streaming_video_long.json",
                                                       "benchmarks/results/streaming_video_long_1080p.json"])
    p.add_argument("--llm-json", nargs="*", default=["benchmarks/results/streaming_llm_a_100k.json",
                                                      "benchmarks/results/streaming_llm_b_200k.json"])
    p.add_argument("--out", default="benchmarks/results/streaming_video.png")
    args = p.parse_args()
    res = json.load(open(args.json))
    long_runs = [json.load(open(path)) for path in args.long_json if os.path.exists(path)]
    llm_runs = [json.load(open(path)) for path in args.llm_json if os.path.exists(path)]
    # Only what fitted: an out-of-memory record has no time and no reserved peak.
    llm_records = [(run["config"], record, run["meta"].get("gpu", "?")) for run in llm_runs for record in run["llm"]
                   if not record["oom"]]
    limits = {run["meta"].get("memory_cap_bytes") or run["meta"]["gpu_total_bytes"] for run in llm_runs}
    if len(limits) > 1:
        raise SystemExit(f"the --llm-json runs had different GPU memory limits {sorted(limits)}: plot them apart")
    rows = 1 + sum(len(run["long_file"]["points"]) for run in long_runs) + bool(llm_records)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.2 * rows), gridspec_kw={"width_ratios": [2.2, 1]}, squeeze=False)

    file = res["file"]
    draw_times(axes[0, 0], [one_shot_row(file["one_shot"]), streaming_row(file["streaming"])] + alone_rows(file),
               file_title(file["frames"], file["file"]))
    draw_memory(axes[0, 1], [("one-shot", file["one_shot"], "tab:orange"),
                             ("streaming", file["streaming"], "tab:green")])
    axes[0, 1].set_title("memory (same process, streaming first)", fontsize=10)
    row = 1
    for run in long_runs:
        for point in run["long_file"]["points"]:
            draw_times(axes[row, 0], [streaming_row(point["streaming"])] + alone_rows(point),
                       file_title(point["frames"], run["long_file"]["file"])
                       + f", sampled at {point['sample_fps']:g} fps ({run['meta'].get('gpu', '?')})")
            draw_memory(axes[row, 1], [("streaming", point["streaming"], "tab:green")])
            axes[row, 1].set_title("memory (streaming; no one-shot at this length)", fontsize=9)
            row += 1
    if llm_records:
        draw_llm_points(axes[row, 0], llm_records, limits.pop())
        axes[row, 1].axis("off")
    fig.suptitle(f"TimeViper file -> first token, {res['meta'].get('gpu', '?')} unless named, config b "
                 "(Nano-9B-v2 + TransV) unless named, random weights")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
