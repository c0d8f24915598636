"""The SigLIP so400m/14-384 tower (head_dim 72, 729 tokens per frame) under each exact SDPA backend, one GPU, one
process: the tower's time per frame and its ratio to the compute floor, for cuDNN, flash, memory-efficient and
PyTorch's default choice; plus each backend's features against the default's (exact backends differ only in the
order of their sums).

    source benchmarks/gpu_setup.sh
    python benchmarks/vision_attention.py --out benchmarks/results/vision_attention.json
"""

import argparse
import contextlib
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PEAK_FLOPS, build_model, log, meta, median_seconds, save, vision_flops_per_frame  # noqa: E402

BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/vision_attention.json")
    p.add_argument("--frames", type=int, default=256, help="frames per tower call (the model's vision chunk)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-cap-gib", type=float, default=79.0)
    return p.parse_args(argv)


def build(device):
    """The real-size vision tower + ToMe + projector in front of a small text model (the LLM plays no part here)."""
    from timeviper.configuration_timeviper import TimeViperConfig, nano_9b_v2_text_config, so400m_vision_config

    # common.make_config has no such pairing: its --tiny shrinks the vision tower and the LLM together.
    text = nano_9b_v2_text_config(num_hidden_layers=4, hybrid_override_pattern="M*M-", vocab_size=1024)
    config = TimeViperConfig(vision_config=so400m_vision_config(), text_config=text, token_compression=[],
                             image_token_id=1024, video_token_id=1025)
    return build_model(config, device, torch.bfloat16)[0]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda")
    torch.set_grad_enabled(False)
    model = build(device)
    results = {"meta": meta(device, args), "frames_per_call": args.frames, "backends": {}}
    size = model.config.vision_config.image_size
    torch.manual_seed(1)
    pixels = torch.randn(args.frames, 3, size, size, device=device, dtype=torch.bfloat16)
    floor_per_frame = vision_flops_per_frame(model) / PEAK_FLOPS
    reference = None
    for name, backend in BACKENDS.items():
        context = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
        try:
            with context:
                seconds = median_seconds(device, lambda: model.model.encode_frames(pixels), args.repeats)
                features = model.model.encode_frames(pixels).float()
            record = {"s_per_call": seconds, "ms_per_frame": 1e3 * seconds / args.frames,
                      "ratio_to_floor": seconds / (args.frames * floor_per_frame)}
            if reference is None:
                reference = features
            record["features_max_abs_diff_vs_default"] = (features - reference).abs().max().item()
            record["features_max_abs"] = reference.abs().max().item()
        except Exception as err:  # noqa: BLE001 - a backend that cannot run these shapes is a result too
            record = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        results["backends"][name] = record
        log(name, record)
    results["floor_ms_per_frame"] = 1e3 * floor_per_frame
    save(results, args)
    log("done")


if __name__ == "__main__":
    main()
