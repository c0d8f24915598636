"""Convert a checkpoint of the reference TimeViper code (xiaomi-research/timeviper) into a TimeViper Hub folder.

The reference saves the whole VLM as one flat state dict (`pytorch_model.bin` or the trainer's `model.safetensors`):
`vision_backbone.featurizer.*` (timm SigLIP), `projector.projector.{0,2}.*` (Linear-GELU-Linear), and
`llm_backbone.llm.{backbone,model}.*` (Nemotron-H / Qwen2, with `merge_modules.{stage}.*` and `alpha` when TransV was
trained) plus `llm_backbone.llm.lm_head.weight`.

The checkpoint carries no config: `--llm-config` is the base LLM folder it was trained from, and
`--token-compression` the `pdrop_type` string it was trained with; TransV tensors that do not match that schedule
stop the conversion.

Example::

    python -m convert.convert_reference_checkpoint --checkpoint runs/timeviper/pytorch_model.bin \\
        --llm-config ckpts/NVIDIA-Nemotron-Nano-9B-v2-Base --token-compression uni_7_0.5-attn_39_0.05 \\
        --output TimeViper-9B
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import common

VISION_PREFIX = "vision_backbone.featurizer."
LLM_BODY_PREFIX = {"nemotron_h": "llm_backbone.llm.backbone.", "qwen2": "llm_backbone.llm.model."}
LM_HEAD_KEY = "llm_backbone.llm.lm_head.weight"


def check_llm_family(source: common.TensorSource, family: str) -> None:
    """The checkpoint's LLM prefix must be the one of `--llm-config`'s model type."""
    body_prefix = LLM_BODY_PREFIX[family]
    if not any(key.startswith(body_prefix) for key in source.keys()):
        found = [
            name for name, prefix in LLM_BODY_PREFIX.items() if any(key.startswith(prefix) for key in source.keys())
        ]
        hint = f"; it holds a {found[0]} LLM ({LLM_BODY_PREFIX[found[0]]}*)" if found else ""
        raise common.ConversionError(
            f"{source.name} has no {body_prefix}* tensors although --llm-config is a {family} model{hint}"
        )


def warn_on_unrunnable_schedule(config) -> None:
    """The reference reads alpha[stage index] from a tensor sized by the number of transfer stages, so it fails on a
    schedule where a drop-only stage precedes a transfer stage; here alpha[j] is the gate of the j-th transfer stage."""
    kinds = [stage.transfer for stage in config.compression_stages]
    if True in kinds and False in kinds[: len(kinds) - 1 - kinds[::-1].index(True)]:
        common.logger.warning(
            "a drop-only stage precedes a transfer stage: the reference code could not have run this schedule"
        )


class ReferenceConverter(common.Converter):
    """One flat state dict of the reference code, plus the base LLM folder it was trained from."""

    def __init__(self, checkpoint: Path, llm_config: Path):
        self.checkpoint, self.llm_folder = checkpoint, llm_config
        self.sources = [checkpoint, llm_config]

    def vision_config(self, text_config, num_heads, image_size):
        self.source = common.open_tensor_source(self.checkpoint)
        check_llm_family(self.source, text_config.model_type)
        return common.vision_config_from_timm(self.source, VISION_PREFIX, num_heads, image_size)

    def plan(self, config) -> common.ConversionPlan:
        family = config.text_config.model_type
        plan = common.plan_timm_siglip(self.source, prefix=VISION_PREFIX).merge(common.plan_projector(self.source))
        plan.merge(common.plan_llm(self.source, family, LLM_BODY_PREFIX[family], LM_HEAD_KEY, allow_transfer=True,
                                   tie_word_embeddings=config.text_config.tie_word_embeddings))
        plan.account_for(self.source)
        warn_on_unrunnable_schedule(config)
        return common.split_transfer_gates(plan, config)

    def base_models(self) -> list[str]:
        return [model for model in (common.guess_base_model(self.llm_folder),) if model]

    def conversion_note(self, config) -> str:
        return (
            f"Converted with `convert/convert_reference_checkpoint.py` from the reference TimeViper checkpoint "
            f"`{self.checkpoint.name}` (LLM config and tokenizer from `{self.llm_folder.name}`, token compression "
            f"`{config.compression_schedule}`)."
        )

    def text_reference(self, text_config) -> torch.nn.Module:
        """transformers' own LLM class holding the checkpoint's LLM tensors."""
        family = text_config.model_type
        model = common.text_model_class(family)(text_config).float()
        plan = common.plan_llm(self.source, family, LLM_BODY_PREFIX[family], LM_HEAD_KEY)
        state = {name.replace(common.TEXT_PREFIX, "model.", 1): tensor.load() for name, tensor in plan.tensors.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [key for key in missing if not (key == "lm_head.weight" and text_config.tie_word_embeddings)]:
            problems = [*missing, *unexpected]
            raise common.ConversionError("the checkpoint's LLM does not load into transformers' own class", problems)
        return model


def convert_reference_checkpoint(
    checkpoint: str | Path, llm_config: str | Path, output: str | Path, options: common.ConversionOptions | None = None
) -> Path:
    """Convert the reference checkpoint file `checkpoint` into a TimeViper Hub folder at `output`; return its path.
    `options.token_compression` is the `pdrop_type` the checkpoint was trained with (None or 'none': no dropping)."""
    options = options or common.ConversionOptions()
    return common.convert_to_hub(ReferenceConverter(Path(checkpoint), Path(llm_config)), output, options)


def build_parser():
    parser = common.converter_parser(
        "python -m convert.convert_reference_checkpoint",
        "Convert a reference TimeViper training checkpoint (one flat state dict) into a TimeViper Hub folder.",
        __doc__,
    )
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="the reference's state dict (.bin/.pth or .safetensors)")
    parser.add_argument("--llm-config", required=True, type=Path,
                        help="base LLM folder the checkpoint was trained from (config.json, tokenizer)")
    common.add_shared_arguments(
        parser,
        "the checkpoint's pdrop_type, e.g. uni_7_0.5-attn_39_0.05 (or a JSON list of stage dicts); none if unused",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    def convert(args, options: common.ConversionOptions) -> Path:
        return convert_reference_checkpoint(args.checkpoint, args.llm_config, args.output, options)

    return common.run_cli(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
