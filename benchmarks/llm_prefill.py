"""LLM prefill side by side with plain transformers: `NemotronHForCausalLM` and this package's hybrid LLM on the same
random bf16 weights (Nano-9B-v2 dims), in one process on one GPU. Plain transformers runs as it builds itself (with
causal-conv1d's CUDA kernel when installed: its kernel path is fixed at import); ours runs with the depthwise causal
conv through that kernel and through PyTorch (switched by our module-level kernel handle).

Also the kernel-vs-PyTorch parity of the conv at full dims (4,096 tokens, continued from a conv state, as a chunked
prefill does) and of the whole LLM's last-token logits.

    source benchmarks/gpu_setup.sh && python benchmarks/llm_prefill.py --out benchmarks/results/llm_prefill.json
"""

import argparse
import contextlib
import os
import sys
from statistics import median_high

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import TINY_NANO, TINY_VISION, log, meta, save, timed  # noqa: E402
from long_video import profile_region  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/llm_prefill.json")
    p.add_argument("--tokens", default="16384,65536")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (after one warm-up); the median counts")
    p.add_argument("--tiny", action="store_true",
                   help="tiny dims: a quick check of the script (it needs CUDA: the conv kernel is CUDA-only)")
    p.add_argument("--memory-cap-gib", type=float, default=79.0, help="as in long_video.py (H200 -> 80 GB H100)")
    p.add_argument("--profile-tokens", type=int, default=16384,
                   help="profile one prefill of ours (causal-conv1d) at this length into the JSON; 0: none")
    p.add_argument("--profile-out", default=None, help="text file for the profiler table (default: next to --out)")
    args = p.parse_args(argv)
    args.profile_out = args.profile_out or os.path.join(os.path.dirname(args.out) or ".", "profiles.txt")
    return args


