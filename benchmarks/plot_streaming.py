"""Plot benchmarks/results/streaming_video.json (from streaming_video.py) to a PNG: file -> first token of the
streaming path against the one-shot path, split into phases, with host and GPU peaks.

    python benchmarks/plot_streaming.py [--json benchmarks/results/streaming_video.json] [--out ...png]
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="benchmarks/results/streaming_video.json")
    p.add_argument("--out", default="benchmarks/results/streaming_video.png")
    args = p.parse_args()
    res = json.load(open(args.json))
    file = res["file"]
    stream, one_shot = file["streaming"], file["one_shot"]
    gib = 2**30
    fig, (times, memory) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})

    # Streaming: decode runs in a thread under the vision tower, so its bar spans the vision phase.
    rows = [
        ("one-shot", [("decode + preprocess (all frames)", 0, one_shot["decode_and_preprocess_s"], "tab:orange"),
                      ("float32 pixels to the GPU", one_shot["decode_and_preprocess_s"],
                       one_shot["file_to_first_token_s"] - one_shot["decode_and_preprocess_s"]
                       - one_shot["vision_and_llm_s"], "tab:red"),
                      ("vision + LLM", one_shot["file_to_first_token_s"] - one_shot["vision_and_llm_s"],
                       one_shot["vision_and_llm_s"], "tab:blue")]),
        ("streaming", [("open (first chunk)", 0, stream["open_s"], "tab:gray"),
                       ("vision, decode overlapped", stream["open_s"], stream["vision_s_overlapped_with_decode"],
                        "tab:green"),
                       ("chunked LLM prefill", stream["open_s"] + stream["vision_s_overlapped_with_decode"],
                        stream["llm_prefill_s"], "tab:blue")]),
        ("decode alone", [("decode + resize", 0, file["decode_alone_s"], "tab:orange")]),
        ("GPU alone", [("vision + LLM", 0, file["gpu_alone_s"], "tab:blue")]),
    ]
    seen = set()
    for y, (_, parts) in enumerate(rows):
        for label, start, width, color in parts:
            times.barh(y, width, left=start, color=color, label=None if label in seen else label)
            seen.add(label)
        end = max(start + width for _, start, width, _ in parts)
        times.text(end + 0.3, y, f"{end:.1f} s", va="center")
    times.set_yticks(range(len(rows)), [name for name, _ in rows])
    times.invert_yaxis()
    times.set_xlabel("seconds from the file to the first answer token")
    spec = file["file"]
    times.set_title(f"{file['frames']:,} frames: {spec['size']} H.264, {spec['seconds']} s at {spec['fps']} fps, "
                    f"GOP {spec['gop']}")
    times.legend(fontsize=8, loc="lower right")

    labels = ["host peak RSS", "GPU peak"]
    memory.bar([0, 2], [one_shot["host_peak_rss_bytes"] / gib, one_shot["gpu_peak_bytes"] / gib], color="tab:orange",
               label="one-shot")
    memory.bar([0.8, 2.8], [stream["host_peak_rss_bytes"] / gib, stream["gpu_peak_bytes"] / gib], color="tab:green",
               label="streaming")
    memory.set_xticks([0.4, 2.4], labels)
    memory.set_ylabel("GiB")
    memory.legend(fontsize=8)
    memory.set_title("memory (same process, streaming first)")
    fig.suptitle(f"TimeViper file -> first token, {res['meta'].get('gpu', '?')}, Nano-9B-v2 + TransV (random weights)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
