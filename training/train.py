r"""Fine-tune TimeViper with the Hugging Face `Trainer` (full fine-tuning or LoRA), on one or many GPUs.

    python -m training.train --model ckpts/TimeViper-9B --data train.jsonl --video-root /data/videos \
        --stage 2 --output_dir runs/sft --bf16 --gradient_checkpointing --per_device_train_batch_size 1 \
        --num_train_epochs 1 --save_steps 500

    accelerate launch --config_file training/accelerate_configs/deepspeed_zero3.yaml -m training.train ...

`--stage 1` trains the projector only (no token compression unless `--token-compression` gives one); `--stage 2`
trains the projector, the LLM and the TransV modules (`--transfer-lr`, default 5x the LLM's learning rate); the
vision tower stays frozen. TransV modules missing from the checkpoint start from the nearest attention block with a
zero gate. Every `TrainingArguments` option works; the defaults follow the paper (learning rate 1e-5, weight decay
0.01, cosine schedule, 3% warmup). Every saved folder loads with `trust_remote_code=True` (with `--lora` it holds
the adapter; `--merge-lora-and-save` also writes the merged model). See training/README.md.
"""

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from timeviper import copy_remote_code
from timeviper.configuration_timeviper import TimeViperConfig, normalize_compression
from timeviper.modeling_timeviper import TimeViperForConditionalGeneration
from timeviper.processing_timeviper import TimeViperProcessor

from convert.common import card_license, model_card

from inference.checkpoint import check_checkpoint_files, check_loading_info

from .data import TimeViperDataCollator, TimeViperSFTDataset

logger = logging.getLogger("timeviper.training")

# Mamba-2's A_log, D and dt_bias and TransV's gates (`merge_modules.<stage>.alpha`) are never weight-decayed (besides
# biases and norms).
NO_DECAY_SUFFIXES = (".A_log", ".D", ".dt_bias", ".alpha")
# The language model's Mamba in_proj, attention q/k/v/o and MLP projections (Nemotron-H blocks `layers.i.mixer.*`,
# Qwen2 layers `layers.i.self_attn.*` / `layers.i.mlp.*`). Never the vision tower (SigLIP has q/k/v_proj too), never
# Mamba's out_proj/conv1d (mamba-ssm's fused kernel reads their weights directly, bypassing LoRA), never the TransV
# modules (they are trained fully).
DEFAULT_LORA_TARGETS = (
    r"model\.language_model\.layers\.\d+\."
    r"(mixer\.(in_proj|q_proj|k_proj|v_proj|o_proj|up_proj|down_proj)"
    r"|self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    r"|mlp\.(gate_proj|up_proj|down_proj))"
)
# TrainingArguments defaults of the paper's recipe, and what this model's inputs need.
TRAINING_DEFAULTS = dict(learning_rate=1e-5, weight_decay=0.01, warmup_steps=0.03, lr_scheduler_type="cosine",
                         logging_steps=10, remove_unused_columns=False, label_names=["labels"])


def option(default, help: str):
    """A dataclass field whose `help` HfArgumentParser shows in --help."""
    return field(default=default, metadata={"help": help})


