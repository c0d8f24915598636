"""Where does an FSDP forward round differently from the same weights loaded as a plain bf16 model?

One text sequence through three models with identical weights, under the engine's precision (bf16 autocast), every
block's output and the logits compared bit for bit: `fsdp` (the fp32 model wrapped by accelerate with
training/accelerate_configs/fsdp.yaml, as in training), `bf16` (a bf16 copy, as `from_pretrained(...,
dtype=torch.bfloat16)` of the saved folder gives) and `fp32` (the fp32 model, unwrapped). Full Nemotron-Nano-9B-v2
widths, the depth cut to --pattern, a one-layer vision tower (unused by text). Rank 0 writes the report. --tiny: tiny
widths, a CPU smoke run under `accelerate launch --cpu` (no FSDP: only the plumbing is tested).

    accelerate launch --config_file training/accelerate_configs/fsdp.yaml --num_processes 2 \
        benchmarks/multi_gpu/fsdp_forward_check.py --out fsdp_forward.json
"""

import argparse
import copy
import json
from pathlib import Path

import torch
from accelerate import Accelerator

import block_outputs
from inference.tiny_default import make_tiny_tokenizer
from prepare import make_config
from timeviper.modeling_timeviper import TimeViperForConditionalGeneration

# Mamba, MLP, Mamba, attention, MLP, Mamba, MLP: every block kind of the hybrid, in Nano's order of appearance.
PATTERN = "M-M*-M-"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON report")
    p.add_argument("--pattern", default=PATTERN, help="hybrid_override_pattern of the cut-down backbone")
    p.add_argument("--tokens", type=int, default=81, help="length of the text sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny widths (CPU smoke run)")
    return p.parse_args(argv)


def build_model(pattern: str, seed: int, tiny: bool, device) -> TimeViperForConditionalGeneration:
    config = make_config(make_tiny_tokenizer("nemotron_h"), tiny=tiny, schedule=None, hybrid_override_pattern=pattern)
    config.vision_config.num_hidden_layers = 1
    torch.manual_seed(seed)
    with torch.device(device):
        return TimeViperForConditionalGeneration._from_config(config, dtype=torch.float32)


def run(model, inner, batch, device_type: str, autocast: bool) -> dict:
    seen = {}  # lm_head's weight dtype inside the forward (FSDP holds fp32 shards outside it)
    handle = inner.lm_head.register_forward_pre_hook(lambda m, a: seen.update(dtype=str(m.weight.dtype)))
    try:
        with block_outputs.recording(inner) as outputs, torch.no_grad(), \
                torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(**batch).logits.detach().float().cpu()
    finally:
        handle.remove()
    return {"outputs": outputs, "logits": logits, "lm_head_dtype": seen["dtype"]}


def difference(a: dict, b: dict) -> dict:
    return {"logits_bitwise_identical": torch.equal(a["logits"], b["logits"]),
            "logits_max_abs_diff": (a["logits"] - b["logits"]).abs().max().item(),
            **block_outputs.compare(a["outputs"], b["outputs"])}


def main(argv=None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator()  # FSDP plugin and mixed precision from the launcher's config
    device = accelerator.device
    model = build_model(args.pattern, args.seed, args.tiny, device)
    bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
    fp32 = copy.deepcopy(model).eval()
    kinds = [layer.block_type for layer in model.model.language_model.layers]
    ids = torch.randint(4, 264, (1, args.tokens), generator=torch.Generator().manual_seed(args.seed))
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}

    results = {"bf16": run(bf16, bf16, batch, device.type, autocast=True),
               "fp32": run(fp32, fp32, batch, device.type, autocast=True)}
    del fp32
    wrapped = accelerator.prepare(model).eval()
    inner = accelerator.unwrap_model(wrapped)
    # accelerate runs the wrapped forward under its own autocast, as in training.
    results["fsdp"] = run(wrapped, inner, batch, device.type, autocast=False)
    report = {
        "engine": str(accelerator.distributed_type), "mixed_precision": accelerator.mixed_precision,
        "pattern": args.pattern, "block_types": kinds,
        "lm_head_dtype_in_forward": {name: r["lm_head_dtype"] for name, r in results.items()},
        "fsdp_vs_bf16": difference(results["fsdp"], results["bf16"]),
        "fsdp_vs_fp32": difference(results["fsdp"], results["fp32"]),
        "bf16_vs_fp32": difference(results["bf16"], results["fp32"]),
    }
    if accelerator.is_main_process:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
