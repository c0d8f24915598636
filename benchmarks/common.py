"""What the single-GPU benchmarks (long_video.py, streaming_video.py, video_state.py, llm_prefill.py, ...) share:
model configs, the model build, the run's metadata, logging, timing, memory readings, the JSON they write after
every step, the kernel profile of a region, and the FLOP counts and measured GPU ceilings behind every compute floor
(multi_gpu/floor.py counts a training step's FLOPs with them too)."""

import argparse
import collections
import contextlib
import gc
import json
import os
import platform
import sys
import time
from statistics import median_high

import torch
from torch import nn

# The three LLM setups behind the same SigLIP so400m/14-384 + ToMe (16 tokens/frame) + MLP stack.
CONFIGS = {
    "a": dict(backbone="nano", compression=None, label="Nano-9B-v2 hybrid, no compression"),
    "b": dict(backbone="nano", compression="uni_7_0.5-attn_39_0.05",
              label="Nano-9B-v2 hybrid + TransV uni_7_0.5-attn_39_0.05"),
    "c": dict(backbone="qwen", compression=None, label="Qwen2.5-7B architecture, no compression"),
}
# --tiny: every width tiny, the layer patterns of the full-size configs kept (so a schedule's blocks exist).
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56,
                   patch_size=8)
TINY_NANO = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                 mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16, vocab_size=512)
PEAK_FLOPS = 790e12  # bf16 dense matmul on random data, measured on the H100s we benchmark on
PEAK_BYTES = 3.0e12  # device-to-device copy, measured on the same H100s
T0 = time.perf_counter()


def log(*args):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *args, flush=True)


def add_common_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke test of the whole script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=out, help="JSON written after every step")
    parser.add_argument("--memory-cap-gib", type=float, default=79.0,
                        help="cap PyTorch's allocator here when the card is larger (H200), to emulate an 80 GB H100")
    parser.add_argument("--vision-chunk", type=int, default=None, help="override config.vision_chunk_size")


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device):
    if is_cuda(device):
        torch.cuda.synchronize()


def timed(device, fn):
    """(seconds, result) of `fn()`, with the device's queued work finished at both ends."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def median_seconds(device, fn, repeats):
    """Median seconds of `repeats` timed calls of `fn`, after one untimed warm-up call."""
    fn()
    return median_high([timed(device, fn)[0] for _ in range(repeats)])


@contextlib.contextmanager
def switched_handles(module, values: dict):
    """`module`'s attributes set to `values` for the block, then restored: how a benchmark switches one of the
    package's kernels (a module-level handle such as `rmsnorm_kernel`) off for an A/B in the same process."""
    saved = {name: getattr(module, name) for name in values}
    try:
        for name, value in values.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def free(device):
    """Drop what Python no longer references, return the cached blocks and restart the peak counters."""
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def mem(device):
    if not is_cuda(device):
        return {"allocated": 0, "peak": 0, "reserved_peak": 0}
    return {"allocated": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated(),
            "reserved_peak": torch.cuda.max_memory_reserved()}


def save(results, args):
    """Write the JSON through a temporary file, so that a run killed mid-write keeps the previous step's."""
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, args.out)


def make_config(name, tiny, vision_chunk=None):
    """The TimeViperConfig of `CONFIGS[name]` at full or tiny widths; `vision_chunk` overrides its vision_chunk_size."""
    from transformers import Qwen2Config

    from timeviper.configuration_timeviper import TimeViperConfig, nano_9b_v2_text_config, so400m_vision_config

    spec = CONFIGS[name]
    if tiny:
        vision = so400m_vision_config(**TINY_VISION)
        nano = nano_9b_v2_text_config(**TINY_NANO)
        qwen = Qwen2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=640, rope_theta=1e6, rms_norm_eps=1e-6,
                           tie_word_embeddings=False)
    else:
        vision = so400m_vision_config()
        nano = nano_9b_v2_text_config()
        qwen = Qwen2Config(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                           intermediate_size=18944, vocab_size=152064, rope_theta=1e6, rms_norm_eps=1e-6,
                           max_position_embeddings=32768, tie_word_embeddings=False)
    text = nano if spec["backbone"] == "nano" else qwen
    # Placeholder ids outside the vocabulary, so that a generated token can never be taken for a placeholder.
    vocab = text.vocab_size
    config = TimeViperConfig(vision_config=vision, text_config=text, token_compression=spec["compression"],
                             image_token_id=vocab, video_token_id=vocab + 1)
    if vision_chunk:
        config.vision_chunk_size = vision_chunk
    return config


