"""Build a TimeViper Hub folder from raw parts: a base LLM, SigLIP weights and (optionally) a stage-1 projector.

Sources, in the formats their publishers use:

* `--llm`: NVIDIA-Nemotron-Nano-9B-v2(-Base) as NVIDIA publishes it (config.json with `hybrid_override_pattern`,
  sharded safetensors with `backbone.*` and `lm_head.weight`, tokenizer, generation_config.json), or a Qwen2.5
  folder (`model.*`, `lm_head.weight`).
* `--vision`: a timm `vit_so400m_patch14_siglip_384` state dict (.bin/.pth/.safetensors: `patch_embed.proj.*`,
  `pos_embed`, `blocks.{i}.*` with fused `attn.qkv`, `norm.*`, `attn_pool.*`; also under the reference's
  `vision_backbone.featurizer.` prefix), or a transformers SigLIP folder (`SiglipVisionModel`, or a full
  `SiglipModel` whose text tower is skipped).
* `--projector`: a stage-1 checkpoint (the reference's flat state dict with `projector.projector.*`, or one of our
  Hub folders); without it the projector is freshly initialised from `--seed`.

TransV modules of the transfer stages in `--token-compression` start as copies of the nearest attention block at or
after their layer, with `alpha = 0` (plain dropping until trained).

Example::

    python -m convert.convert_raw_to_hub --llm ckpts/NVIDIA-Nemotron-Nano-9B-v2-Base \\
        --vision ckpts/vit_so400m_patch14_siglip_384.pth --token-compression uni_7_0.5-attn_39_0.05 \\
        --output TimeViper-9B-init
"""

from __future__ import annotations

import argparse
import json
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
    plan_fresh_projector,
    plan_hf_siglip,
    plan_llm,
    plan_projector,
    plan_timm_siglip,
    plan_transfer_init,
    report_verification,
    round_trip_dtype,
    save_hub_folder,
    should_verify,
    vision_config_from_timm,
    write_safetensors_shards,
)

LLM_BODY_PREFIX = {"nemotron_h": "backbone.", "qwen2": "model."}
REFERENCE_VISION_PREFIX = "vision_backbone.featurizer."


def plan_vision(path: Path, num_heads: int | None = None, image_size: int | None = None):
    """(plan, SiglipVisionConfig, sources) for `--vision`: a timm state-dict file or a transformers SigLIP folder."""
    from transformers import SiglipVisionConfig

    path = Path(path)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{path} has no config.json; a transformers SigLIP folder needs one")
        values = json.loads(config_path.read_text())
        model_type = values.get("model_type")
        if model_type == "siglip":
            values = values.get("vision_config", {})
        elif model_type != "siglip_vision_model":
            raise ConversionError(
                f"{config_path}: model_type {model_type!r} is not a SigLIP with a convolutional patch embedding "
                "(siglip / siglip_vision_model). For SigLIP 2 use a fixed-resolution checkpoint such as "
                "google/siglip2-so400m-patch14-384, or the timm weights."
            )
        values = {key: value for key, value in values.items() if key not in ("model_type", "architectures", "transformers_version")}
        vision_config = SiglipVisionConfig(**{**values, "vision_use_head": False})
        if image_size is not None and image_size != vision_config.image_size:
            raise ConversionError(f"--image-size {image_size} differs from the folder's image_size {vision_config.image_size}")
        source = open_tensor_source(path)
        return plan_hf_siglip(source), vision_config, [source]
    source = open_tensor_source(path)
    keys = source.keys()
    for prefix in ("", REFERENCE_VISION_PREFIX):  # a timm file, or a reference checkpoint holding the timm tower
        if prefix + "patch_embed.proj.weight" in keys:
            vision_config = vision_config_from_timm(source, prefix=prefix, num_heads=num_heads, image_size=image_size)
            plan = plan_timm_siglip(source, prefix=prefix)
            for key in keys:
                if not key.startswith(prefix):
                    plan.skip(source.label(key), "not needed: only the vision tower is taken from --vision")
            return plan, vision_config, [source]
    if any(key.startswith("vision_model.") for key in keys):
        raise ConversionError(f"{path} holds transformers SigLIP weights; pass its folder (with config.json) instead")
    raise ConversionError(
        f"{path} is neither a timm SigLIP state dict (patch_embed.proj.weight) nor a transformers SigLIP checkpoint",
        sorted(keys)[:10],
    )


