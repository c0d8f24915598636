"""Machinery shared by the checkpoint converters in `convert/`.

A `Converter` names its sources and maps their keys into a `ConversionPlan` (every source tensor is used, skipped with
a reason, or rejected); `convert_to_hub` checks the plan against the model's state dict before any byte is written,
streams the tensors one at a time into a temporary folder, and renames it into place once everything, verification
included, succeeded. Target names are `TimeViperForConditionalGeneration`'s state-dict keys (the prefixes below).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from timeviper import copy_remote_code
from timeviper.configuration_timeviper import SUPPORTED_TRANSFORMERS, TimeViperConfig, attention_layers

logger = logging.getLogger("timeviper.convert")

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "model_card.md"

# SiglipVisionModel is flat in every supported transformers release (no `vision_model.` level), so the tower's
# parameters sit right under `vision_tower`.
VISION_PREFIX = "model.vision_tower."
PROJECTOR_PREFIX = "model.multi_modal_projector."
TEXT_PREFIX = "model.language_model."
LM_HEAD = "lm_head.weight"

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"

# The model is saved with every floating tensor in one dtype; these are the accepted spellings.
DTYPES = {
    **dict.fromkeys(("bf16", "bfloat16"), torch.bfloat16),
    **dict.fromkeys(("fp16", "float16", "half"), torch.float16),
    **dict.fromkeys(("fp32", "float32", "float"), torch.float32),
}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
# Above this many parameters `--verify` defaults to off: it holds the converted model and the source model in fp32.
VERIFY_AUTO_MAX_PARAMETERS = 2_000_000_000


class ConversionError(ValueError):
    """A conversion that cannot go on. `problems` lists every offending tensor or file, one line each."""

    def __init__(self, message: str, problems: Iterable[str] = ()):
        self.problems = list(problems)
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {line}" for line in self.problems)
        super().__init__(message)


# Small parsers


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    dtype = value if isinstance(value, torch.dtype) else DTYPES.get(value.lower())
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of bf16, fp16, fp32")
    return dtype


def parse_projector_type(value: str) -> tuple[str, int | None]:
    """Our names (`tome_mlp`, `mlp`) or the reference's (`tome_mlp-N`, `gelu_mlp`) -> (type, N or None)."""
    if value in ("tome_mlp", "mlp", "gelu_mlp"):
        return ("mlp" if value == "gelu_mlp" else value), None
    if match := re.fullmatch(r"tome_mlp-(\d+)", value):
        return "tome_mlp", int(match[1])
    if "fused" in value:
        raise ValueError(f"projector type {value!r} (three linears) has no TimeViper equivalent")
    raise ValueError(f"unknown projector type {value!r}; use tome_mlp, tome_mlp-N, mlp or gelu_mlp")


# Tensor sources: lazy, one tensor in memory at a time


class TensorSource:
    """Read-only view of a checkpoint: key names and shapes without loading, tensors on demand through `get`."""

    def __init__(self, name: str, shapes: dict[str, tuple[int, ...]], load: Callable[[str], torch.Tensor]):
        self.name, self._shapes = name, shapes
        # Keep the last tensor: a fused tensor (timm qkv) is read once for its three slices.
        self.get: Callable[[str], torch.Tensor] = functools.lru_cache(maxsize=1)(load)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def label(self, key: str) -> str:
        return f"{self.name}:{key}"


class DictSource(TensorSource):
    def __init__(self, tensors: dict[str, torch.Tensor], name: str = "dict"):
        super().__init__(name, {key: tuple(tensor.shape) for key, tensor in tensors.items()}, tensors.__getitem__)


def open_safetensors(files: list[Path], name: str) -> TensorSource:
    """One or several safetensors files, opened with `safe_open`: headers only until a tensor is asked for."""
    from safetensors import safe_open

    handles, file_of = {}, {}
    for path in files:
        try:
            handles[path] = safe_open(str(path), framework="pt")
        except Exception as error:  # safetensors raises its own SafetensorError, which never names the file
            raise ConversionError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): {error}"
            ) from error
        for key in handles[path].keys():
            if key in file_of:
                raise ConversionError(f"tensor {key!r} appears in both {file_of[key]} and {path}")
            file_of[key] = path

    def load(key):
        try:
            return handles[file_of[key]].get_tensor(key)
        except Exception as error:
            raise ConversionError(f"{file_of[key]}: cannot read tensor {key!r}: {error}") from error

    shapes = {key: tuple(handles[path].get_slice(key).get_shape()) for key, path in file_of.items()}
    return TensorSource(name, shapes, load)


def load_torch_file(path: Path) -> DictSource:
    """A `torch.save`d state dict, loaded with `weights_only=True` and memory-mapped so tensors page in lazily."""
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # Files written with the legacy (non-zip) format cannot be memory-mapped.
            logger.warning("%s cannot be memory-mapped (%s); loading it into memory", path, error)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as error:  # torch's messages for a cut-short file never name it
        raise ConversionError(f"{path} is not a readable checkpoint (truncated or corrupt?): {error}") from error
    return DictSource(_unwrap_state_dict(loaded, path), path.name)


def _unwrap_state_dict(loaded, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, dict) and not any(isinstance(value, torch.Tensor) for value in loaded.values()):
        nested = [key for key in ("state_dict", "model", "module") if isinstance(loaded.get(key), dict)]
        if len(nested) == 1:
            loaded = loaded[nested[0]]
    if not isinstance(loaded, dict):
        raise ConversionError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
    not_tensors = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ConversionError(f"{path} holds entries that are not tensors", not_tensors[:20])
    return loaded


def open_tensor_source(path: str | Path) -> TensorSource:
    """A checkpoint file (.safetensors, .bin, .pth, .pt, .ckpt) or a folder with (sharded) safetensors."""
    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({path / name for name in weight_map.values()})
            missing = [str(file) for file in files if not file.is_file()]
            if missing:
                raise ConversionError(f"{index} names shards that do not exist", missing)
            return open_safetensors(files, name=path.name)
        if (path / "model.safetensors").is_file():
            return open_safetensors([path / "model.safetensors"], name=path.name)
        files = sorted(path.glob("*.safetensors"))
        if files:
            return open_safetensors(files, name=path.name)
        if (path / "pytorch_model.bin").is_file():
            return load_torch_file(path / "pytorch_model.bin")
        raise ConversionError(f"{path} holds no model.safetensors(.index.json), *.safetensors or pytorch_model.bin")
    if not path.is_file():
        raise ConversionError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return open_safetensors([path], name=path.name)
    if path.suffix in (".bin", ".pth", ".pt", ".ckpt"):
        return load_torch_file(path)
    raise ConversionError(f"cannot read {path}: expected .safetensors, .bin, .pth, .pt or .ckpt")


# Conversion plans and the key maps


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    sources: tuple[str, ...]