@dataclass
class TimeViperArguments:
    """Model, stage, data and LoRA options (the Trainer's own options come from `TrainingArguments`)."""

    model: str | None = option(None, "A converted TimeViper checkpoint folder (or Hub id) to fine-tune.")
    tiny: bool = option(False, "Build the embedded tiny random model and tokenizer instead of --model (smoke runs).")
    tiny_backbone: Literal["nemotron_h", "qwen2"] = option("nemotron_h", "LLM of --tiny.")
    data: list[str] = field(default_factory=list, metadata={"help": "Training JSONL file(s) (training/README.md)."})
    video_root: str | None = option(None, "Folder that relative media paths start from.")
    stage: Literal[1, 2] = option(2, "1: projector only. 2: projector + LLM + TransV (vision always frozen).")
    projector_type: Literal["tome_mlp", "mlp"] | None = option(
        None, "Override the checkpoint's projector: tome_mlp (ToMe merging) or mlp (every patch)."
    )
    token_compression: str | None = option(
        None, "Compression schedule, e.g. 'uni_7_0.5-attn_39_0.05' (keep ratios), or 'none'. "
        "Default: none for stage 1, the checkpoint's for stage 2."
    )
    projector_lr: float | None = option(None, "Projector LR (default: --learning_rate).")
    llm_lr: float | None = option(None, "LLM LR (default: --learning_rate).")
    transfer_lr: float | None = option(
        None, "TransV (merge_modules, alpha) LR (default: 5x the LLM LR, as in the paper)."
    )
    lora: bool = option(False, "Train LoRA adapters on the LLM instead of its full weights.")
    lora_r: int = option(128, "LoRA rank (the reference's default).")
    lora_alpha: int = option(256, "LoRA alpha.")
    lora_dropout: float = option(0.05, "LoRA dropout.")
    lora_target_modules: str = option(
        DEFAULT_LORA_TARGETS, "Regex (full match on module names) of the Linear layers that get adapters."
    )
    merge_lora_and_save: bool = option(False, "After LoRA training, merge the adapters and save the full model.")
    merged_output_dir: str | None = option(None, "Where --merge-lora-and-save writes (default: <output_dir>/merged).")
    fps: float = option(1.0, "Frames per second to sample.")
    num_frames: int | None = option(None, "Sample this many frames instead of --fps.")
    max_frames: int = option(256, "At most this many frames (uniform subsampling).")
    min_frames: int | None = option(None, "At least this many frames.")
    max_length: int | None = option(
        None, "Raise on samples longer than this many tokens (vision placeholders included)."
    )
    check_media_files: bool = option(True, "Check that every media file exists while validating the data.")
    preflight: bool = option(
        True, "Before step 1, open every video (decoding one frame) and image and measure every sample against "
        "--max_length, so that a bad sample stops the run before training instead of at its step."
    )
    skip_bad_samples: bool = option(
        False, "Drop the samples the preflight rejects (each is logged) instead of stopping."
    )
    pad_to_multiple_of: int | None = option(None, "Pad batches to a multiple of this.")


def compression_override(args: TimeViperArguments):
    """The schedule to build the model with, or None to keep the checkpoint's."""
    if args.token_compression is not None:
        return normalize_compression(args.token_compression)
    if args.stage == 1:
        logger.info("stage 1 trains without token compression, as the paper does (--token-compression overrides)")
        return []
    return None


def build_tiny(args: TimeViperArguments):
    """The embedded tiny random TimeViper of the ask CLI (byte-level tokenizer), for smoke runs."""
    from inference.tiny_default import build_tiny_default

    model, processor = build_tiny_default(
        args.tiny_backbone, compression_override(args) or None, args.projector_type or "tome_mlp", seed=None
    )
    return model.train(), processor, bool(model.config.compression_stages)


def build_from_checkpoint(args: TimeViperArguments):
    if os.path.isdir(args.model):
        check_checkpoint_files(Path(args.model))  # names a missing, truncated or mis-indexed shard
    config_dict, _ = TimeViperConfig.get_config_dict(args.model)
    if args.projector_type is not None:
        config_dict["projector_type"] = args.projector_type
    schedule = compression_override(args)
    if schedule is not None:
        config_dict["token_compression"] = schedule
    config = TimeViperConfig.from_dict(config_dict)
    model, loading_info = TimeViperForConditionalGeneration.from_pretrained(
        args.model, config=config, dtype=torch.float32, output_loading_info=True
    )
    forget_unused_weight_conversions(model)
    # trust_remote_code: the image/video sub-processors load through their Auto classes, which read auto_map.
    processor = TimeViperProcessor.from_pretrained(args.model, trust_remote_code=True)
    if args.projector_type is not None:  # a new projector type embeds its own number of tokens per frame
        processor.tokens_per_frame = config.vision_tokens_per_frame
    processor.check_model_config(config)
    # Only TransV modules may be missing: `build_model_and_processor` initialises them from the nearest attention.
    check_loading_info(model, loading_info, args.model, transfer_initialised=True)
    return model, processor, any(".merge_modules." in key for key in loading_info["missing_keys"])


def forget_unused_weight_conversions(model) -> None:
    """Keep only the checkpoint key renamings that loading applied, so that `save_pretrained` writes the keys it read.

    transformers records the renamings on the model (`_weight_conversions`) and reverses them when saving. Its usual
    loader records those that matched a key; its DeepSpeed ZeRO-3 loader (5.x) records all of them, among which
    SigLIP's `PrefixChange(prefix_to_remove="vision_model")`, scoped to our `vision_tower`. Reversed at save, it
    renamed every `model.vision_tower.X` of a ZeRO-3 fine-tuned checkpoint to `model.vision_tower.vision_model.X`."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [conversion for conversion in conversions if conversion.was_used()]


def init_transfer_modules(model) -> None:
    """`init_transfer_from_nearest_attention`, gathering the partitioned weights it reads and writes under ZeRO-3."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        model.init_transfer_from_nearest_attention()
        return
    import deepspeed

    text_model = model.model.language_model
    parameters = list(text_model.merge_modules.parameters())
    for layer in text_model.layers:
        if layer.attention is not None:
            parameters += list(layer.attention.parameters())
    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=0):
        model.init_transfer_from_nearest_attention()