def plan_projector_checkpoint(path: Path) -> tuple[ConversionPlan, TensorSource]:
    """The projector of a stage-1 checkpoint; its other tensors are reported as not needed."""
    source = open_tensor_source(path)
    plan = plan_projector(source)
    if not plan.tensors:
        raise ConversionError(
            f"{path} holds no projector tensors (projector.projector.* or model.multi_modal_projector.*)",
            sorted(source.keys())[:10],
        )
    for key in source.keys():
        label = source.label(key)
        if label not in plan.used and label not in plan.unexpected:
            plan.skip(label, "not needed: only the projector is taken from --projector")
    return plan, source


def convert_raw_to_hub(
    llm: str | Path,
    vision: str | Path,
    output: str | Path,
    projector: str | Path | None = None,
    token_compression=None,
    projector_type: str = "tome_mlp",
    tokens_per_frame: int = 16,
    vision_feature_layer: int = -2,
    dtype: str | torch.dtype = "bf16",
    shard_size: str | int = "5GB",
    force: bool = False,
    seed: int | None = None,
    verify: bool | None = None,
    verify_atol: float = 1e-3,
    vision_num_heads: int | None = None,
    image_size: int | None = None,
    base_models: list[str] | None = None,
    progress: bool = True,
    code_folder: str | Path | None = None,
) -> Path:
    """Convert raw sources into a TimeViper Hub folder at `output` and return its path. See the module docstring.

    `token_compression` is a reference string (`uni_7_0.5-attn_39_0.05`), a list of stage dicts, or None.
    `verify=None` verifies models up to `VERIFY_AUTO_MAX_PARAMETERS` parameters. `code_folder` is where the three
    remote-code files are read from (the repository root by default).
    """
    llm, vision, output = Path(llm), Path(vision), Path(output).absolute()
    dtype = parse_dtype(dtype)
    max_shard_size = parse_size(shard_size)
    check_output_available(output, force, sources=[path for path in (llm, vision, projector) if path is not None])
    remote = load_remote_code(code_folder or Path(__file__).resolve().parent.parent, need_modeling=True, need_processing=True)

    text_config = load_text_config(llm)
    family = text_config.model_type
    tokenizer = load_tokenizer(llm)
    vision_plan, vision_config, vision_sources = plan_vision(vision, vision_num_heads, image_size)
    config = build_timeviper_config(
        remote, text_config, vision_config, tokenizer, projector_type, tokens_per_frame, vision_feature_layer,
        token_compression, dtype,
    )

    llm_source = open_tensor_source(llm)
    plan = ConversionPlan().merge(vision_plan)
    sources: list[TensorSource] = [llm_source, *vision_sources]
    if projector is not None:
        projector_plan, projector_source = plan_projector_checkpoint(Path(projector))
        plan.merge(projector_plan)
        sources.append(projector_source)
    else:
        seed = vision_config.hidden_size if seed is None else seed
        plan.merge(plan_fresh_projector(vision_config.hidden_size, text_config.hidden_size, seed))
    plan.merge(
        plan_llm(llm_source, family, LLM_BODY_PREFIX[family], "lm_head.weight", tie_word_embeddings=text_config.tie_word_embeddings)
    )
    plan.merge(plan_transfer_init(plan, config))
    plan.account_for(*sources)

    plan, expected = check_and_report_plan(plan, config, remote.modeling)

    base_models = base_models if base_models is not None else [m for m in (guess_base_model(llm), guess_base_model(vision)) if m]
    note = conversion_note(family, llm, vision, projector, seed, config)
    with atomic_output_dir(output, force) as folder:
        write_safetensors_shards(plan, folder, dtype, max_shard_size, order=list(expected), progress=progress)
        save_hub_folder(folder, config, remote, tokenizer, family, llm, base_models, note)
        if should_verify(verify, plan.num_parameters()):
            verify_raw_conversion(folder, llm, plan, config, dtype, verify_atol)
    logger.info("wrote %s (%.1fM parameters, %s)", output, plan.num_parameters() / 1e6, str(dtype).removeprefix("torch."))
    return output


