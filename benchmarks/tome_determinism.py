"""ToMe on the GPU: is the merge repeatable bit for bit, and what does it cost?

Runs the model's `merge_tokens` (merged tokens summed through a 0/1 assignment matmul) and, as the baseline in the
same process, the same rounds summed with `scatter_reduce` (what the model did before, and what the reference code
does) on SigLIP-sized features: 256 frames x 729 tokens x 1152 channels in bf16, 729 -> 16 tokens per frame.

    PYTHONPATH=/path/with/timeviper/link python benchmarks/tome_determinism.py --out tome.json
"""

import argparse
import json
import time
from pathlib import Path

import torch

from timeviper.modeling_timeviper import match_tokens, merge_tokens, tome_schedule


def merge_tokens_scatter(features: torch.Tensor, target: int) -> torch.Tensor:
    """The baseline: the model's ToMe rounds (its `match_tokens`) with the destination sums done by scatter_reduce
    (atomics on CUDA)."""
    sizes = torch.ones_like(features[..., :1])
    for r in tome_schedule(features.shape[1], target):
        unmerged, merged, partner = match_tokens(features, r)

        def merge(x):
            src, dst = x[:, ::2], x[:, 1::2]
            width = x.shape[-1]
            kept = src.gather(1, unmerged.expand(-1, -1, width))
            moved = src.gather(1, merged.expand(-1, -1, width))
            return torch.cat([kept, dst.scatter_reduce(1, partner.expand(-1, -1, width), moved, reduce="sum")], 1)

        weighted, sizes = merge(features * sizes), merge(sizes)
        features = weighted / sizes
    return features


def measure(merge, features, repeats: int) -> dict:
    first = merge(features, 16)
    differing, times = 0, []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        again = merge(features, 16)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        differing += not torch.equal(first, again)
    return {"repeats": repeats, "repeats_differing_from_first": differing,
            "median_ms": sorted(times)[len(times) // 2] * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--frames", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    features = torch.randn(args.frames, 729, 1152, device="cuda", dtype=torch.bfloat16)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "frames": args.frames,
              "assignment_matmul": measure(merge_tokens, features, args.repeats),
              "scatter_reduce": measure(merge_tokens_scatter, features, args.repeats)}
    a, b = merge_tokens(features, 16).float(), merge_tokens_scatter(features, 16).float()
    report["max_abs_diff_between_them"] = (a - b).abs().max().item()
    report["max_abs_value"] = a.abs().max().item()
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