def build_model(cfg, device, dtype):
    """The model of `cfg` with random weights (seed 0), built directly on `device`; returns (model, seconds)."""
    from timeviper.modeling_timeviper import TimeViperForConditionalGeneration

    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(device):
        model = TimeViperForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    sync(device)
    return model, time.perf_counter() - t


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def video_prompt_ids(cfg, frames, device, prefix=8, suffix=16, seed=1):
    """Random text ids around `frames` frames of video placeholders, as a (1, tokens) tensor on `device`."""
    gen = torch.Generator().manual_seed(seed)
    vocab = min(cfg.text_config.vocab_size, 131072)
    ids = torch.cat([
        torch.randint(100, vocab, (prefix,), generator=gen),
        torch.full((frames * cfg.vision_tokens_per_frame,), cfg.video_token_id),
        torch.randint(100, vocab, (suffix,), generator=gen),
    ])
    return ids[None].to(device)


def random_features(cfg, frames, device, dtype, generator):
    """Random projector outputs of the right shape for `frames` frames (the vision side left out)."""
    shape = (frames, cfg.vision_tokens_per_frame, cfg.text_config.hidden_size)
    return 0.5 * torch.randn(shape, device=device, dtype=dtype, generator=generator)


def meta(device, args):
    """Versions, the GPU and its measured size; on a card larger than an 80 GB H100, the allocator is capped here."""
    import transformers

    import timeviper.modeling_timeviper as tm

    info = {"gated_rmsnorm_kernel": getattr(tm, "gated_rmsnorm_kernel", None) is not None,
            "rmsnorm_kernel": getattr(tm, "rmsnorm_kernel", None) is not None,
            "layernorm_kernel": getattr(tm, "layernorm_kernel", None) is not None, "argv": sys.argv,
            "python": platform.python_version(), "torch": torch.__version__,
            # (a script without a tiny mode has no --tiny)
            "transformers": transformers.__version__, "device": str(device), "tiny": getattr(args, "tiny", False),
            "mamba_chunk_scan_combined": tm.mamba_chunk_scan_combined is not None,
            "selective_state_update": tm.selective_state_update is not None,
            "causal_conv": ("causal-conv1d's CUDA kernel (prefill; F.conv1d for single-token steps)"
                            if tm.causal_conv1d_fn is not None else
                            "torch.nn.functional.conv1d on CUDA (causal-conv1d not installed); 4 multiply-adds on CPU"),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    for mod in ("triton", "mamba_ssm", "causal_conv1d"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001
            info[mod] = f"not importable: {type(err).__name__}"
    if is_cuda(device):
        props = torch.cuda.get_device_properties(0)
        _, total_b = torch.cuda.mem_get_info()
        info.update(gpu=props.name, gpu_total_bytes=total_b, sm_count=props.multi_processor_count,
                    cuda=torch.version.cuda)
        info.update(cap_memory(args))
    return info


def cap_memory(args) -> dict:
    """On a card larger than an 80 GB H100, cap PyTorch's allocator at `args.memory_cap_gib` to emulate one; the
    memory limit the run works under, for its record."""
    _, total_b = torch.cuda.mem_get_info()
    cap = args.memory_cap_gib * 2**30
    if total_b > cap * 1.03:
        torch.cuda.set_per_process_memory_fraction(cap / total_b)
        return {"memory_cap_bytes": cap,
                "memory_cap_note": "card larger than an 80 GB H100: allocator capped to emulate one"}
    return {"memory_cap_bytes": total_b - 2**30}  # CUDA context and allocator slack


def run_steps(steps, model, device, args, results):
    """Run each named step under inference mode, saving after each; a failed step's traceback goes into
    results["errors"] and the others still run."""
    import traceback

    for name, step in steps:
        try:
            with torch.inference_mode():
                step(model, device, args, results)
        except Exception:  # noqa: BLE001 - one failed step must not lose the others' measurements
            results.setdefault("errors", {})[name] = traceback.format_exc()[-3000:]
            log(f"step {name} failed:", results["errors"][name])
        save(results, args)


def linear_params(module):
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def vision_flops_per_frame(model):
    vcfg = model.config.vision_config
    patches = (vcfg.image_size // vcfg.patch_size) ** 2
    layers = model.config.vision_layers_used
    d = vcfg.hidden_size
    embed = 2 * patches * 3 * vcfg.patch_size**2 * d
    per_layer = 2 * patches * linear_params(model.model.vision_tower.encoder.layers[0]) + 4 * patches**2 * d
    return embed + layers * per_layer


def tome_proj_flops_per_frame(model):
    from timeviper.modeling_timeviper import tome_schedule

    vcfg = model.config.vision_config
    patches = (vcfg.image_size // vcfg.patch_size) ** 2
    tokens = model.config.vision_tokens_per_frame
    tome = 0
    n = patches
    for r in tome_schedule(patches, tokens) if model.config.projector_type == "tome_mlp" else []:
        tome += 2 * (n // 2 + n % 2) * (n // 2) * (vcfg.hidden_size // 16)  # cosine scores on the 16-head mean
        n -= r
    return tome + 2 * tokens * linear_params(model.model.multi_modal_projector)


def ssd_flops_per_token(text_cfg):
    q, n, g = text_cfg.chunk_size, text_cfg.ssm_state_size, text_cfg.n_groups
    h, p = text_cfg.mamba_num_heads, text_cfg.mamba_head_dim
    # C B^T per group inside a chunk + (CB) x per head + chunk states B^T x + state output C h.
    return 2 * q * n * g + 2 * q * h * p + 4 * n * h * p


def llm_flops(model, layer_tokens, extra=0):
    """layer_tokens: tokens each LLM block processed in the prefill (measured by hooks)."""
    lm = model.model.language_model
    tc = model.config.text_config
    total = {"linear": 0, "attention": 0, "ssd": 0, "conv": 0, "other": extra}
    for layer, tokens in zip(lm.layers, layer_tokens):
        total["linear"] += 2 * linear_params(layer) * tokens
        attention = layer.attention
        if attention is not None:
            total["attention"] += 2 * tokens**2 * attention.num_heads * attention.head_dim  # causal: half of 4 L^2 d
        if getattr(layer, "block_type", "") == "linear_attention":
            total["ssd"] += ssd_flops_per_token(tc) * tokens
            total["conv"] += 2 * layer.mixer.kernel_size * layer.mixer.conv_dim * tokens
    total["lm_head"] = 2 * model.lm_head.weight.numel()
    total["total"] = sum(total.values())
    return total


def tokens_per_block(model, vision_tokens: int, text_tokens: int) -> list[int]:
    """Tokens each LLM block processes under the compression schedule: the vision tokens kept from a stage's block
    on are `int(vision tokens of the input x keep ratio)`, as `TokenCompressor.select` keeps them."""
    language_model = model.model.language_model
    tokens, vision = [], vision_tokens
    for layer_idx in range(len(language_model.layers)):
        if layer_idx in language_model.stage_at_layer:
            stage = language_model.stages[language_model.stage_at_layer[layer_idx]]
            vision = min(vision, int(vision_tokens * stage.keep_ratio))
        tokens.append(text_tokens + vision)
    return tokens


def compression_flops(model, layer_tokens, text_tokens):
    """Attention-guided scores (k_proj over the kept sequence) and TransV cross-attention, both small."""
    lm = model.model.language_model
    flops = 0
    for stage in lm.stages:
        tokens_in = layer_tokens[stage.layer_idx - 1]
        kept = layer_tokens[stage.layer_idx]
        if stage.method == "attention":
            att = lm.layers[stage.layer_idx].attention
            flops += 2 * tokens_in * att.k_proj.weight.numel() + 2 * tokens_in * att.num_heads * att.head_dim
        if stage.transfer:
            dropped = tokens_in - kept
            merge = lm.merge_modules[str(lm.stages.index(stage))]
            flops += 2 * text_tokens * (merge.q_proj.weight.numel() + merge.o_proj.weight.numel())
            flops += 2 * dropped * (merge.k_proj.weight.numel() + merge.v_proj.weight.numel())
            flops += 4 * text_tokens * dropped * merge.num_heads * merge.head_dim
    return flops


# Kernel categories of the profiles, by substrings of the kernel's name (the first category that matches wins).
CATEGORIES = (
    ("attention (SDPA)", ("flash", "fmha", "attention", "sdpa")),
    ("mamba Triton", ("_chunk_scan", "_chunk_state", "_state_passing", "_bmm_chunk", "_chunk_cumsum",
                      "selective_scan")),
    ("matmul (cuBLAS)", ("gemm", "cutlass", "nvjet", "cublas", "matmul", "xmma")),
    ("conv", ("conv",)),
    ("copy/index", ("copy", "cat", "memcpy", "memset", "index", "gather", "scatter")),
    ("reductions/norms", ("reduce", "norm")),
)


def categorize(name):
    n = name.lower()
    return next((category for category, keys in CATEGORIES if any(k in n for k in keys)), "elementwise/other")


def profile_region(label, fn, device, results, args, repeats=1):
    """Profile `repeats` calls of `fn`: their device time per call by kernel category and the top kernels go into
    results["profiles"][label], the profiler's table is appended to `args.profile_out`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda(device) else [])
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        sync(device)
    from torch.autograd import DeviceType

    # Kernel-level events only (an aten op's device time is its kernels' time: counting both would double it).
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0
              and not e.key.startswith(("Command Buffer", "Activity Buffer"))]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events)
    cats = collections.Counter()
    for e in events:
        cats[categorize(e.key)] += e.self_device_time_total
    top = [{"name": e.key[:160], "ms": e.self_device_time_total / 1e3 / repeats, "calls": e.count // repeats,
            "category": categorize(e.key)} for e in events[:15]]
    results.setdefault("profiles", {})[label] = {
        "device_ms": total / 1e3 / repeats, "by_category_ms": {k: v / 1e3 / repeats for k, v in cats.most_common()},
        "top_kernels": top,
    }
    with open(args.profile_out, "a") as f:
        f.write(f"\n===== {label} =====\n")
        f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=90))
    log(f"profile {label}: {total / 1e3 / repeats:.1f} ms device; "
        + ", ".join(f"{k} {v / 1e3 / repeats:.1f}" for k, v in cats.most_common()))