def build_model_and_processor(args: TimeViperArguments):
    """(model in fp32, processor). TransV modules that the weights lack are initialised from the nearest attention."""
    model, processor, missing_transfer = build_tiny(args) if args.tiny else build_from_checkpoint(args)
    if missing_transfer:
        logger.info("initialising the TransV modules from the nearest attention blocks (gate alpha = 0)")
        init_transfer_modules(model)
    config = model.config
    if processor.video_token_id != config.video_token_id or processor.image_token_id != config.image_token_id:
        raise ValueError(
            f"the processor's placeholder ids (video {processor.video_token_id}, image {processor.image_token_id}) "
            f"differ from the model's (video {config.video_token_id}, image {config.image_token_id})"
        )
    return model, processor


def configure_trainable(model, stage: int) -> None:
    """Stage 1: projector. Stage 2: projector + language model (with TransV) + lm_head. Vision: never."""
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if stage == 2:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)


def apply_lora(model, args: TimeViperArguments):
    """Wrap with PEFT: LoRA on the LLM's projections; the projector and the TransV modules (each with its gate
    `alpha`) are trained fully (`modules_to_save`), so the adapter folder holds every trained tensor."""
    from peft import LoraConfig, get_peft_model

    # merge_modules exists only when the schedule has TransV stages; iterating a ModuleDict yields its keys.
    transfer = [f"merge_modules.{stage}" for stage in getattr(model.model.language_model, "merge_modules", ())]
    lora_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                             target_modules=args.lora_target_modules,
                             modules_to_save=["multi_modal_projector", *transfer], bias="none")
    return get_peft_model(model, lora_config)


def parameter_group(name: str) -> str:
    """`vision`, `projector`, `llm` or `transfer` for a parameter name (PEFT/FSDP prefixes allowed)."""
    if ".merge_modules." in name:
        return "transfer"
    if "multi_modal_projector." in name:
        return "projector"
    if "vision_tower." in name:
        return "vision"
    if "language_model." in name or "lm_head." in name:
        return "llm"
    raise ValueError(f"parameter {name!r} belongs to no known TimeViper module")


def module_learning_rates(args: TimeViperArguments, learning_rate: float) -> dict[str, float]:
    llm_lr = args.llm_lr if args.llm_lr is not None else learning_rate
    return {
        "vision": learning_rate,
        "projector": args.projector_lr if args.projector_lr is not None else learning_rate,
        "llm": llm_lr,
        "transfer": args.transfer_lr if args.transfer_lr is not None else 5.0 * llm_lr,
    }


