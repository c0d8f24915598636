"""Build a TimeViper Hub folder from raw parts: a base LLM, SigLIP weights and (optionally) a stage-1 projector.

* `--llm`: NVIDIA-Nemotron-Nano-9B-v2(-Base) as NVIDIA publishes it (`backbone.*`), or a Qwen2.5 folder (`model.*`).
* `--vision`: a timm `vit_so400m_patch14_siglip_384` state dict (also under the reference's
  `vision_backbone.featurizer.` prefix), or a transformers SigLIP folder (`SiglipVisionModel` or `SiglipModel`).
* `--projector`: a stage-1 checkpoint (the reference's `projector.projector.*`, or one of our Hub folders); without
  it the projector is freshly initialised from `--seed`.

TransV modules of the transfer stages in `--token-compression` start as copies of the nearest attention block at or
after their layer, with `alpha = 0` (plain dropping until trained).

Example::

    python -m convert.convert_raw_to_hub --llm ckpts/NVIDIA-Nemotron-Nano-9B-v2-Base \\
        --vision ckpts/vit_so400m_patch14_siglip_384.pth --token-compression uni_7_0.5-attn_39_0.05 \\
        --output TimeViper-9B-init
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from . import common

LLM_BODY_PREFIX = {"nemotron_h": "backbone.", "qwen2": "model."}
REFERENCE_VISION_PREFIX = "vision_backbone.featurizer."


def plan_vision(path: Path, num_heads: int | None = None, image_size: int | None = None):
    """(plan, SiglipVisionConfig, source) for `--vision`: a timm state-dict file or a transformers SigLIP folder."""
    if path.is_dir():
        vision_config = hf_siglip_vision_config(path, image_size)
        source = common.open_tensor_source(path)
        return common.plan_hf_siglip(source), vision_config, source
    source = common.open_tensor_source(path)
    keys = source.keys()
    for prefix in ("", REFERENCE_VISION_PREFIX):  # a timm file, or a reference checkpoint holding the timm tower
        if prefix + "patch_embed.proj.weight" in keys:
            vision_config = common.vision_config_from_timm(source, prefix, num_heads, image_size)
            plan = common.plan_timm_siglip(source, prefix=prefix)
            plan.account_for(source, unused_reason="not needed: only the vision tower is taken from --vision")
            return plan, vision_config, source
    if any(key.startswith("vision_model.") for key in keys):
        raise common.ConversionError(
            f"{path} holds transformers SigLIP weights; pass its folder (with config.json) instead"
        )
    raise common.ConversionError(
        f"{path} is neither a timm SigLIP state dict (patch_embed.proj.weight) nor a transformers SigLIP checkpoint",
        sorted(keys)[:10],
    )


def hf_siglip_vision_config(folder: Path, image_size: int | None):
    """The `SiglipVisionConfig` of a transformers SigLIP folder (of a `SiglipVisionModel` or a `SiglipModel`)."""
    from transformers import SiglipVisionConfig

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise common.ConversionError(f"{folder} has no config.json; a transformers SigLIP folder needs one")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type not in ("siglip", "siglip_vision_model"):
        raise common.ConversionError(
            f"{config_path}: model_type {model_type!r} is not a SigLIP with a convolutional patch embedding "
            "(siglip / siglip_vision_model). For SigLIP 2 use a fixed-resolution checkpoint such as "
            "google/siglip2-so400m-patch14-384, or the timm weights."
        )
    vision_config = SiglipVisionConfig.from_pretrained(str(folder), vision_use_head=False)
    if image_size is not None and image_size != vision_config.image_size:
        raise common.ConversionError(
            f"--image-size {image_size} differs from the folder's image_size {vision_config.image_size}"
        )
    return vision_config


def plan_projector_checkpoint(path: Path) -> tuple[common.ConversionPlan, common.TensorSource]:
    """The projector of a stage-1 checkpoint; its other tensors are reported as not needed."""
    source = common.open_tensor_source(path)
    plan = common.plan_projector(source)
    if not plan.tensors:
        raise common.ConversionError(
            f"{path} holds no projector tensors (projector.projector.* or model.multi_modal_projector.*)",
            sorted(source.keys())[:10],
        )
    return plan.account_for(source, unused_reason="not needed: only the projector is taken from --projector"), source


class RawConverter(common.Converter):
    """A base LLM folder, SigLIP weights and an optional stage-1 projector."""

    def __init__(self, llm: Path, vision: Path, projector: Path | None, seed: int | None):
        self.llm_folder, self.vision, self.projector, self.seed = llm, vision, projector, seed
        self.sources = [path for path in (llm, vision, projector) if path is not None]

    def vision_config(self, text_config, num_heads, image_size):
        self.vision_plan, vision_config, self.vision_source = plan_vision(self.vision, num_heads, image_size)
        return vision_config

    def plan(self, config) -> common.ConversionPlan:
        text_config = config.text_config
        llm_source = common.open_tensor_source(self.llm_folder)
        plan = common.ConversionPlan().merge(self.vision_plan)
        sources = [llm_source, self.vision_source]
        if self.projector is not None:
            projector_plan, projector_source = plan_projector_checkpoint(self.projector)
            plan.merge(projector_plan)
            sources.append(projector_source)
        else:
            vision_hidden = config.vision_config.hidden_size
            self.seed = vision_hidden if self.seed is None else self.seed
            plan.merge(common.plan_fresh_projector(vision_hidden, text_config.hidden_size, self.seed))
        family = text_config.model_type
        plan.merge(common.plan_llm(llm_source, family, LLM_BODY_PREFIX[family], "lm_head.weight",
                                   tie_word_embeddings=text_config.tie_word_embeddings))
        plan.merge(common.plan_transfer_init(plan, config))
        return plan.account_for(*sources)

    def base_models(self) -> list[str]:
        return [model for model in map(common.guess_base_model, (self.llm_folder, self.vision)) if model]

    def conversion_note(self, config) -> str:
        lines = [
            f"Converted with `convert/convert_raw_to_hub.py` from the {config.text_config.model_type} LLM "
            f"`{self.llm_folder.name}` and the SigLIP weights `{self.vision.name}`."
        ]
        if self.projector is not None:
            lines.append(f"The projector comes from the stage-1 checkpoint `{self.projector.name}`.")
        else:
            lines.append(f"The projector is freshly initialised (seed {self.seed}) and untrained.")
        if any(stage.transfer for stage in config.compression_stages):
            lines.append(
                "Each TransV module starts as a copy of the nearest attention block, with alpha = 0 (untrained)."
            )
        return " ".join(lines)

    def text_reference(self, text_config) -> torch.nn.Module:
        model_class = common.text_model_class(text_config.model_type)
        return model_class.from_pretrained(str(self.llm_folder), dtype=torch.float32)


def convert_raw_to_hub(llm: str | Path, vision: str | Path, output: str | Path, projector: str | Path | None = None,
                       seed: int | None = None, options: common.ConversionOptions | None = None) -> Path:
    """Convert raw sources into a TimeViper Hub folder at `output` and return its path. `seed` seeds a fresh projector
    (default: the vision width, as the reference does)."""
    options = options or common.ConversionOptions()
    projector = Path(projector) if projector is not None else None
    return common.convert_to_hub(RawConverter(Path(llm), Path(vision), projector, seed), output, options)


def build_parser():
    parser = common.converter_parser(
        "python -m convert.convert_raw_to_hub",
        "Build a TimeViper Hub folder from a base LLM (Nemotron-H or Qwen2.5), SigLIP weights and an optional "
        "stage-1 projector.",
        __doc__,
    )
    parser.add_argument("--llm", required=True, type=Path, help="base LLM folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--vision", required=True, type=Path,
                        help="timm SigLIP state dict file, or a transformers SigLIP folder")
    parser.add_argument("--projector", type=Path, help="stage-1 checkpoint holding the projector (else a fresh init)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of a fresh projector (default: the vision width, as the reference)")
    common.add_shared_arguments(
        parser, "compression stages: a reference string such as uni_7_0.5-attn_39_0.05, or a JSON list of stage dicts"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    def convert(args, options: common.ConversionOptions) -> Path:
        return convert_raw_to_hub(args.llm, args.vision, args.output, args.projector, args.seed, options)

    return common.run_cli(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