@dataclass
class ConversionPlan:
    """Target tensors to write, plus the fate of every source tensor that is not written."""

    tensors: dict[str, PlannedTensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # source label -> why it is not needed
    unexpected: dict[str, str] = field(default_factory=dict)  # source label -> why it is not understood
    conflicts: list[str] = field(default_factory=list)
    used: set[str] = field(default_factory=set)  # source labels that feed some planned tensor

    def add(self, name: str, shape, load: Callable[[], torch.Tensor], sources: Iterable[str]) -> None:
        sources = tuple(sources)
        self.used.update(sources)
        if name in self.tensors:
            self.conflicts.append(f"{name} is produced by both {self.tensors[name].sources} and {sources}")
            return
        self.tensors[name] = PlannedTensor(name, tuple(int(size) for size in shape), load, sources)

    def merge(self, other: "ConversionPlan") -> "ConversionPlan":
        for tensor in other.tensors.values():
            self.add(tensor.name, tensor.shape, tensor.load, tensor.sources)
        self.skipped.update(other.skipped)
        self.unexpected.update(other.unexpected)
        self.conflicts.extend(other.conflicts)
        self.used.update(other.used)
        return self

    def with_tensors(self, tensors: Iterable[PlannedTensor]) -> "ConversionPlan":
        """The same bookkeeping around another set of planned tensors (renamed or regrouped ones)."""
        plan = ConversionPlan(
            skipped=self.skipped, unexpected=self.unexpected, conflicts=self.conflicts, used=self.used
        )
        for tensor in tensors:
            plan.add(tensor.name, tensor.shape, tensor.load, tensor.sources)
        return plan

    def account_for(self, *sources: TensorSource, unused_reason: str | None = None) -> "ConversionPlan":
        """Record every source tensor no key map claimed (skipped for `unused_reason`, else unexpected)."""
        seen = self.used | set(self.skipped) | set(self.unexpected)
        unclaimed = [source.label(key) for source in sources for key in source.keys() if source.label(key) not in seen]
        if unused_reason is None:
            self.unexpected.update(dict.fromkeys(unclaimed, "no rule maps this tensor"))
        else:
            self.skipped.update(dict.fromkeys(unclaimed, unused_reason))
        return self

    def take(self, source: TensorSource, key: str, name: str, shape=None, transform=None) -> None:
        """Plan `name` as the source tensor `key`, or as `transform` of it (which gives `shape`)."""
        load = (lambda: source.get(key)) if transform is None else (lambda: transform(source.get(key)))
        self.add(name, source.shape(key) if shape is None else shape, load, [source.label(key)])

    def num_parameters(self) -> int:
        return sum(math.prod(tensor.shape) for tensor in self.tensors.values())


# timm block parts whose transformers names differ (the MLP's `mlp.fc1` / `mlp.fc2` keep theirs).
_TIMM_BLOCK_RENAMES = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj"}


def plan_timm_siglip(source: TensorSource, prefix: str = "") -> ConversionPlan:
    """timm `vit_so400m_patch14_siglip_384` keys (under `prefix`) -> HF SigLIP vision keys (under `VISION_PREFIX`).
    The fused `attn.qkv` rows are [q; k; v] (timm reshapes its output to (B, N, 3, heads, head_dim)), so each third
    becomes one HF projection; `pos_embed` (1, N, D) loses its batch axis."""
    plan = ConversionPlan()
    for key in (key for key in source.keys() if key.startswith(prefix)):
        name, label, shape = key[len(prefix) :], source.label(key), source.shape(key)
        if match := re.fullmatch(r"patch_embed\.proj\.(weight|bias)", name):
            plan.take(source, key, f"{VISION_PREFIX}embeddings.patch_embedding.{match[1]}")
        elif name == "pos_embed":
            if len(shape) != 3 or shape[0] != 1:
                plan.unexpected[label] = f"pos_embed should have shape (1, num_patches, hidden), got {shape}"
                continue
            plan.take(source, key, f"{VISION_PREFIX}embeddings.position_embedding.weight", shape[1:], lambda t: t[0])
        elif match := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", name):
            layer, kind = match[1], match[2]
            if shape[0] % 3:
                plan.unexpected[label] = f"fused qkv has {shape[0]} rows, not a multiple of 3"
                continue
            rows = shape[0] // 3
            for index, projection in enumerate(("q_proj", "k_proj", "v_proj")):
                plan.take(source, key, f"{VISION_PREFIX}encoder.layers.{layer}.self_attn.{projection}.{kind}",
                          (rows, *shape[1:]), lambda t, i=index, n=rows: t[i * n : (i + 1) * n])
        elif match := re.fullmatch(r"blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc[12])\.(weight|bias)", name):
            part = _TIMM_BLOCK_RENAMES.get(match[2], match[2])
            plan.take(source, key, f"{VISION_PREFIX}encoder.layers.{match[1]}.{part}.{match[3]}")
        elif match := re.fullmatch(r"norm\.(weight|bias)", name):
            plan.take(source, key, f"{VISION_PREFIX}post_layernorm.{match[1]}")
        elif name.startswith("attn_pool."):
            plan.skipped[label] = "unused by TimeViper: timm attention-pool head (vision_use_head=False)"
        else:
            plan.unexpected[label] = "not a timm SigLIP parameter that TimeViper knows how to map"
    return plan


# timm SigLIP widths -> attention heads (base, large, so400m, giant); weights alone do not tell the head count.
TIMM_SIGLIP_HEADS = {768: 12, 1024: 16, 1152: 16, 1536: 16}


def vision_config_from_timm(
    source: TensorSource, prefix: str = "", num_heads: int | None = None, image_size: int | None = None
):
    """The `SiglipVisionConfig` of a timm SigLIP state dict, read from its tensor shapes. timm's ViT uses exact GELU
    and LayerNorm eps 1e-6 (HF's SigLIP default is tanh-GELU). The image size defaults to 384, the reference's resize
    target, when that gives the checkpoint's patch grid, else to grid * patch."""
    from transformers import SiglipVisionConfig

    def shape(name):
        if prefix + name not in source.keys():
            raise ConversionError(f"{source.name} is not a timm SigLIP checkpoint: {prefix}{name} is missing")
        return source.shape(prefix + name)

    width, channels, patch, _ = shape("patch_embed.proj.weight")
    _, positions, _ = shape("pos_embed")
    layers = {
        int(match[1]) for key in source.keys() if (match := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", key))
    }
    if layers != set(range(len(layers))) or not layers:
        raise ConversionError(f"{source.name}: the timm blocks are not numbered 0..n-1: {sorted(layers)}")
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise ConversionError(f"{source.name}: pos_embed has {positions} positions, not a square grid")
    if image_size is None:
        image_size = 384 if 384 // patch == grid else grid * patch
    if image_size // patch != grid:
        raise ConversionError(
            f"image size {image_size} with patch {patch} gives a {image_size // patch}-grid, the weights a {grid}-grid"
        )
    if num_heads is None:
        if width not in TIMM_SIGLIP_HEADS:
            raise ConversionError(f"cannot tell the head count of a width-{width} SigLIP; pass --vision-num-heads")
        num_heads = TIMM_SIGLIP_HEADS[width]
    return SiglipVisionConfig(
        hidden_size=width, intermediate_size=shape("blocks.0.mlp.fc1.weight")[0], num_hidden_layers=len(layers),
        num_attention_heads=num_heads, num_channels=channels, image_size=image_size, patch_size=patch,
        hidden_act="gelu", layer_norm_eps=1e-6, vision_use_head=False,
    )


def plan_hf_siglip(source: TensorSource) -> ConversionPlan:
    """transformers `SiglipVisionModel` / `SiglipModel` keys -> our vision keys (the vision names are kept)."""
    plan = ConversionPlan()
    for key in source.keys():
        label = source.label(key)
        # `SiglipModel` checkpoints (google/siglip-*) and 4.x `SiglipVisionModel` ones nest the tower under
        # `vision_model.`; a 5.x `SiglipVisionModel` saves it flat.
        name = key.removeprefix("vision_model.")
        if key.startswith("text_model.") or key in ("logit_scale", "logit_bias"):
            plan.skipped[label] = "unused by TimeViper: SigLIP text tower"
        elif name.startswith("head."):
            plan.skipped[label] = "unused by TimeViper: SigLIP pooling head (vision_use_head=False)"
        elif name == "embeddings.position_ids":
            plan.skipped[label] = "buffer recomputed by the model"
        elif re.fullmatch(r"(embeddings|encoder|post_layernorm)\..+", name):
            plan.take(source, key, VISION_PREFIX + name)
        else:
            plan.unexpected[label] = "not a SigLIP vision parameter"
    return plan


def plan_projector(source: TensorSource) -> ConversionPlan:
    """The reference's `projector.projector.{0,2}.*` (Linear, GELU, Linear) or our own
    `model.multi_modal_projector.*`."""
    plan = ConversionPlan()
    for key in source.keys():
        label = source.label(key)
        if match := re.fullmatch(r"projector\.projector\.([02])\.(weight|bias)", key):
            linear = "linear_1" if match[1] == "0" else "linear_2"
            plan.take(source, key, f"{PROJECTOR_PREFIX}{linear}.{match[2]}")
        elif re.fullmatch(re.escape(PROJECTOR_PREFIX) + r"linear_[12]\.(weight|bias)", key):
            plan.take(source, key, key)
        elif key.startswith("projector.projector."):
            plan.unexpected[label] = "the TimeViper projector is Linear-GELU-Linear (indices 0 and 2 only)"
        elif key.startswith(PROJECTOR_PREFIX):
            plan.unexpected[label] = "not a parameter of the TimeViper projector"
    return plan


def plan_fresh_projector(vision_hidden: int, text_hidden: int, seed: int) -> ConversionPlan:
    """A new projector, initialised as `nn.Linear` does, from its own seeded RNG (the global RNG is left untouched).
    With `seed = vision_hidden` (1152 for SigLIP so400m) this reproduces the reference, which calls
    `torch.manual_seed(vision_embed_dim)` right before building the same two linears."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linears = {
            "linear_1": torch.nn.Linear(vision_hidden, text_hidden),
            "linear_2": torch.nn.Linear(text_hidden, text_hidden),
        }
    plan = ConversionPlan()
    for linear, module in linears.items():
        for kind, tensor in module.state_dict().items():
            plan.add(f"{PROJECTOR_PREFIX}{linear}.{kind}", tensor.shape, lambda tensor=tensor: tensor,
                     [f"<new: nn.Linear init, seed {seed}>"])
    return plan


def plan_llm(source: TensorSource, family: str, body_prefix: str, lm_head_key: str, allow_transfer: bool = False,
             tie_word_embeddings: bool = False) -> ConversionPlan:
    """LLM body keys under `body_prefix` -> `model.language_model.*` (native sub-names, except Nemotron-H's legacy
    `embedding.weight`), `lm_head_key` -> `lm_head.weight`. TransV tensors (`merge_modules.*`, `alpha`) are accepted
    only from a TimeViper checkpoint (`allow_transfer`). A tied source (no lm_head) gets a copy of the embeddings."""
    plan = ConversionPlan()
    for key in source.keys():
        label = source.label(key)
        if key == lm_head_key:
            plan.take(source, key, LM_HEAD)
            continue
        if not key.startswith(body_prefix):
            continue
        name = key[len(body_prefix) :]
        if family == "nemotron_h" and name == "embedding.weight":
            name = "embeddings.weight"
        if (name.startswith("merge_modules.") or name == "alpha") and not allow_transfer:
            plan.unexpected[label] = "TransV tensors cannot come from a base LLM checkpoint"
        elif re.fullmatch(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq", name):
            plan.skipped[label] = "buffer recomputed by the model"
        else:
            plan.take(source, key, TEXT_PREFIX + name)
    if LM_HEAD not in plan.tensors and tie_word_embeddings:
        embeddings = TEXT_PREFIX + ("embeddings.weight" if family == "nemotron_h" else "embed_tokens.weight")
        if embeddings in plan.tensors:
            tied = plan.tensors[embeddings]
            plan.add(LM_HEAD, tied.shape, tied.load, tied.sources)
            logger.info("the source ties lm_head to the embeddings: writing a copy as lm_head.weight")
    return plan


def plan_transfer_init(plan: ConversionPlan, config) -> ConversionPlan:
    """TransV for a fresh model: each transfer stage's module is a copy of every planned tensor (q/k/v/o, Qwen2's
    biases too) of the first attention block at or after its layer (every Qwen2 layer is one), with `alpha = 0`, so
    that every stage starts as plain dropping."""
    attention = "self_attn" if config.text_config.model_type == "qwen2" else "mixer"
    attention_blocks = attention_layers(config.layer_types)
    new = ConversionPlan()
    for stage_index, stage in enumerate(config.compression_stages):
        if not stage.transfer:
            continue
        block = next((index for index in attention_blocks if index >= stage.layer_idx), None)
        if block is None:
            raise ConversionError(f"no attention block at or after layer {stage.layer_idx} to initialise TransV from; "
                                  f"attention blocks are at {attention_blocks}")
        source_prefix = f"{TEXT_PREFIX}layers.{block}.{attention}."
        copied = [tensor for name, tensor in plan.tensors.items() if name.startswith(source_prefix)]
        if not copied:
            raise ConversionError(
                f"cannot initialise TransV stage {stage_index}: the source has no {source_prefix}* tensors"
            )
        for tensor in copied:
            name = f"{TEXT_PREFIX}merge_modules.{stage_index}.{tensor.name[len(source_prefix):]}"
            new.add(name, tensor.shape, tensor.load, tensor.sources)
        new.add(f"{TEXT_PREFIX}merge_modules.{stage_index}.alpha", (1,), lambda: torch.zeros(1), ["<new: zeros>"])
    return new


def split_transfer_gates(plan: ConversionPlan, config) -> ConversionPlan:
    """The reference's one gate vector `alpha` (entry j: the j-th transfer stage) split into each TransV module's own
    `merge_modules.{stage}.alpha`, once the TransV tensors were found to match the schedule."""
    check_transfer_tensors(plan, config)
    vector = plan.tensors.get(f"{TEXT_PREFIX}alpha")
    if vector is None:
        return plan
    transfer_stages = [index for index, stage in enumerate(config.compression_stages) if stage.transfer]
    if tuple(vector.shape) != (len(transfer_stages),):
        raise ConversionError(f"{', '.join(vector.sources)}: alpha has shape {tuple(vector.shape)}, token_compression "
                              f"has {len(transfer_stages)} transfer stages")
    split = plan.with_tensors(tensor for name, tensor in plan.tensors.items() if name != vector.name)
    for slot, stage_index in enumerate(transfer_stages):
        split.add(f"{TEXT_PREFIX}merge_modules.{stage_index}.alpha", (1,),
                  lambda slot=slot: vector.load()[slot : slot + 1], [f"{source}[{slot}]" for source in vector.sources])
    return split


def check_transfer_tensors(plan: ConversionPlan, config) -> None:
    """A TimeViper checkpoint's TransV tensors must match the configured transfer stages, stage index by stage index."""
    transfer_stages = {str(index) for index, stage in enumerate(config.compression_stages) if stage.transfer}
    problems = []
    present: dict[str, list[str]] = {}
    for name, tensor in plan.tensors.items():
        if match := re.fullmatch(re.escape(TEXT_PREFIX) + r"merge_modules\.(\d+)\..+", name):
            present.setdefault(match[1], []).extend(tensor.sources)
    for stage, sources in sorted(present.items()):
        if stage not in transfer_stages:
            problems.append(f"{', '.join(sources)}: stage {stage} is not a transfer stage of token_compression")
    for stage in sorted(transfer_stages - set(present)):
        problems.append(
            f"transfer stage {stage} ({config.compression_stages[int(stage)]}) has no merge_modules.{stage}.* tensors"
        )
    alpha = plan.tensors.get(f"{TEXT_PREFIX}alpha")
    if alpha is not None and not transfer_stages:
        problems.append(f"{', '.join(alpha.sources)}: alpha present but token_compression has no transfer stage")
    if alpha is None and transfer_stages:
        problems.append("alpha is missing but token_compression has transfer stages")
    if problems:
        raise ConversionError(f"the checkpoint's TransV tensors do not match --token-compression "
                              f"({config.compression_schedule}); pass the schedule the checkpoint was trained with",
                              problems)


# What the model expects


def expected_state_dict_shapes(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the model's state dict, in its order (built on the meta device: no memory)."""
    from timeviper.modeling_timeviper import TimeViperForConditionalGeneration

    with torch.device("meta"):
        model = TimeViperForConditionalGeneration(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def unused_vision_reason(name: str, layers_used: int) -> str | None:
    """Why a SigLIP target tensor feeds nothing the projector reads (later blocks, final norm, head), or None."""
    match = re.fullmatch(re.escape(VISION_PREFIX) + r"(encoder\.layers\.(\d+)|post_layernorm|head)\..+", name)
    if match is None or (match[2] is not None and int(match[2]) < layers_used):
        return None
    return (
        f"unused by TimeViper: the projector reads the output of SigLIP's first {layers_used} blocks, before any "
        "later part"
    )


def skip_unused_vision_tensors(
    plan: ConversionPlan, expected: dict[str, tuple[int, ...]], layers_used: int
) -> ConversionPlan:
    """Report planned SigLIP tensors that the model leaves out (`unused_vision_reason`) as skipped."""
    kept = []
    for name, tensor in plan.tensors.items():
        reason = None if name in expected else unused_vision_reason(name, layers_used)
        if reason is None:
            kept.append(tensor)
            continue
        for source in tensor.sources:
            plan.skipped[source] = reason
    return plan.with_tensors(kept)


def check_plan(plan: ConversionPlan, expected: dict[str, tuple[int, ...]]) -> None:
    """Stop, listing every problem, unless the plan produces exactly the expected tensors with the expected shapes."""
    problems = [f"unexpected source tensor {label}: {reason}" for label, reason in sorted(plan.unexpected.items())]
    problems.extend(f"conflict: {line}" for line in plan.conflicts)
    for name in sorted(set(plan.tensors) - set(expected)):
        problems.append(
            f"unexpected tensor {name} (from {', '.join(plan.tensors[name].sources)}): the model has no such parameter"
        )
    for name in sorted(set(expected) - set(plan.tensors)):
        problems.append(f"missing tensor {name} {tuple(expected[name])}: no source provides it")
    for name in sorted(set(expected) & set(plan.tensors)):
        if tuple(plan.tensors[name].shape) != tuple(expected[name]):
            problems.append(f"shape mismatch for {name}: the model expects {tuple(expected[name])}, "
                            f"{', '.join(plan.tensors[name].sources)} gives {plan.tensors[name].shape}")
    if problems:
        raise ConversionError(f"the sources do not fit the TimeViper model ({len(problems)} problems)", problems)


def fit_plan_to_model(plan: ConversionPlan, config) -> ConversionPlan:
    """The plan holding exactly the model's tensors, in its state-dict order (the order they are written in, as
    `save_pretrained` would); stops on any misfit, logs skips."""
    expected = expected_state_dict_shapes(config)
    plan = skip_unused_vision_tensors(plan, expected, config.vision_layers_used)
    check_plan(plan, expected)
    plan = plan.with_tensors(plan.tensors[name] for name in expected)
    logger.info("%d tensors to write; %d source tensors skipped", len(plan.tensors), len(plan.skipped))
    by_reason: dict[str, list[str]] = {}
    for label, reason in plan.skipped.items():
        by_reason.setdefault(reason, []).append(label)
    for reason, labels in by_reason.items():
        example = ", ".join(labels[:3]) + (", ..." if len(labels) > 3 else "")
        logger.info("%d tensors skipped, %s (%s)", len(labels), reason, example)
    return plan


# Writing


def write_safetensors_shards(plan: ConversionPlan, folder: Path, dtype: torch.dtype, max_shard_size: int | str,
                             progress: bool = True) -> dict:
    """Write every planned tensor, cast to `dtype`, in the plan's order as safetensors shards in `folder`; return the
    index dict. Shards are assigned (from meta tensors) by huggingface_hub's `split_torch_state_dict_into_shards`, as
    `save_pretrained` does; `max_shard_size` is its `"5GB"` notation or bytes."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from tqdm.auto import tqdm

    shapes = {name: torch.empty(tensor.shape, dtype=dtype, device="meta") for name, tensor in plan.tensors.items()}
    try:
        split = split_torch_state_dict_into_shards(
            shapes, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
        )
    except ValueError as error:
        raise ConversionError(
            f"cannot read the shard size {max_shard_size!r} (write it like 5GB or 500MB): {error}"
        ) from None
    with tqdm(
        total=split.metadata["total_size"], unit="B", unit_scale=True, desc="Writing shards", disable=not progress
    ) as bar:
        for file, shard in split.filename_to_tensors.items():
            write_streamed_safetensors(folder / file, {name: shapes[name] for name in shard}, plan, bar.update)
    index = {
        "metadata": {"total_parameters": plan.num_parameters(), **split.metadata},
        "weight_map": split.tensor_to_filename,
    }
    if split.is_sharded:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def write_streamed_safetensors(
    path: Path, shapes: dict[str, torch.Tensor], plan: ConversionPlan, written: Callable[[int], object]
) -> None:
    """One safetensors file holding the planned tensors `shapes` (meta tensors of the output dtype), in their order.
    safetensors' own writers take every tensor of a file at once; here the header comes from the planned shapes, so
    each tensor is loaded, cast, written and dropped before the next one."""
    if sys.byteorder != "little":
        raise ConversionError("safetensors files are little-endian; this writer runs on little-endian hosts only")
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, meta in shapes.items():
        size = meta.numel() * meta.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[meta.dtype], "shape": list(meta.shape), "data_offsets": [offset, offset + size]
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for name, meta in shapes.items():
            handle.write(load_for_writing(plan.tensors[name], meta.dtype))
            written(header[name]["data_offsets"][1] - header[name]["data_offsets"][0])


def load_for_writing(planned: PlannedTensor, dtype: torch.dtype) -> memoryview:
    """The bytes of a planned tensor cast to `dtype`, after checking that it is the planned floating tensor, finite."""
    tensor = planned.load()
    if tuple(tensor.shape) != planned.shape:
        raise ConversionError(
            f"{planned.name}: planned shape {planned.shape}, loaded {tuple(tensor.shape)} from {planned.sources}"
        )
    if not tensor.is_floating_point():
        raise ConversionError(f"{planned.name}: {tensor.dtype} is not a floating-point tensor ({planned.sources})")
    cast = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    check_finite(planned, tensor, cast)
    return memoryview(cast.reshape(-1).view(torch.uint8).numpy())


# Elements checked per step by `check_finite`: its temporary mask stays at 16 MiB whatever the tensor's size.
FINITE_CHECK_CHUNK = 1 << 24


def check_finite(planned: PlannedTensor, source: torch.Tensor, cast: torch.Tensor) -> None:
    """Stop on NaN/Inf in a written tensor; always on, as verification is off by default for large models."""
    flat = cast.reshape(-1)
    bad = sum(int((~torch.isfinite(chunk)).sum()) for chunk in flat.split(FINITE_CHECK_CHUNK))
    if bad:
        in_source = int((~torch.isfinite(source.detach())).sum())
        cause = (
            "in the source"
            if in_source
            else f"from the cast to {str(cast.dtype).removeprefix('torch.')} (values beyond its range)"
        )
        raise ConversionError(
            f"{planned.name}: {bad} of {flat.numel()} values are NaN or Inf {cause}; sources {planned.sources}"
        )


# The output folder: written atomically, replaced only when the converter wrote it


# Written by the converter into every folder it makes: what `--force` may replace. In a temporary folder it says
# `"complete": false`; in a finished output it lists every file the converter wrote.
OUTPUT_MARKER = ".timeviper-convert.json"


def write_output_marker(folder: Path, complete: bool) -> None:
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir())
    marker = {
        "written_by": "timeviper convert", "complete": complete, "files": [f for f in files if f != OUTPUT_MARKER]
    }
    (folder / OUTPUT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def read_output_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("written_by") == "timeviper convert" else None


def protected_folder(output: Path) -> str | None:
    """Why `--force` must never replace `output`: it is or holds the cwd or the home folder, or is a git checkout."""
    resolved = output.resolve()
    for what, place in (("the current directory", Path.cwd()), ("the home folder", Path.home())):
        place = place.resolve()
        if resolved == place or resolved in place.parents:
            return f"it is {what}" if resolved == place else f"it holds {what}"
    if (resolved / ".git").exists():
        return "it is a git checkout"
    return None


def foreign_content(output: Path) -> str | None:
    """Why an existing `output` is not a finished output of this converter (so `--force` may not delete it), or None."""
    if output.is_symlink() or not output.is_dir():
        return "it is not a folder" if not output.is_symlink() else "it is a symbolic link"
    if not any(output.iterdir()):
        return None
    marker = read_output_marker(output)
    if marker is None or not marker.get("complete"):
        return f"it has no {OUTPUT_MARKER}, so this converter did not write it"
    present = {path.relative_to(output).as_posix() for path in output.rglob("*") if not path.is_dir()}
    extra = sorted(present - set(marker["files"]) - {OUTPUT_MARKER})
    if extra:
        return f"it holds files the converter did not write: {extra[:10]}" + (" ..." if len(extra) > 10 else "")
    return None


def _siblings(output: Path, kind: str) -> list[Path]:
    """The converter's hidden work folders next to `output`: `.{name}.partial-*` or `.{name}.replaced-*`."""
    prefix = f".{output.name}.{kind}-"
    return (
        sorted(path for path in output.parent.iterdir() if path.name.startswith(prefix))
        if output.parent.is_dir()
        else []
    )


def _size(folder: Path) -> str:
    total = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())
    return f"{total / 1e9:.2f} GB" if total >= 1e8 else f"{total / 1e6:.1f} MB"


def recover_interrupted_conversion(output: Path) -> None:
    """Finish what a killed conversion left next to `output` (`output_lock` calls it with the lock held). A kill
    between the two renames of a `--force` swap leaves `output` missing and the old copy in `.{name}.replaced-*/old`:
    it is put back; next to an existing `output` it is deleted. `.{name}.partial-*` folders with the converter's marker
    are cut-short writes and are deleted; others are only reported."""
    for backup in _siblings(output, "replaced"):
        old = backup / "old"
        if old.exists() and not (output.exists() or output.is_symlink()):
            os.rename(old, output)
            logger.warning("restored %s from %s: a conversion was killed while replacing it", output, backup)
        elif old.exists():
            logger.warning("deleting %s (%s): the copy of %s that a finished --force conversion replaced", backup,
                           _size(backup), output)
        shutil.rmtree(backup)
    for partial in _siblings(output, "partial"):
        if read_output_marker(partial) is None:
            logger.warning("%s (%s) looks like an unfinished conversion by an older version; delete it if nothing "
                           "uses it", partial, _size(partial))
            continue
        logger.warning("deleting %s (%s): what a killed conversion into %s had written", partial, _size(partial),
                       output)
        shutil.rmtree(partial)


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Lock `.{name}.lock` next to `output` (one conversion at a time), then recover what a killed one left."""
    import fcntl

    output.parent.mkdir(parents=True, exist_ok=True)
    path = output.parent / f".{output.name}.lock"
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConversionError(
                f"another conversion is writing {output} (it holds {path}); wait for it to end"
            ) from None
        recover_interrupted_conversion(output)
        yield  # the lock goes with the file handle, also when the process is killed


def _check_output(output: Path, force: bool, sources: Iterable[str | Path] = ()) -> None:
    for source in sources:
        source = Path(source).resolve()
        if output.resolve() == source or output.resolve() in source.parents:
            raise ConversionError(f"the output {output} would replace the source {source}; choose another --output")
    if not (output.exists() or output.is_symlink()):
        return
    if not force:
        raise ConversionError(f"{output} already exists; pass --force to replace it")
    reason = protected_folder(output) or foreign_content(output)
    if reason:
        raise ConversionError(f"--force only replaces a previous output of this converter; not {output}: {reason}")


def check_output_available(output: Path, force: bool, sources: Iterable[str | Path] = ()) -> None:
    """Before any work: recover what a killed conversion left, then refuse an output that is or holds a source, or
    that exists (without `force`; with it, unless a previous output of this converter)."""
    output = Path(output).absolute()
    with output_lock(output):
        _check_output(output, force, sources)


@contextlib.contextmanager
def atomic_output_dir(output: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `output`; on success rename it to `output`, on failure delete it. An
    existing `output` is replaced only with `force`, only when this converter wrote it, and only once the new folder
    is complete. The write holds the output's lock; the next conversion recovers from a kill at any point."""
    output = Path(output).absolute()
    with output_lock(output):
        _check_output(output, force)
        temporary = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o777 & ~umask)
        try:
            write_output_marker(temporary, complete=False)
            yield temporary
            write_output_marker(temporary, complete=True)
            _check_output(output, force)
            if output.exists() or output.is_symlink():
                backup = Path(tempfile.mkdtemp(prefix=f".{output.name}.replaced-", dir=output.parent))
                os.rename(output, backup / "old")
                os.rename(temporary, output)
                shutil.rmtree(backup)
            else:
                os.rename(temporary, output)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise


# Config, tokenizer, processor, generation config, model card


def load_text_config(llm_folder: Path):
    """The LLM's config.json as a native transformers config (`nemotron_h` or `qwen2`), minus Hub plumbing fields."""
    from transformers.models.nemotron_h import NemotronHConfig
    from transformers.models.qwen2 import Qwen2Config

    path = Path(llm_folder) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} does not exist; --llm/--llm-config must be the base LLM's Hub folder")
    values = json.loads(path.read_text())
    for key in ("auto_map", "architectures", "transformers_version", "_name_or_path"):
        values.pop(key, None)
    model_type = values.get("model_type")
    classes = {"nemotron_h": NemotronHConfig, "qwen2": Qwen2Config}
    if model_type not in classes:
        raise ConversionError(f"{path}: model_type {model_type!r} is not supported; expected one of {sorted(classes)}")
    return classes[model_type].from_dict(values)


