"""Lower bound on the time of one training step of the multi-GPU benchmark, per GPU: the FLOPs the step must compute
at the GPU's measured bf16 matmul rate, plus the bytes AdamW must move over its shard at the measured copy rate
(dense bf16 matmuls on random data and device-to-device copies, measured on the benchmark machines).
Communication is left out: the engines overlap it with compute.

The FLOPs are counted with the functions of `benchmarks/common.py` on the benchmark's own model, built on the meta
device from `prepared.json`, for one training sample (one per GPU per step):
- vision tower and ToMe: forward only (frozen, nothing flows back into them);
- projector, lm_head and the compression stages (TransV, attention-guided scores): forward + backward (2x forward);
- LLM blocks: forward, the forward again under gradient checkpointing, backward (2x forward), over the tokens each
  block keeps under the TransV schedule; `without_recompute` leaves the second forward out (the usual model-FLOPs
  count).
"""

import functools

import torch

from benchmarks.common import (
    PEAK_BYTES,
    PEAK_FLOPS,
    compression_flops,
    linear_params,
    llm_flops,
    tokens_per_block,
    tome_proj_flops_per_frame,
    vision_flops_per_frame,
)
from inference.tiny_default import make_tiny_tokenizer
from prepare import make_config
from timeviper.modeling_timeviper import TimeViperForConditionalGeneration

# Measured ceilings of the benchmark machines' GPUs: bf16 dense matmul FLOP/s, device-to-device copy bytes/s. The
# H100's are the single-GPU benchmarks' own; the H200 matmuls at the same rate and copies faster.
CEILINGS = {"H200": (PEAK_FLOPS, 4.3e12), "H100": (PEAK_FLOPS, PEAK_BYTES)}
# AdamW over fp32 master weights reads parameter, gradient and both moments and writes parameter and moments (28
# bytes); gradient clipping reads the gradient once more.
OPTIMIZER_BYTES_PER_PARAMETER = 32


@functools.cache
def meta_model(tiny: bool, schedule: str | None) -> TimeViperForConditionalGeneration:
    """The benchmark's model (prepare.py) on the meta device. Cached: building it takes seconds, and a report or plot
    asks for the floor of every engine and results file, which share it."""
    config = make_config(make_tiny_tokenizer("nemotron_h"), tiny, schedule)
    with torch.device("meta"):
        return TimeViperForConditionalGeneration._from_config(config, dtype=torch.bfloat16)


def training_step_flops(model, frames: int, sample_tokens: int) -> dict:
    """FLOPs of forward and backward for one sample of `frames` frames and `sample_tokens` tokens in all."""
    vision_tokens = frames * model.config.vision_tokens_per_frame
    text_tokens = sample_tokens - vision_tokens
    tokens = tokens_per_block(model, vision_tokens, text_tokens)
    blocks = llm_flops(model, tokens)
    block_forward = blocks["linear"] + blocks["attention"] + blocks["ssd"] + blocks["conv"]
    projector_forward = 2 * vision_tokens * linear_params(model.model.multi_modal_projector)
    flops = {
        "vision": vision_flops_per_frame(model) * frames,
        "tome": tome_proj_flops_per_frame(model) * frames - projector_forward,
        "projector": 3 * projector_forward,
        "llm_blocks": 4 * block_forward,
        "compression": 3 * compression_flops(model, tokens, text_tokens),
        "lm_head": 3 * 2 * model.lm_head.weight.numel() * tokens[-1],
    }
    flops["total"] = sum(flops.values())
    flops["without_recompute"] = flops["total"] - block_forward
    return {"tokens_per_block": tokens, "flops": flops}


def step_floor(prepared: dict, device: str, world_size: int) -> dict | None:
    """The floor of one step on `device` (a GPU name) with `world_size` GPUs; None for a device without measured
    ceilings (the CPU smoke run)."""
    ceilings = next((c for name, c in CEILINGS.items() if name in device), None)
    if ceilings is None:
        return None
    matmul_flops_per_s, copy_bytes_per_s = ceilings
    model = meta_model(prepared["tiny"], prepared["schedule"])
    counted = training_step_flops(model, prepared["frames"], prepared["train_tokens"])
    trained = prepared["parameters"]["total"] - prepared["parameters"]["vision"]  # --stage 2 freezes the vision tower
    optimizer_bytes = OPTIMIZER_BYTES_PER_PARAMETER * trained / world_size
    compute_s = counted["flops"]["total"] / matmul_flops_per_s
    optimizer_s = optimizer_bytes / copy_bytes_per_s
    return {**counted, "optimizer_bytes": optimizer_bytes, "compute_s": compute_s, "optimizer_s": optimizer_s,
            "floor_s": compute_s + optimizer_s,
            "floor_without_recompute_s": counted["flops"]["without_recompute"] / matmul_flops_per_s + optimizer_s,
            "matmul_flops_per_s": matmul_flops_per_s, "copy_bytes_per_s": copy_bytes_per_s}
