"""The SigLIP so400m/14-384 tower (26 blocks, head_dim 72, 729 tokens per frame) on one GPU, one process: its
fused inference path (`siglip_blocks_inference`: residual adds inside mamba-ssm's Triton LayerNorm, q/k/v in one
matmul) against the tower's own blocks, each under every exact SDPA backend (cuDNN, flash, memory-efficient and
PyTorch's default choice): time per frame and its ratio to the compute floor, a kernel profile of both paths, and
their accuracy against a float32 run of the tower's own blocks.

    source benchmarks/gpu_setup.sh
    python benchmarks/vision_tower.py --out benchmarks/results/vision_tower.json
"""

import argparse
import contextlib
import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    PEAK_FLOPS, build_model, log, meta, median_seconds, profile_region, save, switched_handles, vision_flops_per_frame,
)

BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/vision_tower.json")
    p.add_argument("--frames", type=int, default=256, help="frames per tower call (the model's vision chunk)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--accuracy-frames", type=int, default=32, help="frames of the float32 accuracy reference")
    p.add_argument("--memory-cap-gib", type=float, default=79.0)
    p.add_argument("--profile-out", default=None, help="profiler tables (default: profiles_vision.txt next to --out)")
    args = p.parse_args(argv)
    args.profile_out = args.profile_out or os.path.join(os.path.dirname(args.out) or ".", "profiles_vision.txt")
    return args


def build(device):
    """The real-size vision tower + ToMe + projector in front of a small text model (the LLM plays no part here)."""
    from timeviper.configuration_timeviper import TimeViperConfig, nano_9b_v2_text_config, so400m_vision_config

    # common.make_config has no such pairing: its --tiny shrinks the vision tower and the LLM together.
    text = nano_9b_v2_text_config(num_hidden_layers=4, hybrid_override_pattern="M*M-", vocab_size=1024)
    config = TimeViperConfig(vision_config=so400m_vision_config(), text_config=text, token_compression=[],
                             image_token_id=1024, video_token_id=1025)
    return build_model(config, device, torch.bfloat16)[0]


def tower_path(fused):
    """The fused path on (the package's default where mamba-ssm is installed) or off (the tower's own blocks): a
    context manager."""
    import timeviper.modeling_timeviper as modeling

    assert modeling.layernorm_kernel is not None, "mamba-ssm is not installed (gpu_setup.sh)"
    return switched_handles(modeling, {} if fused else {"layernorm_kernel": None})


def compare(features, reference):
    """Max abs difference and cosine similarity of two (frames, tokens, width) feature tensors, per token."""
    features, reference = features.float(), reference.float()
    cosine = F.cosine_similarity(features, reference, dim=-1)
    return {"max_abs_diff": (features - reference).abs().max().item(), "max_abs": reference.abs().max().item(),
            "min_token_cosine": cosine.min().item(), "mean_token_cosine": cosine.mean().item()}


def accuracy(model, pixels):
    """Tower outputs of both bf16 paths and the projected features against the tower's own blocks in float32."""
    reference_model = copy.deepcopy(model.model).float()
    with tower_path(fused=False):
        reference = reference_model.encode_patches(pixels.float())
        reference_features = reference_model.encode_frames(pixels.float())
    del reference_model
    record = {}
    for name, fused in [("blocks_bf16", False), ("fused_bf16", True)]:
        with tower_path(fused):
            record[name] = {"tower_output": compare(model.model.encode_patches(pixels), reference),
                            "projected_features": compare(model.model.encode_frames(pixels), reference_features)}
    return record


def time_paths(model, pixels, args, floor_per_frame):
    records = {}
    for path, fused in [("blocks", False), ("fused", True)]:
        for backend_name, backend in BACKENDS.items():
            name = f"{path}_{backend_name}"
            context = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
            try:
                with tower_path(fused), context:
                    seconds = median_seconds(pixels.device, lambda: model.model.encode_patches(pixels), args.repeats)
                record = {"s_per_call": seconds, "ms_per_frame": 1e3 * seconds / args.frames,
                          "ratio_to_floor": seconds / (args.frames * floor_per_frame)}
            except Exception as err:  # noqa: BLE001 - a backend that cannot run these shapes is a result too
                record = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            records[name] = record
            log(name, record)
    return records


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda")
    torch.set_grad_enabled(False)
    model = build(device)
    results = {"meta": meta(device, args), "frames_per_call": args.frames}
    size = model.config.vision_config.image_size
    torch.manual_seed(1)
    pixels = torch.randn(args.frames, 3, size, size, device=device, dtype=torch.bfloat16)
    results["accuracy_vs_float32_blocks"] = accuracy(model, pixels[: args.accuracy_frames])
    log("accuracy", results["accuracy_vs_float32_blocks"])
    save(results, args)
    floor_per_frame = vision_flops_per_frame(model) / PEAK_FLOPS
    results["floor_ms_per_frame"] = 1e3 * floor_per_frame
    results["paths"] = time_paths(model, pixels, args, floor_per_frame)
    save(results, args)
    open(args.profile_out, "w").close()
    for path, fused in [("blocks", False), ("fused", True)]:
        with tower_path(fused):
            profile_region(f"vision_chunk_{path}", lambda: model.model.encode_patches(pixels), device, results, args)
    save(results, args)
    log("done")


if __name__ == "__main__":
    main()