def load_tokenizer(llm_folder: Path):
    """The backbone's tokenizer with `<image>` and `<video>` added as special tokens (in that order)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(llm_folder), extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN}
    )
    for token in (IMAGE_TOKEN, VIDEO_TOKEN):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] != tokenizer.convert_tokens_to_ids(token):
            raise ConversionError(f"the tokenizer does not keep {token} as one special token (got ids {ids})")
    return tokenizer


def set_pad_token(tokenizer, text_config) -> None:
    """Give a tokenizer without a pad token the LLM's own pad id (Nemotron-H: 0), so that `padding=True` batches work;
    padded positions are embedded (then masked), so the id must lie inside the vocabulary."""
    if tokenizer.pad_token is not None:
        return
    pad_id = text_config.pad_token_id
    if pad_id is None or not 0 <= pad_id < text_config.vocab_size:
        raise ConversionError(
            f"the tokenizer has no pad token and the LLM config's pad_token_id {pad_id!r} is not an id of its "
            f"{text_config.vocab_size}-entry vocabulary; add a pad token to the source tokenizer"
        )
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)


# Tokens that end an assistant turn in each template, besides the tokenizer's eos.
STOP_TOKENS = {"nemotron_h": ("</s>", "<SPECIAL_12>"), "qwen2": ("<|im_end|>",)}


def build_timeviper_config(text_config, vision_config, tokenizer, options: "ConversionOptions", dtype: torch.dtype):
    """`TimeViperConfig` of the output, with the placeholder ids taken from the tokenizer."""
    projector_type, tokens_from_type = parse_projector_type(options.projector_type)
    for sub_config in (text_config, vision_config):
        sub_config.dtype = dtype
    return TimeViperConfig(
        vision_config=vision_config, text_config=text_config, projector_type=projector_type,
        tokens_per_frame=tokens_from_type or options.tokens_per_frame,
        vision_feature_layer=options.vision_feature_layer,
        token_compression=options.token_compression,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN), dtype=dtype,
    )


def build_generation_config(family: str, tokenizer, text_config, llm_folder: Path):
    """Greedy decoding that stops at the backbone's end-of-turn tokens (and those the source generation config
    lists)."""
    from transformers import GenerationConfig

    source = Path(llm_folder) / "generation_config.json"
    listed = json.loads(source.read_text()).get("eos_token_id") if source.is_file() else None
    vocabulary = tokenizer.get_vocab()
    candidates = [*(listed if isinstance(listed, (list, tuple)) else [listed]), tokenizer.eos_token_id,
                  *(vocabulary[token] for token in STOP_TOKENS[family] if token in vocabulary)]
    eos_ids = list(dict.fromkeys(int(token_id) for token_id in candidates if token_id is not None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else text_config.pad_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else text_config.bos_token_id
    return GenerationConfig(bos_token_id=bos, eos_token_id=eos_ids, pad_token_id=pad, do_sample=False)


def write_processor(folder: Path, tokenizer, config) -> None:
    """Save `TimeViperProcessor` (image + video processors, tokenizer, the backbone's chat template) with its
    auto_map."""
    from timeviper import processing_timeviper as processing

    size = {"height": config.vision_config.image_size, "width": config.vision_config.image_size}
    processor = processing.TimeViperProcessor(
        image_processor=processing.TimeViperImageProcessor(size=size),
        video_processor=processing.TimeViperVideoProcessor(size=size),
        tokenizer=tokenizer,
        chat_template=processing.get_chat_template(config.text_config.model_type),
        tokens_per_frame=config.vision_tokens_per_frame,
    )
    processor.save_pretrained(str(folder))
    # `from_pretrained` keyword arguments that transformers writes back into tokenizer_config.json.
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        values = json.loads(tokenizer_config.read_text())
        for key in ("is_local", "local_files_only"):
            values.pop(key, None)
        tokenizer_config.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n")


# Licenses of the backbones' weights, for cards of folders whose source LLM folder has no card saying so.
BACKBONE_LICENSES = {
    "nemotron_h": {
        "license": "other",
        "license_name": "nvidia-open-model-license",
        "license_link": "https://www.nvidia.com/en-us/agreements/enterprise-software/nvidia-open-model-license/",
    },
    "qwen2": {"license": "apache-2.0"},  # Qwen2.5 0.5B-32B; the source folder's own card wins (3B and 72B differ)
}
LICENSE_FIELDS = ("license", "license_name", "license_link")


def card_license(family: str, source_folder: Path | None) -> dict:
    """The license metadata of the source LLM's model card (README.md) if it has one, else the backbone's."""
    from huggingface_hub import ModelCard

    readme = Path(source_folder) / "README.md" if source_folder is not None else None
    if readme is not None and readme.is_file():
        data = ModelCard.load(readme).data.to_dict()
        if data.get("license"):
            return {field: data[field] for field in LICENSE_FIELDS if data.get(field)}
    return dict(BACKBONE_LICENSES[family])


def model_card(config, base_models: list[str], license_fields: dict, extra_tags: Iterable[str], notes: str,
               library_name: str = "transformers", language: str | list[str] | None = None,
               datasets: str | list[str] | None = None):
    """The `ModelCard` of a TimeViper folder (converted or fine-tuned): metadata, `model_card.md` filled in, `notes`."""
    from huggingface_hub import ModelCard, ModelCardData

    text = config.text_config
    hybrid = text.model_type == "nemotron_h"
    tags = ["timeviper", "video", "video-text-to-text", *(["mamba", "hybrid"] if hybrid else []), "custom_code",
            *extra_tags]
    data = ModelCardData(
        **license_fields, base_model=list(base_models) or None, pipeline_tag="image-text-to-text",
        library_name=library_name, tags=list(dict.fromkeys(tags)), language=language, datasets=datasets,
    )
    counts = {kind: list(config.layer_types).count(kind) for kind in dict.fromkeys(config.layer_types)}
    return ModelCard.from_template(
        data, template_path=str(MODEL_CARD_TEMPLATE), notes=notes, vision=config.vision_config, text=text,
        tokens_per_frame=config.vision_tokens_per_frame, projector_type=config.projector_type,
        vision_feature_layer=config.vision_feature_layer, supported=SUPPORTED_TRANSFORMERS,
        language_model="a hybrid Mamba-Transformer (Nemotron-H)" if hybrid else "a Qwen2 transformer",
        num_blocks=len(config.layer_types), blocks=", ".join(f"{count} {kind}" for kind, count in counts.items()),
        stages=config.compression_schedule,
    )


def guess_base_model(path: Path) -> str | None:
    """A Hub id for the model card from a local folder or file name, when the name is a known upstream one."""
    name = Path(path).name if Path(path).is_dir() else Path(path).stem
    if name.lower().startswith("nvidia-nemotron"):
        return f"nvidia/{name}"
    if name.lower().startswith("qwen"):
        return f"Qwen/{name}"
    if name.startswith("vit_so400m_patch14_siglip_384"):
        return "timm/vit_so400m_patch14_siglip_384.v2_webli"
    if name.lower().startswith("siglip"):
        return f"google/{name}"
    return None


def save_hub_folder(
    folder: Path, config, tokenizer, llm_folder: Path, base_models: list[str], conversion_note: str
) -> None:
    """Everything but the weights: config.json (with auto_map), remote code, processor/tokenizer, generation
    config, card."""
    family = config.text_config.model_type
    config.architectures = ["TimeViperForConditionalGeneration"]
    config.save_pretrained(str(folder))
    copy_remote_code(folder)
    set_pad_token(tokenizer, config.text_config)
    write_processor(folder, tokenizer, config)
    build_generation_config(family, tokenizer, config.text_config, llm_folder).save_pretrained(str(folder))
    card = model_card(config, base_models, card_license(family, llm_folder), (), f"## Conversion\n\n{conversion_note}")
    card.save(folder / "README.md")


# Verification


def should_verify(flag: bool | None, num_parameters: int) -> bool:
    if flag is not None:
        return flag
    if num_parameters > VERIFY_AUTO_MAX_PARAMETERS:
        logger.info(
            "skipping verification of a %.1fB-parameter model (pass --verify to force it)", num_parameters / 1e9
        )
        return False
    return True


def load_converted_model(folder: Path):
    """The converted folder in fp32 on CPU; stops unless every weight of the model came from the folder."""
    from timeviper.modeling_timeviper import TimeViperForConditionalGeneration

    model, info = TimeViperForConditionalGeneration.from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True
    )
    problems = [f"{kind}: {sorted(keys)}" for kind, keys in info.items() if keys]
    if problems:
        raise ConversionError(f"the converted folder {folder} does not load cleanly", problems)
    return model.eval()


def round_trip_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Round a reference model's weights through the output dtype, so both sides hold identical values in fp32."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype).float())
    return module


@torch.no_grad()
def compare_text_logits(model, reference, vocab_size: int, avoid_ids: Iterable[int]) -> float:
    """Max |logits| difference between the TimeViper model and the source LLM on a random text-only prompt."""
    ids = torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    for token_id in avoid_ids:
        ids[ids == token_id] = 0
    ours = model(input_ids=ids).logits.float()
    theirs = reference(input_ids=ids).logits.float()
    return (ours - theirs).abs().max().item()


@torch.no_grad()
def compare_vision_features(model, reference_tower, layers_used: int, image_size: int) -> float:
    """Max difference of the vision features the model reads (hidden state `layers_used`, before ToMe and the
    projector) from `reference_tower`'s. The model's tower holds exactly those blocks."""
    pixels = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tower = model.get_submodule("model.vision_tower")
    ours = tower.embeddings(pixels)
    for layer in tower.encoder.layers:
        ours = layer(ours, None)
    theirs = reference_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[layers_used]
    return (ours.float() - theirs.float()).abs().max().item()


def text_model_class(family: str):
    """transformers' own causal-LM class of a backbone family."""
    from transformers import NemotronHForCausalLM, Qwen2ForCausalLM

    return NemotronHForCausalLM if family == "nemotron_h" else Qwen2ForCausalLM


def match_checkpoint_time_step_limit(reference):
    """transformers' Nemotron-H clamps dt at `time_step_min`; the checkpoint (and TimeViper, like the reference) clamps
    at `time_step_limit` = (0, inf). Give the native reference model the checkpoint's limit."""
    for layer in reference.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = tuple(reference.config.time_step_limit)
    return reference


def native_vision_reference(plan: ConversionPlan, config, dtype: torch.dtype):
    """transformers' `SiglipVisionModel` holding the planned vision weights (rounded through `dtype`), in fp32."""
    from transformers import SiglipVisionModel

    reference = SiglipVisionModel(config.vision_config).float().eval()
    missing, unexpected = reference.load_state_dict(vision_state_dict(plan), strict=False)
    layers_used = config.vision_layers_used
    missing = [key for key in missing if unused_vision_reason(VISION_PREFIX + key, layers_used) is None]
    if missing or unexpected:
        raise ConversionError("the planned vision tensors do not load into SiglipVisionModel", [*missing, *unexpected])
    return round_trip_dtype(reference, dtype)


def vision_state_dict(plan: ConversionPlan) -> dict[str, torch.Tensor]:
    """The planned vision tensors under `SiglipVisionModel`'s own names, for building a reference tower."""
    return {
        name[len(VISION_PREFIX) :]: tensor.load().clone()
        for name, tensor in plan.tensors.items()
        if name.startswith(VISION_PREFIX)
    }


def verify_conversion(
    folder: Path, converter: "Converter", plan: ConversionPlan, config, dtype: torch.dtype, atol: float
) -> dict:
    """Compare text logits with the converter's reference LLM (TransV is idle without vision tokens) and vision
    features with `SiglipVisionModel`; stop when either differs by more than `atol`."""
    model = load_converted_model(folder)
    text_reference = round_trip_dtype(converter.text_reference(config.text_config).eval(), dtype)
    if config.text_config.model_type == "nemotron_h":
        match_checkpoint_time_step_limit(text_reference)
    results = {"text logits": compare_text_logits(model, text_reference, config.text_config.vocab_size,
                                                  (config.image_token_id, config.video_token_id))}
    results["vision features"] = compare_vision_features(model, native_vision_reference(plan, config, dtype),
                                                         config.vision_layers_used, config.vision_config.image_size)
    for what, diff in results.items():
        logger.info("verify: %s max abs diff %.3e (tolerance %.0e)", what, diff, atol)
    failed = [f"{what}: max abs diff {diff:.3e} > {atol:.0e}" for what, diff in results.items() if not diff <= atol]
    if failed:
        raise ConversionError("the converted model does not reproduce the source", failed)
    return results


# The conversion flow both converters share


class Converter:
    """One source format. `convert_to_hub` runs everything else, calling the subclass's methods in this order:
    - `vision_config(text_config, num_heads, image_size)`: the `SiglipVisionConfig` of the vision weights
      (`text_config` lets a converter check the LLM first);
    - `plan(config)`: every source tensor mapped to a TimeViper name, skipped with a reason, or rejected;
    - `base_models()`: Hub ids for the card's `base_model` when the caller gives none;
    - `conversion_note(config)`: the model card's account of where each part comes from;
    - `text_reference(text_config)`: for verification, the source LLM in transformers' own class, in fp32.
    """

    llm_folder: Path  # the base LLM's Hub folder: config.json, tokenizer, generation_config.json, README.md
    sources: list[Path]  # every path read, which the output must never replace


@dataclass
class ConversionOptions:
    """The options both converters (and their CLIs) share; `add_shared_arguments` documents each. Text values are
    read where they are used, by the parsers the CLI goes through too (the config's `normalize_compression`,
    `parse_dtype`, `parse_projector_type`), so Python callers may pass the CLI's forms. `verify=None` verifies models up to
    `VERIFY_AUTO_MAX_PARAMETERS` parameters; `base_models=None` lets the converter guess the card's base models."""

    token_compression: str | list[dict] | None = None
    projector_type: str = "tome_mlp"
    tokens_per_frame: int = 16
    vision_feature_layer: int = -2
    vision_num_heads: int | None = None
    image_size: int | None = None
    dtype: str | torch.dtype = "bf16"
    shard_size: str | int = "5GB"
    force: bool = False
    verify: bool | None = None
    verify_atol: float = 1e-3
    base_models: list[str] | None = None
    progress: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ConversionOptions":
        """The options `add_shared_arguments` parsed."""
        return cls(**{option.name: getattr(args, option.name) for option in fields(cls)})


def convert_to_hub(converter: Converter, output: str | Path, options: ConversionOptions) -> Path:
    """Convert `converter`'s sources into a TimeViper Hub folder at `output` and return its path."""
    output, dtype = Path(output).absolute(), parse_dtype(options.dtype)
    check_output_available(output, options.force, sources=converter.sources)
    text_config = load_text_config(converter.llm_folder)
    tokenizer = load_tokenizer(converter.llm_folder)
    vision_config = converter.vision_config(text_config, options.vision_num_heads, options.image_size)
    config = build_timeviper_config(text_config, vision_config, tokenizer, options, dtype)
    plan = fit_plan_to_model(converter.plan(config), config)
    base_models = options.base_models if options.base_models is not None else converter.base_models()
    with atomic_output_dir(output, options.force) as folder:
        write_safetensors_shards(plan, folder, dtype, options.shard_size, progress=options.progress)
        save_hub_folder(folder, config, tokenizer, converter.llm_folder, base_models, converter.conversion_note(config))
        if should_verify(options.verify, plan.num_parameters()):
            verify_conversion(folder, converter, plan, config, dtype, options.verify_atol)
    logger.info(
        "wrote %s (%.1fM parameters, %s)", output, plan.num_parameters() / 1e6, str(dtype).removeprefix("torch.")
    )
    return output


def converter_parser(prog: str, description: str, doc: str) -> argparse.ArgumentParser:
    """A converter's argument parser, its module docstring's example as the epilog."""
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=doc[doc.index("Example::") :].replace("Example::", "example:"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_shared_arguments(parser: argparse.ArgumentParser, token_compression_help: str) -> None:
    """The options both conversion CLIs share: the output, the model layout and how the result is written."""
    parser.add_argument("--token-compression", default=None, help=token_compression_help)
    parser.add_argument("--output", required=True, type=Path, help="output folder (must not exist unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--projector-type", default="tome_mlp",
                        help="tome_mlp, mlp, or the reference's tome_mlp-N / gelu_mlp (default: %(default)s)")
    parser.add_argument("--tokens-per-frame", type=int, default=16,
                        help="ToMe output tokens per frame for tome_mlp (default: %(default)s)")
    parser.add_argument("--vision-feature-layer", type=int, default=-2,
                        help="vision hidden state fed to the projector (default: %(default)s)")
    parser.add_argument("--vision-num-heads", type=int, default=None,
                        help="heads of a SigLIP whose width is not a known one")
    parser.add_argument("--image-size", type=int, default=None,
                        help="vision input size (default: 384 if it fits the patch grid)")
    parser.add_argument("--dtype", default="bf16",
                        help="dtype of the written weights: bf16, fp16 or fp32 (default: %(default)s)")
    parser.add_argument("--shard-size", default="5GB",
                        help="largest safetensors shard, in KB, MB, GB or TB (default: %(default)s)")
    parser.add_argument("--base-model", action="append", dest="base_models",
                        help="Hub id for the model card (repeatable)")
    parser.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=None,
        help="load the result and compare it with the sources (default: on up to 2B parameters)",
    )
    parser.add_argument("--verify-atol", type=float, default=1e-3,
                        help="largest accepted max abs difference in verification (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar")


def run_cli(parser: argparse.ArgumentParser, convert: Callable[..., Path], argv: list[str] | None) -> int:
    """Parse `argv`, run `convert(args, options)`; a bad input is one `error:` line (exit code 1), not a traceback."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert(args, ConversionOptions.from_args(args))
    except ValueError as error:  # ConversionError, or a config value that TimeViperConfig rejects
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