def models(tiny, device):
    """Plain transformers' NemotronH and ours, sharing every weight tensor (no second copy of the model)."""
    from transformers import NemotronHForCausalLM

    from timeviper.configuration_timeviper import TimeViperConfig, nano_9b_v2_text_config, so400m_vision_config
    from timeviper.modeling_timeviper import TimeViperForConditionalGeneration

    text = nano_9b_v2_text_config(**(TINY_NANO if tiny else {}))
    vision = so400m_vision_config(**TINY_VISION)
    torch.manual_seed(0)
    with torch.device(device):
        plain = NemotronHForCausalLM._from_config(text, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
        config = TimeViperConfig(vision_config=vision, text_config=text, token_compression=[],
                                 image_token_id=text.vocab_size, video_token_id=text.vocab_size + 1)
        ours = TimeViperForConditionalGeneration._from_config(config, dtype=torch.bfloat16,
                                                               attn_implementation="sdpa").eval()
    shared = {("model.language_model." + k.removeprefix("model.")) if k.startswith("model.") else k: v
              for k, v in plain.state_dict().items()}
    missing, unexpected = ours.load_state_dict(shared, strict=False, assign=True)
    assert not unexpected and not [k for k in missing if k.startswith("model.language_model.")], (missing, unexpected)
    # Both follow the checkpoint's dt limits the same way (transformers' default clamps dt at time_step_min).
    for layer in plain.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = tuple(text.time_step_limit)
    return plain.requires_grad_(False), ours.requires_grad_(False)


@contextlib.contextmanager
def conv_kernel(enabled):
    """causal-conv1d on or off for our model (its module-level handle of the kernel)."""
    import timeviper.modeling_timeviper as our_module

    saved = our_module.causal_conv1d_fn
    assert saved is not None, "causal-conv1d is not installed (benchmarks/build_causal_conv1d.sh, gpu_setup.sh)"
    try:
        our_module.causal_conv1d_fn = saved if enabled else None
        yield
    finally:
        our_module.causal_conv1d_fn = saved


def timed_prefill(model, embeds, repeats):
    """Median seconds of `repeats` prefills after a warm-up one, and the last one's last-token logits."""
    times = []
    for _ in range(repeats + 1):
        seconds, out = timed(embeds.device, lambda: model(inputs_embeds=embeds, logits_to_keep=1, use_cache=False))
        times.append(seconds)
        logits = out.logits[:, -1].float()
        del out
    return median_high(times[1:]), logits


def conv_parity(ours, device, tokens=4096):
    """One mixer's conv through the kernel and through PyTorch: the whole sequence, and the same sequence as two
    chunks carrying the conv state; outputs and final states."""
    mixer = next(layer.mixer for layer in ours.model.language_model.layers if hasattr(layer, "mixer")
                 and hasattr(layer.mixer, "convolve"))
    torch.manual_seed(1)
    xbc = torch.randn(2, tokens, mixer.conv_dim, device=device, dtype=torch.bfloat16)
    results = {}
    for label, enabled in (("kernel", True), ("torch", False)):
        with conv_kernel(enabled):
            whole, state = mixer.convolve(xbc, None)
            first, carried = mixer.convolve(xbc[:, : tokens // 2 + 3], None)
            second, state2 = mixer.convolve(xbc[:, tokens // 2 + 3 :], carried)
        results[label] = (whole.float(), state.float(), torch.cat([first, second], 1).float(), state2.float())
    k, t = results["kernel"], results["torch"]
    return {"tokens": tokens, "out_max_abs_diff": (k[0] - t[0]).abs().max().item(),
            "out_max_abs": t[0].abs().max().item(),
            "final_state_max_abs_diff": (k[1] - t[1]).abs().max().item(),
            "chunked_out_max_abs_diff_vs_whole_kernel": (k[2] - k[0]).abs().max().item(),
            "chunked_state_max_abs_diff_vs_whole_kernel": (k[3] - k[1]).abs().max().item(),
            "chunked_out_max_abs_diff_kernel_vs_torch": (k[2] - t[2]).abs().max().item()}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda")
    torch.set_grad_enabled(False)
    results = {"meta": meta(device, args), "points": []}
    plain, ours = models(args.tiny, device)
    hidden = plain.config.hidden_size
    results["conv_parity"] = conv_parity(ours, device)
    log("conv parity", results["conv_parity"])
    for tokens in [int(t) for t in args.tokens.split(",")]:
        torch.manual_seed(2)
        embeds = 0.02 * torch.randn(1, tokens, hidden, device=device, dtype=torch.bfloat16)
        point, logits = {"tokens": tokens}, {}
        # Plain transformers as it builds itself (with causal-conv1d, which conv_kernel requires), ours both ways.
        for label, model, kernel in (("plain_causal_conv1d", plain, True), ("ours_torch_conv", ours, False),
                                     ("ours_causal_conv1d", ours, True)):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                with conv_kernel(kernel):
                    seconds, logits[label] = timed_prefill(model, embeds, args.repeats)
                point[label] = {"s": seconds, "gpu_peak_bytes": torch.cuda.max_memory_allocated()}
            except Exception as err:  # noqa: BLE001 - one failed variant must not lose the others
                point[label] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            log(tokens, label, point[label])
        base = logits.get("ours_torch_conv")
        point["last_logits_max_abs_diff_vs_ours_torch_conv"] = {
            k: (v - base).abs().max().item() for k, v in logits.items() if base is not None}
        if all("s" in point.get(label, {}) for label in ("plain_causal_conv1d", "ours_causal_conv1d")):
            point["speedup_ours_kernel_vs_plain_kernel"] = (point["plain_causal_conv1d"]["s"]
                                                            / point["ours_causal_conv1d"]["s"])
        log("point", {k: v for k, v in point.items() if k.startswith(("speedup", "last"))})
        results["points"].append(point)
        save(results, args)
    if args.profile_tokens:
        embeds = 0.02 * torch.randn(1, args.profile_tokens, hidden, device=device, dtype=torch.bfloat16)
        with conv_kernel(True):
            profile_region(f"ours_causal_conv1d_{args.profile_tokens}",
                           lambda: ours(inputs_embeds=embeds, logits_to_keep=1, use_cache=False), device, results, args)
        save(results, args)
    log("done")


if __name__ == "__main__":
    main()