class TimeViperTrainer(Trainer):
    """`Trainer` whose optimizer has one parameter group per module (and weight-decay class), each with its own
    learning rate. The optimizer class and its other settings still come from `--optim` and friends."""

    def __init__(self, *args, learning_rates: dict[str, float] | None = None, card_notes: str = "",
                 base_model_path: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.learning_rates = dict(learning_rates or {})
        self.card_notes, self.base_model_path = card_notes, base_model_path

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None) -> None:
        """The output folder's README.md as a `huggingface_hub.ModelCard` (push_to_hub uploads this one). `license`,
        `tags` and `finetuned_from` override or add to the base model's; `language` and `dataset` become metadata.
        `model_name`, `tasks`, `dataset_tags` and `dataset_args` are ignored: the title stays TimeViper's, and they
        describe the Trainer's evaluation table, which this card does not have."""
        if not self.is_world_process_zero():
            return
        model = self.accelerator.unwrap_model(self.model)
        lora = is_peft_model(model)
        base_models = [finetuned_from] if finetuned_from else card_base_models(self.base_model_path)
        config = model.config
        # The license of --model's own card when it is a local folder with one, else the backbone's.
        family = config.text_config.model_type
        license_fields = {"license": license} if license else card_license(family, self.base_model_path)
        extra_tags = ["fine-tuned", *(["lora"] if lora else []), *([tags] if isinstance(tags, str) else tags or [])]
        metadata = {key: value for key, value in (("language", language), ("datasets", dataset)) if value}
        card = model_card(config, base_models, license_fields, extra_tags, self.card_notes,
                          library_name="peft" if lora else "transformers", **metadata)
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay_names = set(self.get_decay_parameter_names(opt_model))
        grouped: dict[tuple[str, bool], list] = {}
        for name, parameter in opt_model.named_parameters():
            if not parameter.requires_grad:
                continue
            decay = name in decay_names and not name.endswith(NO_DECAY_SUFFIXES)
            grouped.setdefault((parameter_group(name), decay), []).append(parameter)
        param_groups = [
            {"params": params, "lr": self.learning_rates.get(module, self.args.learning_rate),
             "weight_decay": self.args.weight_decay if decay else 0.0,
             "name": module if decay else f"{module}_no_decay"}
            for (module, decay), params in sorted(grouped.items())
        ]
        if not param_groups:
            raise ValueError("no parameter requires a gradient: nothing to train")
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
            raise ValueError(f"--optim {self.args.optim} builds its own parameter groups; per-module LRs need another")
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def card_base_models(model_path: str | None) -> list[str]:
    """Hub ids for the card's `base_model`: `--model` itself when it is a Hub id, the base models its own card lists
    when it is a local folder (e.g. a converted checkpoint), none for `--tiny`."""
    from huggingface_hub import ModelCard

    if model_path is None:
        return []
    if not os.path.isdir(model_path):
        return [model_path]
    readme = Path(model_path) / "README.md"
    base = ModelCard.load(readme).data.base_model if readme.is_file() else None
    return [base] if isinstance(base, str) else list(base or [])


def training_notes(args: TimeViperArguments, training_args: TrainingArguments) -> str:
    method = f"LoRA (r={args.lora_r}, alpha={args.lora_alpha}) on the language model" if args.lora else "full fine-tuning"
    base = "the embedded tiny random-weight model" if args.tiny else f"`{args.model}`"
    return (
        f"## Fine-tuning\n\nStage {args.stage} ({method}) of {base} with `python -m training.train`, "
        f"{training_args.num_train_epochs:g} epoch(s) / max {training_args.max_steps} steps, learning rate "
        f"{training_args.learning_rate:g}."
    )


class SaveRemoteCodeCallback(TrainerCallback):
    """Puts the remote-code files into the output folder and every checkpoint folder, so each is self-contained."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            copy_remote_code(args.output_dir)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(checkpoint):
            copy_remote_code(checkpoint)


def parse_args(argv=None) -> tuple[TimeViperArguments, TrainingArguments]:
    parser = HfArgumentParser((TimeViperArguments, TrainingArguments), prog="python -m training.train",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(**TRAINING_DEFAULTS)
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if (args.model is None) == (not args.tiny):
        parser.error("give exactly one of --model FOLDER and --tiny")
    if not args.data:
        parser.error("--data needs at least one JSONL file")
    if training_args.output_dir is None:
        parser.error("--output_dir is required")
    if training_args.remove_unused_columns:
        parser.error("--remove_unused_columns must stay False: the Trainer would drop pixel_values_videos")
    if args.lora and args.stage == 1:
        parser.error("--lora adapts the LLM, which stage 1 keeps frozen; use --stage 2")
    if args.merge_lora_and_save and not args.lora:
        parser.error("--merge-lora-and-save needs --lora")
    if args.token_compression is not None:
        normalize_compression(args.token_compression)  # raises a ValueError naming the bad stage
    # Saving into the source folder (or one inside it) rewrites the only copy of the weights in place, so a kill
    # during that save would leave nothing loadable.
    if args.model is not None and os.path.isdir(args.model):
        source, output = Path(args.model).resolve(), Path(training_args.output_dir).resolve()
        if output == source or source in output.parents:
            parser.error(
                f"--output_dir {training_args.output_dir} is {'' if output == source else 'inside '}the --model folder "
                f"{args.model}: the saves would overwrite the model being trained from; choose another output folder"
            )
    return args, training_args


def incomplete_checkpoint(folder: str | os.PathLike) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when its save finished. The Trainer writes
    `trainer_state.json` last (after the weights, optimizer, scheduler and RNG states), so a save cut short by a kill
    lacks it or holds it half-written."""
    state = Path(folder) / TRAINER_STATE_NAME
    if not state.is_file():
        return f"it has no {TRAINER_STATE_NAME} (its save was cut short)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except ValueError:
        return f"its {TRAINER_STATE_NAME} is cut short"
    return None


