"""LLM prefill side by side with plain transformers: `NemotronHForCausalLM` and this package's hybrid LLM on the same
random bf16 weights (Nano-9B-v2 dims), on one GPU. Plain transformers runs as it builds itself: with causal-conv1d's
CUDA kernel in this process (its kernel path is fixed at import), and without it in a child process that cannot
import causal-conv1d (what `pip install transformers mamba-ssm` gives: causal-conv1d has no binary wheel). Ours runs
with each of its kernels switched on and off through the module-level handles (VARIANTS), so every kernel's gain is
an A/B of the same run.

Also the kernel-vs-PyTorch parity of the conv at full dims (4,096 tokens, continued from a conv state, as a chunked
prefill does), of the whole LLM's last-token logits, and causal attention at the Nano shape through
FlashAttention-2 and cuDNN from 16,000 to 524,288 tokens, first call and steady state (the evidence for
CUDNN_ATTENTION_MIN_TOKENS and CUDNN_ATTENTION_MAX_TOKENS).

    source benchmarks/gpu_setup.sh && python benchmarks/llm_prefill.py --out benchmarks/results/llm_prefill.json
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
from statistics import median_high

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    TINY_NANO, TINY_VISION, build_model, cap_memory, log, meta, profile_region, save, switched_handles, timed,
)


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
    p.add_argument("--attention-tokens", default="16000,24000,32000,48000,65000,131000,262000,524288",
                   help="lengths of the FlashAttention-2 vs cuDNN causal-attention check ('' for none); lengths the "
                        "prefills above did not use, so that each first call shows cuDNN's per-length plan")
    p.add_argument("--plain-without-conv-kernel", default=None, metavar="JSON",
                   help="(child process) time plain transformers alone, causal-conv1d unimportable; records to JSON")
    args = p.parse_args(argv)
    args.profile_out = args.profile_out or os.path.join(os.path.dirname(args.out) or ".", "profiles_llm.txt")
    return args


def plain_model(tiny, device):
    """Plain transformers' NemotronH at Nano-9B-v2 dims (random bf16 weights, seed 0)."""
    from transformers import NemotronHForCausalLM

    from timeviper.configuration_timeviper import nano_9b_v2_text_config

    text = nano_9b_v2_text_config(**(TINY_NANO if tiny else {}))
    torch.manual_seed(0)
    with torch.device(device):
        plain = NemotronHForCausalLM._from_config(text, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    # Both models follow the checkpoint's dt limits the same way (transformers' default clamps dt at time_step_min).
    for layer in plain.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = tuple(text.time_step_limit)
    return plain.requires_grad_(False)


def our_model(plain, device):
    """Our model on the very tensors of `plain` (no second copy of the weights)."""
    from timeviper.configuration_timeviper import TimeViperConfig, so400m_vision_config

    # Not common.make_config: the text config must be plain's own, and the vision tower (no part of an LLM prefill)
    # stays tiny at full size too, so that ours holds next to no weights beyond plain's in the measured memory.
    text = plain.config
    config = TimeViperConfig(vision_config=so400m_vision_config(**TINY_VISION), text_config=text,
                             token_compression=[], image_token_id=text.vocab_size,
                             video_token_id=text.vocab_size + 1)
    ours, _ = build_model(config, device, torch.bfloat16)
    shared = {("model.language_model." + k.removeprefix("model.")) if k.startswith("model.") else k: v
              for k, v in plain.state_dict().items()}
    missing, unexpected = ours.load_state_dict(shared, strict=False, assign=True)
    assert not unexpected and not [k for k in missing if k.startswith("model.language_model.")], (missing, unexpected)
    return ours


# Which of our kernels each timed variant of ours runs with (see our_kernels).
VARIANTS = {
    "ours_conv_kernel_only": dict(conv=True, norm=False, cudnn=False, relu2=False),
    "ours_norm_kernel": dict(conv=True, norm=True, cudnn=False, relu2=False),
    "ours_norm_cudnn": dict(conv=True, norm=True, cudnn=True, relu2=False),
    "ours_torch_conv": dict(conv=False, norm=True, cudnn=True, relu2=True),
    "ours": dict(conv=True, norm=True, cudnn=True, relu2=True),
}


def our_kernels(conv=True, norm=True, cudnn=True, relu2=True):
    """causal-conv1d, mamba-ssm's Triton RMSNorm, cuDNN-first causal attention and the one-pass squared ReLU on or
    off for our model (a context manager)."""
    import timeviper.modeling_timeviper as our_module

    assert our_module.causal_conv1d_fn is not None, "causal-conv1d is not installed (build_causal_conv1d.sh)"
    assert our_module.rmsnorm_kernel is not None, "mamba-ssm is not installed (gpu_setup.sh)"
    # Each handle's value when switched off: no kernel (the PyTorch path), or no length at which cuDNN goes first.
    switched_off = {"causal_conv1d_fn": None, "rmsnorm_kernel": None, "CUDNN_ATTENTION_MAX_TOKENS": 0,
                    "squared_relu_kernel": None}
    enabled = {"causal_conv1d_fn": conv, "rmsnorm_kernel": norm, "CUDNN_ATTENTION_MAX_TOKENS": cudnn,
               "squared_relu_kernel": relu2}
    return switched_handles(our_module, {name: off for name, off in switched_off.items() if not enabled[name]})


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
        with our_kernels(conv=enabled):
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


def squared_relu_parity(ours, device, tokens=16384):
    """The one-pass squared ReLU against transformers' activation on an MLP-sized bf16 tensor: equal elements."""
    from transformers.activations import ACT2FN

    import timeviper.modeling_timeviper as our_module

    torch.manual_seed(4)
    width = ours.config.text_config.intermediate_size
    up = torch.randn(tokens, width, device=device, dtype=torch.bfloat16)
    expected = ACT2FN["relu2"](up)
    fused = our_module.squared_relu_kernel(up.clone())
    return {"elements": up.numel(), "unequal_elements": int((fused != expected).sum()),
            "max_abs_diff": (fused.float() - expected.float()).abs().max().item()}


def prompt_embeds(tokens, hidden, device):
    torch.manual_seed(2)
    return 0.02 * torch.randn(1, tokens, hidden, device=device, dtype=torch.bfloat16)


def time_variant(model, embeds, repeats, kernels=None):
    """(record, last-token logits or None) of one model / kernel variant; a failure is recorded, not raised."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        with our_kernels(**kernels) if kernels else contextlib.nullcontext():
            seconds, logits = timed_prefill(model, embeds, repeats)
        return {"s": seconds, "gpu_peak_bytes": torch.cuda.max_memory_allocated()}, logits
    except Exception as err:  # noqa: BLE001 - one failed variant must not lose the others
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}, None


def plain_without_conv_kernel(args, device):
    """Child process: causal-conv1d made unimportable before transformers loads, so plain NemotronH takes its PyTorch
    conv; writes {tokens: record} to the path given."""
    sys.modules["causal_conv1d"] = None
    cap_memory(args)  # the parent's memory limit (an 80 GB H100's on a larger card)
    plain = plain_model(args.tiny, device)
    records = {}
    for tokens in [int(t) for t in args.tokens.split(",")]:
        records[tokens], _ = time_variant(plain, prompt_embeds(tokens, plain.config.hidden_size, device), args.repeats)
        log(tokens, "plain_torch_conv", records[tokens])
    with open(args.plain_without_conv_kernel, "w") as f:
        json.dump(records, f)


def run_plain_without_conv_kernel(args):
    """{tokens: record} from a child process (see plain_without_conv_kernel); {} if it failed."""
    path = args.out + ".plain_torch_conv.json"
    argv = [sys.executable, os.path.abspath(__file__), "--tokens", args.tokens, "--repeats", str(args.repeats),
            "--memory-cap-gib", str(args.memory_cap_gib), "--plain-without-conv-kernel", path,
            *(["--tiny"] if args.tiny else [])]
    done = subprocess.run(argv, check=False)
    if done.returncode != 0 or not os.path.exists(path):
        log("plain_torch_conv child failed", done.returncode)
        return {}
    with open(path) as f:
        records = {int(k): v for k, v in json.load(f).items()}
    os.remove(path)
    return records


def attention_check(lengths, device, heads=40, kv_heads=8, head_dim=128):
    """Causal GQA attention at the Nano shape through FlashAttention-2 and through cuDNN, forced one at a time: the
    first call at the length (cuDNN builds its plan for a new length then), the median of the next 3 (1 past 131,072
    tokens), TFLOP/s, the outputs' difference, or the error."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    records = []
    for length in lengths:
        torch.manual_seed(3)
        query = torch.randn(1, heads, length, head_dim, device=device, dtype=torch.bfloat16)
        key, value = (torch.randn(1, kv_heads, length, head_dim, device=device, dtype=torch.bfloat16) for _ in "kv")
        record, outputs = {"tokens": length}, {}
        for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def attend(backend=backend, query=query, key=key, value=value):
                with sdpa_kernel([backend]):
                    return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                                            enable_gqa=True)
            try:
                times = [timed(device, attend) for _ in range(2 if length > 131072 else 4)]
                seconds = median_high([t for t, _ in times[1:]])
                outputs[label] = times[-1][1]
                record[label] = {"first_call_s": times[0][0], "s": seconds,
                                 "tflops": 2 * length * length * heads * head_dim / seconds / 1e12}
            except Exception as err:  # noqa: BLE001
                record[label] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        if len(outputs) == 2:
            record["max_abs_diff"] = (outputs["flash"].float() - outputs["cudnn"].float()).abs().max().item()
        log("attention", record)
        records.append(record)
        del query, key, value, outputs
        torch.cuda.empty_cache()
    return records


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda")
    torch.set_grad_enabled(False)
    if args.plain_without_conv_kernel:
        return plain_without_conv_kernel(args, device)
    results = {"meta": meta(device, args), "points": []}
    plain_torch_conv = run_plain_without_conv_kernel(args)
    plain = plain_model(args.tiny, device)
    ours = our_model(plain, device)
    hidden = plain.config.hidden_size
    results["conv_parity"] = conv_parity(ours, device)
    log("conv parity", results["conv_parity"])
    results["squared_relu_parity"] = squared_relu_parity(ours, device)
    log("squared ReLU parity", results["squared_relu_parity"])
    for tokens in [int(t) for t in args.tokens.split(",")]:
        embeds = prompt_embeds(tokens, hidden, device)
        point, logits = {"tokens": tokens}, {}
        if tokens in plain_torch_conv:
            point["plain_torch_conv"] = plain_torch_conv[tokens]
        point["plain_causal_conv1d"], logits["plain_causal_conv1d"] = time_variant(plain, embeds, args.repeats)
        for label, kernels in VARIANTS.items():
            point[label], logits[label] = time_variant(ours, embeds, args.repeats, kernels)
            log(tokens, label, point[label])
        base = logits["ours_conv_kernel_only"]
        point["last_logits_max_abs_diff_vs_ours_conv_kernel_only"] = {
            k: (v - base).abs().max().item() for k, v in logits.items() if base is not None and v is not None}
        ours_s = point["ours"].get("s")
        point["speedup_of_ours"] = {k: v["s"] / ours_s for k, v in point.items()
                                    if ours_s and isinstance(v, dict) and "s" in v}
        log("point", {k: v for k, v in point.items() if k.startswith(("speedup", "last"))})
        results["points"].append(point)
        save(results, args)
    del plain
    torch.cuda.empty_cache()
    if args.attention_tokens:
        results["attention_check"] = attention_check([int(t) for t in args.attention_tokens.split(",")], device)
        save(results, args)
    if args.profile_tokens:
        embeds = prompt_embeds(args.profile_tokens, hidden, device)
        with our_kernels():
            profile_region(f"ours_{args.profile_tokens}",
                           lambda: ours(inputs_embeds=embeds, logits_to_keep=1, use_cache=False), device, results, args)
        save(results, args)
    log("done")


if __name__ == "__main__":
    main()
