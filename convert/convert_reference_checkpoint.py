"""Convert a checkpoint of the reference TimeViper code (xiaomi-research/timeviper) into a TimeViper Hub folder.

The reference saves the whole VLM as one flat state dict (`pytorch_model.bin` through `torch.save`, or the trainer's
`model.safetensors`):

* `vision_backbone.featurizer.*`: timm SigLIP (`patch_embed.proj.*`, `pos_embed`, `blocks.{i}.*` with fused qkv,
  `norm.*`, `attn_pool.*`, the last unused);
* `projector.projector.{0,2}.*`: Linear-GELU-Linear;
* `llm_backbone.llm.backbone.*` (Nemotron-H) or `llm_backbone.llm.model.*` (Qwen2), with `merge_modules.{stage}.*`
  and `alpha` when TransV was trained; `llm_backbone.llm.lm_head.weight`.

The checkpoint carries no config: `--llm-config` is the base LLM folder it was trained from (config.json and
tokenizer), and `--token-compression` the `pdrop_type` string it was trained with. TransV tensors that do not match
the transfer stages of that schedule stop the conversion.

Example::

    python -m convert.convert_reference_checkpoint --checkpoint runs/timeviper/pytorch_model.bin \\
        --llm-config ckpts/NVIDIA-Nemotron-Nano-9B-v2-Base --token-compression uni_7_0.5-attn_39_0.05 \\
        --output TimeViper-9B
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from .common import (
    check_and_report_plan,
    add_shared_arguments,
    ConversionError,
    ConversionPlan,
    TensorSource,
    atomic_output_dir,
    build_timeviper_config,
    check_output_available,
    check_transfer_tensors,
    compare_text_logits,
    compare_vision_features,
    guess_base_model,
    load_converted_model,
    load_remote_code,
    load_text_config,
    load_tokenizer,
    logger,
    match_checkpoint_time_step_limit,
    native_vision_reference,
    open_tensor_source,
    parse_dtype,
    parse_size,
    parse_token_compression,
    plan_llm,
    plan_projector,
    plan_timm_siglip,
    report_verification,
    round_trip_dtype,
    save_hub_folder,
    should_verify,
    split_transfer_gates,
    vision_config_from_timm,
    write_safetensors_shards,
)

VISION_PREFIX = "vision_backbone.featurizer."
PROJECTOR_PREFIX = "projector.projector."
LLM_BODY_PREFIX = {"nemotron_h": "llm_backbone.llm.backbone.", "qwen2": "llm_backbone.llm.model."}
LM_HEAD_KEY = "llm_backbone.llm.lm_head.weight"


def check_llm_family(source: TensorSource, family: str) -> None:
    """The checkpoint's LLM prefix must be the one of `--llm-config`'s model type."""
    body_prefix = LLM_BODY_PREFIX[family]
    if not any(key.startswith(body_prefix) for key in source.keys()):
        found = [name for name, prefix in LLM_BODY_PREFIX.items() if any(key.startswith(prefix) for key in source.keys())]
        hint = f"; it holds a {found[0]} LLM ({LLM_BODY_PREFIX[found[0]]}*)" if found else ""
        raise ConversionError(f"{source.name} has no {body_prefix}* tensors although --llm-config is a {family} model{hint}")


def plan_reference_checkpoint(source: TensorSource, config) -> ConversionPlan:
    """Every tensor of a reference checkpoint mapped to TimeViper names, skipped with a reason, or rejected."""
    family = config.text_config.model_type
    plan = ConversionPlan()
    plan.merge(plan_timm_siglip(source, prefix=VISION_PREFIX))
    plan.merge(plan_projector(source, prefix=PROJECTOR_PREFIX))
    plan.merge(
        plan_llm(
            source, family, LLM_BODY_PREFIX[family], LM_HEAD_KEY, allow_transfer=True,
            tie_word_embeddings=config.text_config.tie_word_embeddings,
        )
    )
    return plan.account_for(source)


def convert_reference_checkpoint(
    checkpoint: str | Path,
    llm_config: str | Path,
    output: str | Path,
    token_compression=None,
    projector_type: str = "tome_mlp",
    tokens_per_frame: int = 16,
    vision_feature_layer: int = -2,
    dtype: str | torch.dtype = "bf16",
    shard_size: str | int = "5GB",
    force: bool = False,
    verify: bool | None = None,
    verify_atol: float = 1e-3,
    vision_num_heads: int | None = None,
    image_size: int | None = None,
    base_models: list[str] | None = None,
    progress: bool = True,
    code_folder: str | Path | None = None,
) -> Path:
    """Convert the reference checkpoint file `checkpoint` into a TimeViper Hub folder at `output`; return its path.

    `token_compression` is the reference's `pdrop_type` string (`uni_7_0.5-attn_39_0.05`), a list of stage dicts, or
    None for a model trained without dropping. `verify=None` verifies models up to `VERIFY_AUTO_MAX_PARAMETERS`.
    """
    checkpoint, llm_config, output = Path(checkpoint), Path(llm_config), Path(output).absolute()
    dtype = parse_dtype(dtype)
    max_shard_size = parse_size(shard_size)
    check_output_available(output, force, sources=[checkpoint, llm_config])
    remote = load_remote_code(code_folder or Path(__file__).resolve().parent.parent, need_modeling=True, need_processing=True)

    text_config = load_text_config(llm_config)
    family = text_config.model_type
    tokenizer = load_tokenizer(llm_config)
    source = open_tensor_source(checkpoint)
    check_llm_family(source, family)
    vision_config = vision_config_from_timm(source, prefix=VISION_PREFIX, num_heads=vision_num_heads, image_size=image_size)
    config = build_timeviper_config(
        remote, text_config, vision_config, tokenizer, projector_type, tokens_per_frame, vision_feature_layer,
        token_compression, dtype,
    )

    plan = plan_reference_checkpoint(source, config)
    check_transfer_tensors(plan, config)
    plan = split_transfer_gates(plan, config)
    kinds = [stage.transfer for stage in config.compression_stages]
    if True in kinds and False in kinds[: len(kinds) - 1 - kinds[::-1].index(True)]:
        # The reference reads alpha[stage index] from a tensor sized by the number of transfer stages, so it fails
        # on such schedules; alpha[j] is the gate of the j-th transfer stage here.
        logger.warning("a drop-only stage precedes a transfer stage: the reference code could not have run this schedule")
    plan, expected = check_and_report_plan(plan, config, remote.modeling)

    if base_models is None:
        base_models = [model for model in (guess_base_model(llm_config),) if model]
    stages = "-".join(stage.to_reference_string() for stage in config.compression_stages) or "none"
    note = (
        f"Converted with `convert/convert_reference_checkpoint.py` from the reference TimeViper checkpoint "
        f"`{checkpoint.name}` (LLM config and tokenizer from `{llm_config.name}`, token compression `{stages}`)."
    )
    with atomic_output_dir(output, force) as folder:
        write_safetensors_shards(plan, folder, dtype, max_shard_size, order=list(expected), progress=progress)
        save_hub_folder(folder, config, remote, tokenizer, family, llm_config, base_models, note)
        if should_verify(verify, plan.num_parameters()):
            verify_reference_conversion(folder, source, plan, config, dtype, verify_atol)
    logger.info("wrote %s (%.1fM parameters, %s)", output, plan.num_parameters() / 1e6, str(dtype).removeprefix("torch."))
    return output


def reference_llm_from_checkpoint(source: TensorSource, text_config, dtype: torch.dtype):
    """transformers' own LLM class holding the checkpoint's LLM tensors (read straight from the checkpoint)."""
    from transformers import NemotronHForCausalLM, Qwen2ForCausalLM

    family = text_config.model_type
    body_prefix = LLM_BODY_PREFIX[family]
    model = (NemotronHForCausalLM if family == "nemotron_h" else Qwen2ForCausalLM)(text_config).float().eval()
    state = {}
    for key in source.keys():
        if key == LM_HEAD_KEY:
            state["lm_head.weight"] = source.get(key)
        elif key.startswith(body_prefix):
            name = key[len(body_prefix) :]
            if name.startswith("merge_modules.") or name == "alpha":
                continue
            state["model." + ("embeddings.weight" if name == "embedding.weight" else name)] = source.get(key)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [key for key in missing if not (key == "lm_head.weight" and text_config.tie_word_embeddings)]:
        raise ConversionError("the checkpoint's LLM does not load into transformers' own class", [*missing, *unexpected])
    if family == "nemotron_h":
        match_checkpoint_time_step_limit(model)
    return round_trip_dtype(model, dtype)


def verify_reference_conversion(folder: Path, source: TensorSource, plan: ConversionPlan, config, dtype, atol: float) -> dict:
    """Text logits against the checkpoint's LLM in transformers' class (TransV is idle without vision tokens), vision
    features against `SiglipVisionModel` with the mapped weights."""
    model = load_converted_model(folder)
    results = {
        "text logits": compare_text_logits(
            model, reference_llm_from_checkpoint(source, config.text_config, dtype), config.text_config.vocab_size,
            avoid_ids=(config.image_token_id, config.video_token_id),
        ),
        "vision features": compare_vision_features(
            model, native_vision_reference(plan, config, dtype), config.vision_feature_layer, config.vision_config.image_size
        ),
    }
    report_verification(results, atol)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert.convert_reference_checkpoint",
        description="Convert a reference TimeViper training checkpoint (one flat state dict) into a TimeViper Hub folder.",
        epilog=__doc__[__doc__.index("Example::"):].replace("Example::", "example:"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="the reference's state dict (.bin/.pth or .safetensors)")
    parser.add_argument("--llm-config", required=True, type=Path, help="base LLM folder the checkpoint was trained from (config.json, tokenizer)")
    parser.add_argument(
        "--token-compression", default=None,
        help="the checkpoint's pdrop_type, e.g. uni_7_0.5-attn_39_0.05 (or a JSON list of stage dicts); none if unused",
    )
    add_shared_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert_reference_checkpoint(
            checkpoint=args.checkpoint, llm_config=args.llm_config, output=args.output,
            token_compression=parse_token_compression(args.token_compression), projector_type=args.projector_type,
            tokens_per_frame=args.tokens_per_frame, vision_feature_layer=args.vision_feature_layer, dtype=args.dtype,
            shard_size=args.shard_size, force=args.force, verify=args.verify, verify_atol=args.verify_atol,
            vision_num_heads=args.vision_num_heads, image_size=args.image_size, base_models=args.base_models,
            progress=not args.no_progress,
        )
    except ValueError as error:  # ConversionError, or a config value that TimeViperConfig rejects
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