def newest_complete_checkpoint(output_dir: str) -> str:
    """The newest `checkpoint-N` of `output_dir` whose save finished; newer, half-written ones are skipped (and named
    in a warning), not deleted."""
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    found = [path for path in Path(output_dir).glob(prefix + "*") if path.name.removeprefix(prefix).isdigit()]
    skipped = []
    for folder in sorted(found, key=lambda path: int(path.name.removeprefix(prefix)), reverse=True):
        problem = incomplete_checkpoint(folder)
        if problem is None:
            if skipped:
                logger.warning("resuming from %s; skipped the incomplete newer %s", folder, "; ".join(skipped))
            return str(folder)
        skipped.append(f"{folder} ({problem})")
    if skipped:
        raise FileNotFoundError(f"no complete checkpoint in {output_dir} to resume from: " + "; ".join(skipped))
    raise FileNotFoundError(f"no {PREFIX_CHECKPOINT_DIR}-* folder in {output_dir} to resume from")


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint` as given, or the newest complete checkpoint of the output folder for
    `latest`/`true`."""
    value = training_args.resume_from_checkpoint
    if value is None or value.lower() in ("", "false", "no"):
        return None
    if value.lower() in ("latest", "last", "true", "yes"):
        return newest_complete_checkpoint(training_args.output_dir)
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such folder")
    problem = incomplete_checkpoint(value)
    if problem is not None:
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: {problem}; resume from an earlier checkpoint")
    return value


def main(argv=None, callbacks=()) -> Trainer:
    """Run the command line `argv` (default: sys.argv); extra `TrainerCallback`s may be given. Returns the Trainer."""
    args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not training_args.should_log:
        logger.setLevel(logging.WARNING)
    return run_training(args, training_args, callbacks)


def parameter_count(parameter: torch.nn.Parameter) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it away (its local tensor is then empty)."""
    return getattr(parameter, "ds_numel", parameter.numel())


def run_training(args: TimeViperArguments, training_args: TrainingArguments, callbacks=()) -> Trainer:
    """Build the model, processor, dataset and Trainer, train, save (and push / merge) as the arguments say."""
    set_seed(training_args.seed)  # the tiny model and new TransV modules are random: same seed, same start
    model, processor = build_model_and_processor(args)
    configure_trainable(model, args.stage)
    if args.lora:
        model = apply_lora(model, args)
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    mode = " (LoRA)" if args.lora else ""
    logger.info("stage %d%s: %d of %d parameters trainable", args.stage, mode, trainable, total)

    dataset = TimeViperSFTDataset(
        args.data, processor, video_root=args.video_root, fps=args.fps, num_frames=args.num_frames,
        max_frames=args.max_frames, min_frames=args.min_frames, max_length=args.max_length,
        check_files=args.check_media_files,
    )
    if args.preflight:
        for problem in dataset.preflight(skip_bad_samples=args.skip_bad_samples):
            logger.warning("skipping %s", problem)
    logger.info("%d training samples", len(dataset))
    trainer = TimeViperTrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=processor,
        data_collator=TimeViperDataCollator.from_processor(processor, args.pad_to_multiple_of),
        callbacks=[SaveRemoteCodeCallback(), *callbacks],
        learning_rates=module_learning_rates(args, training_args.learning_rate),
        card_notes=training_notes(args, training_args), base_model_path=args.model,
    )
    if args.merge_lora_and_save and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        raise ValueError(
            "--merge-lora-and-save merges unsharded weights in one process; with FSDP or DeepSpeed, train without it "
            "and merge the saved adapter afterwards (training/README.md, 'Merging LoRA adapters')"
        )
    trainer.train(resume_from_checkpoint=resolve_resume(training_args))

    trainer.save_model()
    trainer.create_model_card()
    if trainer.is_world_process_zero():
        copy_remote_code(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message=f"TimeViper stage {args.stage} fine-tuning")
    if args.merge_lora_and_save and trainer.is_world_process_zero():
        merged_dir = args.merged_output_dir or os.path.join(training_args.output_dir, "merged")
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        merged.save_pretrained(merged_dir)
        processor.save_pretrained(merged_dir)
        copy_remote_code(merged_dir)
        model_card(
            merged.config, card_base_models(args.model), card_license(merged.config.text_config.model_type, args.model),
            ["fine-tuned", "lora-merged"], trainer.card_notes,
        ).save(os.path.join(merged_dir, "README.md"))
        logger.info("merged model saved to %s", merged_dir)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
