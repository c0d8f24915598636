"""Accuracy versus video length on held-out needle clips (training/synthetic.py): no compression, dropping only, and
TransV at the same keep ratios (`--keep-ratios`), with the evaluation harness (`evaluation.run_eval.build_model_answer_fn`,
`evaluation.tasks.run_items`, `compute_metrics`).

    ./timeviper.sh python -m evaluation.synthetic_ablation --out evaluation/results/needle_ablation.json

Each length gets `--num-sets` independent sets of `--clips-per-set` held-out clips (seeds never used in training);
the spread is the standard deviation of the per-set accuracies. Every frame of a clip is sampled (one per second,
`max_frames` = the length), so a clip of N frames puts 4N vision tokens into the LLM. The three methods run the
same weights with a different `token_compression` in the checkpoint's config.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from evaluation.run_eval import build_model_answer_fn
from evaluation.tasks import FrameSampling, compute_metrics, run_items
from inference.trained_default import MODEL_DIR, materialize_checkpoint
from training.synthetic import HELD_OUT_SEED_START, NeedleClip

REPO = Path(__file__).resolve().parents[1]
# The TransV stages of the trained schedule (training/train_default.py): uniform before block 3, attention-guided
# before block 6. "drop" keeps the same tokens and leaves the TransV weights unused (dropped tokens are discarded).
TRAINED_KEEP_RATIOS = (0.5, 0.1)
TRAINED_BLOCKS = (3, 6)
# Evaluation seeds: disjoint from training (below HELD_OUT_SEED_START) and from the tests' and ask's held-out clips.
ABLATION_SEED_START = HELD_OUT_SEED_START + 100_000
SEEDS_PER_SET = 10_000


def schedules(keep_ratios: list[tuple[float, float]],
              blocks: tuple[int, int] = TRAINED_BLOCKS) -> list[tuple[str, tuple | None, str]]:
    """(method, keep ratios, token_compression) for no compression, then dropping and TransV at each ratio pair.

    TransV stage i always runs the weights trained for stage i (before block 3 or 6); other `blocks` move them."""
    uniform, attention = blocks
    rows = [("none", None, "none")]
    for first, second in keep_ratios:
        rows.append(("drop", (first, second), f"unidrop_{uniform}_{first}-attndrop_{attention}_{second}"))
        rows.append(("transv", (first, second), f"uni_{uniform}_{first}-attn_{attention}_{second}"))
    return rows


def held_out_records(video_dir: Path, num_frames: int, set_index: int, clips_per_set: int) -> list[dict]:
    start = ABLATION_SEED_START + set_index * SEEDS_PER_SET
    records = []
    for seed in range(start, start + clips_per_set):
        clip = NeedleClip.draw(seed, num_frames)
        path = clip.write_video(video_dir / f"{num_frames:05d}f_{seed}.mp4")
        records.append(clip.mcq_record(str(path)))
    return records


def evaluate(args) -> dict:
    model = args.model.resolve()
    results = {
        "model": str(model.relative_to(REPO)) if model.is_relative_to(REPO) else str(args.model),
        "blocks": args.blocks, "lengths": args.lengths, "num_sets": args.num_sets,
        "clips_per_set": args.clips_per_set, "chance": 25.0, "runs": [],
    }
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for num_frames in args.lengths:
            sampling = FrameSampling(fps=1.0, max_frames=num_frames, min_frames=min(num_frames, 32), rule="auto")
            sets = [held_out_records(scratch / "videos", num_frames, s, args.clips_per_set) for s in range(args.num_sets)]
            for method, keep_ratios, schedule in schedules(args.keep_ratios, args.blocks):
                folder = materialize_checkpoint(scratch / "models" / schedule, args.model, schedule)
                answer_fn = build_model_answer_fn(str(folder), "mcq", sampling, max_new_tokens=3, device="cpu",
                                                  dtype="float32")
                accuracies, seconds = [], time.perf_counter()
                for s, records in enumerate(sets):
                    output = scratch / "predictions" / f"{schedule}_{num_frames}_{s}.jsonl"
                    run_items(records, answer_fn, output, "mcq", sampling)
                    lines = [json.loads(line) for line in output.read_text().splitlines()]
                    accuracies.append(compute_metrics("mcq", lines)["accuracy"])
                seconds = (time.perf_counter() - seconds) / (len(sets) * args.clips_per_set)
                run = {
                    "method": method, "keep_ratios": keep_ratios, "token_compression": schedule,
                    "num_frames": num_frames, "vision_tokens": 4 * num_frames,
                    "set_accuracies": accuracies, "mean": statistics.mean(accuracies),
                    "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0, "seconds_per_clip": seconds,
                }
                results["runs"].append(run)
                print(f"{schedule:>30} {num_frames:>5} frames: {run['mean']:5.1f} % +- {run['std']:4.1f} ({seconds:.2f} s/clip)", flush=True)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL_DIR, help="trained model folder (default: the shipped one)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512, 2048], help="clip lengths in frames")
    parser.add_argument("--num-sets", type=int, default=3, help="independent held-out sets per length (the spread)")
    parser.add_argument("--clips-per-set", type=int, default=20)
    parser.add_argument(
        "--keep-ratios", nargs="+", default=[",".join(map(str, TRAINED_KEEP_RATIOS))],
        help="keep-ratio pairs 'FIRST,SECOND' (before blocks 3 and 6) for dropping and TransV (default: the trained 0.5,0.1)",
    )
    parser.add_argument(
        "--blocks", default=",".join(map(str, TRAINED_BLOCKS)),
        help="blocks of the uniform and the attention-guided stage (default: the trained 3,6; the second must be attention)",
    )
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    args = parser.parse_args(argv)
    try:
        args.keep_ratios = [tuple(float(r) for r in pair.split(",")) for pair in args.keep_ratios]
    except ValueError:
        parser.error(f"--keep-ratios takes pairs like 0.5,0.1, got {args.keep_ratios}")
    try:
        args.blocks = tuple(int(b) for b in args.blocks.split(","))
    except ValueError:
        parser.error(f"--blocks takes two block indices like 3,6, got {args.blocks!r}")
    if len(args.blocks) != 2:
        parser.error(f"--blocks takes two block indices like 3,6, got {args.blocks}")
    if any(len(pair) != 2 or not 1 > pair[0] > pair[1] > 0 for pair in args.keep_ratios):
        parser.error(f"--keep-ratios: each pair needs 1 > first > second > 0, got {args.keep_ratios}")
    if min(args.lengths) < 2 or args.num_sets < 1 or args.clips_per_set < 1:
        parser.error("--lengths must be at least 2 frames, --num-sets and --clips-per-set at least 1")
    return args


def main(argv=None):
    import torch

    args = parse_args(argv)
    torch.set_num_threads(1)  # the machine's other cores are busy; more threads only contend
    results = evaluate(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
