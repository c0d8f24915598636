"""ToMe merging against a literal, loop-based transcription of the reference algorithm."""

import torch

from timeviper.modeling_timeviper import merge_tokens, tome_schedule


def reference_tome_frame(x: torch.Tensor, target: int, heads: int = 16) -> torch.Tensor:
    """Reference semantics, one frame at a time with Python loops: metric = mean over 16 channel groups,
    cosine, even/odd split, r best-matched even tokens merged into their odd partner by size-weighted average,
    output = unmerged evens (by descending score) then all odds."""
    sizes = [1.0] * x.shape[0]
    tokens = [row.clone() for row in x]
    while len(tokens) > target:
        p = len(tokens)
        r = min(p - target, p // 2)
        metric = [t.view(heads, -1).mean(0) for t in tokens]
        metric = [m / m.norm() for m in metric]
        evens, odds = list(range(0, p, 2)), list(range(1, p, 2))
        best = []
        for a in evens:
            scores = torch.stack([metric[a] @ metric[b] for b in odds])
            best.append((float(scores.max()), int(scores.argmax())))
        order = sorted(range(len(evens)), key=lambda i: -best[i][0])
        merged, unmerged = order[:r], order[r:]
        odd_sum = [tokens[b] * sizes[b] for b in odds]
        odd_size = [sizes[b] for b in odds]
        for i in merged:
            a, partner = evens[i], best[i][1]
            odd_sum[partner] = odd_sum[partner] + tokens[a] * sizes[a]
            odd_size[partner] += sizes[a]
        new_tokens = [tokens[evens[i]] for i in unmerged] + [s / n for s, n in zip(odd_sum, odd_size)]
        sizes = [sizes[evens[i]] for i in unmerged] + odd_size
        tokens = new_tokens
    return torch.stack(tokens)


def test_schedule_729_to_16_matches_reference():
    assert tome_schedule(729, 16) == [364, 182, 91, 46, 23, 7]
    assert tome_schedule(16, 16) == []
    assert sum(tome_schedule(100, 3)) == 97


def test_merge_matches_reference_transcription():
    torch.manual_seed(0)
    frames = torch.randn(3, 49, 32, dtype=torch.float64)
    actual = merge_tokens(frames, 6)
    expected = torch.stack([reference_tome_frame(frame, 6) for frame in frames])
    assert actual.shape == (3, 6, 32)
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=0)


def test_merge_preserves_the_size_weighted_mean():
    """Every patch is counted exactly once, so the size-weighted mean over tokens equals the patch mean."""
    torch.manual_seed(1)
    frames = torch.randn(2, 729, 64, dtype=torch.float64)
    sizes = torch.ones_like(frames[..., :1])
    from timeviper.modeling_timeviper import bipartite_soft_matching

    features = frames
    for r in tome_schedule(729, 16):
        features, sizes = bipartite_soft_matching(features, sizes, r)
    assert features.shape == (2, 16, 64) and torch.all(sizes.sum(1) == 729)
    torch.testing.assert_close((features * sizes).sum(1) / 729, frames.mean(1), atol=1e-10, rtol=0)


def test_gpu_benchmark_baseline_is_the_same_merge():
    """benchmarks/tome_determinism.py times the scatter_reduce form of ToMe against the model's; on the CPU (no
    atomics) both must give the same tokens, so the benchmark compares two orders of one sum."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tome_determinism.py"
    spec = importlib.util.spec_from_file_location("tome_determinism", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    torch.manual_seed(2)
    frames = torch.randn(3, 729, 64, dtype=torch.float64)
    torch.testing.assert_close(benchmark.merge_tokens_scatter(frames, 16), merge_tokens(frames, 16), atol=1e-12, rtol=0)