def conversion_note(family: str, llm: Path, vision: Path, projector: Path | None, seed: int | None, config) -> str:
    """The model card's account of where each part comes from and what is untrained."""
    lines = [f"Converted with `convert/convert_raw_to_hub.py` from the {family} LLM `{llm.name}` and the SigLIP weights `{vision.name}`."]
    if projector is not None:
        lines.append(f"The projector comes from the stage-1 checkpoint `{Path(projector).name}`.")
    else:
        lines.append(f"The projector is freshly initialised (seed {seed}) and untrained.")
    if any(stage.transfer for stage in config.compression_stages):
        lines.append("Each TransV module starts as a copy of the nearest attention block, with alpha = 0 (untrained).")
    return " ".join(lines)


def native_text_reference(family: str, llm: Path, dtype: torch.dtype):
    """The source LLM through transformers' own class, in fp32 with its weights rounded through the output dtype."""
    from transformers import NemotronHForCausalLM, Qwen2ForCausalLM

    if family == "nemotron_h":
        reference = match_checkpoint_time_step_limit(NemotronHForCausalLM.from_pretrained(str(llm), dtype=torch.float32))
    else:
        reference = Qwen2ForCausalLM.from_pretrained(str(llm), dtype=torch.float32)
    return round_trip_dtype(reference.eval(), dtype)


def verify_raw_conversion(folder: Path, llm: Path, plan: ConversionPlan, config, dtype: torch.dtype, atol: float) -> dict:
    """Text logits against the source LLM, vision features against `SiglipVisionModel` with the mapped weights."""
    model = load_converted_model(folder)
    family = config.text_config.model_type
    results = {
        "text logits": compare_text_logits(
            model, native_text_reference(family, llm, dtype), config.text_config.vocab_size,
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
        prog="python -m convert.convert_raw_to_hub",
        description="Build a TimeViper Hub folder from a base LLM (Nemotron-H or Qwen2.5), SigLIP weights and an "
        "optional stage-1 projector.",
        epilog=__doc__[__doc__.index("Example::"):].replace("Example::", "example:"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--llm", required=True, type=Path, help="base LLM folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--vision", required=True, type=Path, help="timm SigLIP state dict file, or a transformers SigLIP folder")
    parser.add_argument("--projector", type=Path, help="stage-1 checkpoint holding the projector (else a fresh init)")
    parser.add_argument(
        "--token-compression", default=None,
        help="compression stages: a reference string such as uni_7_0.5-attn_39_0.05, or a JSON list of stage dicts",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of a fresh projector (default: the vision width, as the reference)")
    add_shared_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert_raw_to_hub(
            llm=args.llm, vision=args.vision, output=args.output, projector=args.projector,
            token_compression=parse_token_compression(args.token_compression), projector_type=args.projector_type,
            tokens_per_frame=args.tokens_per_frame, vision_feature_layer=args.vision_feature_layer, dtype=args.dtype,
            shard_size=args.shard_size, force=args.force, seed=args.seed, verify=args.verify,
            verify_atol=args.verify_atol, vision_num_heads=args.vision_num_heads, image_size=args.image_size,
            base_models=args.base_models, progress=not args.no_progress,
        )
    except ValueError as error:  # ConversionError, or a config value that TimeViperConfig rejects
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
