"""Machinery shared by the checkpoint converters in `convert/`.

A conversion is planned before any byte is written:

1. Open every source lazily (`open_tensor_source`): safetensors through `safe_open`, torch files with `mmap=True`.
2. Turn source keys into a `ConversionPlan` with the explicit key maps below (`plan_*`). Each planned tensor knows its
   target name, its shape and how to load itself; each source key is either used or recorded as skipped with a
   reason. A key that no rule understands is recorded as unexpected.
3. `check_plan` compares the plan with the shapes the TimeViper model expects (`expected_state_dict_shapes`) and stops
   with one message listing every missing, unexpected, conflicting or mis-shaped tensor.
4. `write_safetensors_shards` streams the tensors, one at a time, into shards inside a temporary folder next to the
   target (`atomic_output_dir`), which is renamed into place only when everything, verification included, succeeded.

Target names are the state-dict keys of `TimeViperForConditionalGeneration`:
`model.vision_tower.*` (transformers' SigLIP names), `model.multi_modal_projector.linear_{1,2}.*`,
`model.language_model.*` (the LLM body under its native sub-names, plus `merge_modules.{stage}.*`, gate `alpha`
included, for TransV) and `lm_head.weight`.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

logger = logging.getLogger("timeviper.convert")

REPO_ROOT = Path(__file__).resolve().parent.parent
REMOTE_CODE_FILES = (
    "configuration_timeviper.py", "modeling_timeviper.py", "processing_timeviper.py", "generation_timeviper.py"
)

# transformers 5.x flattened SiglipVisionModel, so its parameters sit right under `vision_tower`. Checkpoints with the
# 4.x nesting (`vision_tower.vision_model.*`) load too; `align_vision_prefix` follows whichever the model uses.
VISION_PREFIX = "model.vision_tower."
NESTED_VISION_PREFIX = "model.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.multi_modal_projector."
TEXT_PREFIX = "model.language_model."
LM_HEAD = "lm_head.weight"

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"

# The model is saved with every floating tensor in one dtype; these are the accepted spellings.
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# Above this many parameters `--verify` defaults to off: it holds the converted model and the source model in fp32.
VERIFY_AUTO_MAX_PARAMETERS = 2_000_000_000


class ConversionError(ValueError):
    """A conversion that cannot go on. `problems` lists every offending tensor or file, one line each."""

    def __init__(self, message: str, problems: Iterable[str] = ()):
        self.problems = list(problems)
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {line}" for line in self.problems)
        super().__init__(message)


# ---------------------------------------------------------------------------------------------------------------------
# Small parsers
# ---------------------------------------------------------------------------------------------------------------------


def parse_size(value: str | int) -> int:
    """`"5GB"` -> 5_000_000_000 bytes. Accepts B, KB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (powers of 1024)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\s*", str(value), flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"cannot read the size {value!r}; write it like 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    size = int(number * scale[unit])
    if size <= 0:
        raise ValueError(f"the size must be positive, got {value!r}")
    return size


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    try:
        return DTYPES[value.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {value!r}; use one of bf16, fp16, fp32") from None


def parse_token_compression(value: str | None):
    """The reference's schedule string (`uni_7_0.5-attn_39_0.05`) or a JSON list of stage dicts; None/'' for none."""
    if value is None or value.strip() in ("", "none", "None"):
        return None
    text = value.strip()
    if text[0] in "[{":
        parsed = json.loads(text)
        return [parsed] if isinstance(parsed, dict) else parsed
    return text


def parse_projector_type(value: str) -> tuple[str, int | None]:
    """Our names (`tome_mlp`, `mlp`) or the reference's arch specifiers (`tome_mlp-16`, `gelu_mlp`).

    Returns the projector type and, for `tome_mlp-N`, the tokens per frame N (else None).
    """
    if value in ("tome_mlp", "mlp"):
        return value, None
    if value == "gelu_mlp":
        return "mlp", None
    match = re.fullmatch(r"tome_mlp-(\d+)", value)
    if match:
        return "tome_mlp", int(match.group(1))
    if "fused" in value:
        raise ValueError(f"projector type {value!r} (three linears) has no TimeViper equivalent")
    raise ValueError(f"unknown projector type {value!r}; use tome_mlp, tome_mlp-N, mlp or gelu_mlp")


# ---------------------------------------------------------------------------------------------------------------------
# Tensor sources: lazy, one tensor in memory at a time
# ---------------------------------------------------------------------------------------------------------------------


class TensorSource(abc.ABC):
    """Read-only view of a checkpoint: key names and shapes without loading, tensors on demand."""

    name: str = "source"

    @abc.abstractmethod
    def keys(self) -> list[str]: ...

    @abc.abstractmethod
    def shape(self, key: str) -> tuple[int, ...]: ...

    @abc.abstractmethod
    def _load(self, key: str) -> torch.Tensor: ...

    def get(self, key: str) -> torch.Tensor:
        # Keep the last tensor: a fused tensor (timm qkv) is read once for its three slices.
        cached = getattr(self, "_last", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        tensor = self._load(key)
        self._last = (key, tensor)
        return tensor

    def release(self) -> None:
        self._last = None

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def label(self, key: str) -> str:
        return f"{self.name}:{key}"


class DictSource(TensorSource):
    def __init__(self, tensors: dict[str, torch.Tensor], name: str = "dict"):
        self.tensors, self.name = tensors, name

    def keys(self):
        return list(self.tensors)

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def _load(self, key):
        return self.tensors[key]


class SafetensorsSource(TensorSource):
    """One or several safetensors files, opened with `safe_open` (headers only until a tensor is asked for)."""

    def __init__(self, files: list[Path], name: str):
        from safetensors import safe_open

        self.name = name
        self._handles = {}
        self._file_of = {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as error:  # safetensors raises its own SafetensorError, which never names the file
                raise ConversionError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from error
            self._handles[path] = handle
            for key in handle.keys():
                if key in self._file_of:
                    raise ConversionError(f"tensor {key!r} appears in both {self._file_of[key]} and {path}")
                self._file_of[key] = path

    def keys(self):
        return list(self._file_of)

    def shape(self, key):
        return tuple(self._handles[self._file_of[key]].get_slice(key).get_shape())

    def _load(self, key):
        try:
            return self._handles[self._file_of[key]].get_tensor(key)
        except Exception as error:
            raise ConversionError(f"{self._file_of[key]}: cannot read tensor {key!r}: {error}") from error


class TorchFileSource(DictSource):
    """A `torch.save`d state dict, loaded with `weights_only=True` and memory-mapped so tensors page in lazily."""

    def __init__(self, path: Path):
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
        super().__init__(_unwrap_state_dict(loaded, path), path.name)


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
            return SafetensorsSource(files, name=path.name)
        if (path / "model.safetensors").is_file():
            return SafetensorsSource([path / "model.safetensors"], name=path.name)
        files = sorted(path.glob("*.safetensors"))
        if files:
            return SafetensorsSource(files, name=path.name)
        if (path / "pytorch_model.bin").is_file():
            return TorchFileSource(path / "pytorch_model.bin")
        raise ConversionError(f"{path} holds no model.safetensors(.index.json), *.safetensors or pytorch_model.bin")
    if not path.is_file():
        raise ConversionError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return SafetensorsSource([path], name=path.name)
    if path.suffix in (".bin", ".pth", ".pt", ".ckpt"):
        return TorchFileSource(path)
    raise ConversionError(f"cannot read {path}: expected .safetensors, .bin, .pth, .pt or .ckpt")


# ---------------------------------------------------------------------------------------------------------------------
# Conversion plans and the key maps
# ---------------------------------------------------------------------------------------------------------------------


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

    def skip(self, label: str, reason: str) -> None:
        self.skipped[label] = reason

    def reject(self, label: str, reason: str) -> None:
        self.unexpected[label] = reason

    def merge(self, other: "ConversionPlan") -> "ConversionPlan":
        for tensor in other.tensors.values():
            self.add(tensor.name, tensor.shape, tensor.load, tensor.sources)
        self.skipped.update(other.skipped)
        self.unexpected.update(other.unexpected)
        self.conflicts.extend(other.conflicts)
        self.used.update(other.used)
        return self

    def account_for(self, *sources: TensorSource) -> "ConversionPlan":
        """Record every source tensor that no key map claimed as unexpected: nothing is dropped silently."""
        seen = self.used | set(self.skipped) | set(self.unexpected)
        for source in sources:
            for key in source.keys():
                if source.label(key) not in seen:
                    self.reject(source.label(key), "no rule maps this tensor")
        return self

    def num_parameters(self) -> int:
        return sum(math.prod(tensor.shape) for tensor in self.tensors.values())


def _loader(source: TensorSource, key: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
    if transform is None:
        return lambda: source.get(key)
    return lambda: transform(source.get(key))


def _keys_under(source: TensorSource, prefix: str) -> list[str]:
    return [key for key in source.keys() if key.startswith(prefix)]


_TIMM_BLOCK_RENAMES = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.proj": "self_attn.out_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def plan_timm_siglip(source: TensorSource, prefix: str = "", target_prefix: str = VISION_PREFIX) -> ConversionPlan:
    """timm `vit_so400m_patch14_siglip_384` keys (under `prefix`) -> HF SigLIP vision keys (under `target_prefix`).

    The fused `attn.qkv` rows are [q; k; v] (timm reshapes qkv output to (B, N, 3, heads, head_dim)), so each third
    becomes one HF projection. `pos_embed` (1, N, D) loses its batch axis. `attn_pool.*` (timm's MAP head) is not
    used by TimeViper, which reads block outputs before any head.
    """
    plan = ConversionPlan()
    for key in _keys_under(source, prefix):
        name, label, shape = key[len(prefix) :], source.label(key), source.shape(key)
        if match := re.fullmatch(r"patch_embed\.proj\.(weight|bias)", name):
            plan.add(f"{target_prefix}embeddings.patch_embedding.{match[1]}", shape, _loader(source, key), [label])
        elif name == "pos_embed":
            if len(shape) != 3 or shape[0] != 1:
                plan.reject(label, f"pos_embed should have shape (1, num_patches, hidden), got {shape}")
                continue
            plan.add(
                f"{target_prefix}embeddings.position_embedding.weight", shape[1:], _loader(source, key, lambda t: t[0]), [label]
            )
        elif match := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", name):
            layer, kind = match[1], match[2]
            if shape[0] % 3:
                plan.reject(label, f"fused qkv has {shape[0]} rows, not a multiple of 3")
                continue
            rows = shape[0] // 3
            for index, projection in enumerate(("q_proj", "k_proj", "v_proj")):
                plan.add(
                    f"{target_prefix}encoder.layers.{layer}.self_attn.{projection}.{kind}",
                    (rows, *shape[1:]),
                    _loader(source, key, lambda t, i=index, n=rows: t[i * n : (i + 1) * n]),
                    [label],
                )
        elif match := re.fullmatch(r"blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", name):
            target = f"{target_prefix}encoder.layers.{match[1]}.{_TIMM_BLOCK_RENAMES[match[2]]}.{match[3]}"
            plan.add(target, shape, _loader(source, key), [label])
        elif match := re.fullmatch(r"norm\.(weight|bias)", name):
            plan.add(f"{target_prefix}post_layernorm.{match[1]}", shape, _loader(source, key), [label])
        elif name.startswith("attn_pool."):
            plan.skip(label, "unused by TimeViper: timm attention-pool head (vision_use_head=False)")
        else:
            plan.reject(label, "not a timm SigLIP parameter that TimeViper knows how to map")
    return plan


# timm SigLIP widths -> attention heads (base, large, so400m, giant); weights alone do not tell the head count.
TIMM_SIGLIP_HEADS = {768: 12, 1024: 16, 1152: 16, 1536: 16}


def vision_config_from_timm(source: TensorSource, prefix: str = "", num_heads: int | None = None, image_size: int | None = None):
    """The `SiglipVisionConfig` of a timm SigLIP state dict, read from its tensor shapes.

    timm's ViT uses exact GELU and LayerNorm eps 1e-6, which the config states (HF's SigLIP default is tanh-GELU).
    The image size defaults to 384 when that gives the checkpoint's patch grid (so400m/14: 384 // 14 = 27, the
    resize target the reference uses), else to grid * patch.
    """
    from transformers import SiglipVisionConfig

    def shape(name):
        if prefix + name not in source.keys():
            raise ConversionError(f"{source.name} is not a timm SigLIP checkpoint: {prefix}{name} is missing")
        return source.shape(prefix + name)

    width, channels, patch, _ = shape("patch_embed.proj.weight")
    _, positions, _ = shape("pos_embed")
    layers = {int(match[1]) for key in source.keys() if (match := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", key))}
    if layers != set(range(len(layers))) or not layers:
        raise ConversionError(f"{source.name}: the timm blocks are not numbered 0..n-1: {sorted(layers)}")
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise ConversionError(f"{source.name}: pos_embed has {positions} positions, not a square grid")
    if image_size is None:
        image_size = 384 if 384 // patch == grid else grid * patch
    if image_size // patch != grid:
        raise ConversionError(f"image size {image_size} with patch {patch} gives a {image_size // patch}-grid, the weights a {grid}-grid")
    if num_heads is None:
        if width not in TIMM_SIGLIP_HEADS:
            raise ConversionError(f"cannot tell the head count of a width-{width} SigLIP; pass --vision-num-heads")
        num_heads = TIMM_SIGLIP_HEADS[width]
    return SiglipVisionConfig(
        hidden_size=width,
        intermediate_size=shape("blocks.0.mlp.fc1.weight")[0],
        num_hidden_layers=len(layers),
        num_attention_heads=num_heads,
        num_channels=channels,
        image_size=image_size,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )


def plan_hf_siglip(source: TensorSource, target_prefix: str = VISION_PREFIX) -> ConversionPlan:
    """transformers `SiglipVisionModel` / `SiglipModel` keys -> our vision keys (the vision names are kept)."""
    plan = ConversionPlan()
    for key in source.keys():
        label, shape = source.label(key), source.shape(key)
        name = key.removeprefix("vision_model.")
        if key.startswith("text_model.") or key in ("logit_scale", "logit_bias"):
            plan.skip(label, "unused by TimeViper: SigLIP text tower")
        elif name.startswith("head."):
            plan.skip(label, "unused by TimeViper: SigLIP pooling head (vision_use_head=False)")
        elif name == "embeddings.position_ids":
            plan.skip(label, "buffer recomputed by the model")
        elif re.fullmatch(r"(embeddings|encoder|post_layernorm)\..+", name):
            plan.add(target_prefix + name, shape, _loader(source, key), [label])
        else:
            plan.reject(label, "not a SigLIP vision parameter")
    return plan


def plan_projector(source: TensorSource, prefix: str = "projector.projector.") -> ConversionPlan:
    """The reference's `projector.projector.{0,2}.*` (Linear, GELU, Linear) or our own `model.multi_modal_projector.*`."""
    plan = ConversionPlan()
    for key in source.keys():
        label, shape = source.label(key), source.shape(key)
        if key.startswith(prefix):
            match = re.fullmatch(r"(\d+)\.(weight|bias)", key[len(prefix) :])
            if match and match[1] in ("0", "2"):
                linear = "linear_1" if match[1] == "0" else "linear_2"
                plan.add(f"{PROJECTOR_PREFIX}{linear}.{match[2]}", shape, _loader(source, key), [label])
            else:
                plan.reject(label, "the TimeViper projector is Linear-GELU-Linear (indices 0 and 2 only)")
        elif key.startswith(PROJECTOR_PREFIX):
            if re.fullmatch(r"linear_[12]\.(weight|bias)", key[len(PROJECTOR_PREFIX) :]):
                plan.add(key, shape, _loader(source, key), [label])
            else:
                plan.reject(label, "not a parameter of the TimeViper projector")
    return plan


def plan_fresh_projector(vision_hidden: int, text_hidden: int, seed: int) -> ConversionPlan:
    """A new projector, initialised as `nn.Linear` does, from its own seeded RNG (the global RNG is left untouched).

    With `seed = vision_hidden` (1152 for SigLIP so400m) this reproduces the reference, which calls
    `torch.manual_seed(vision_embed_dim)` right before building the same two linears.
    """
    weights = {}

    def build() -> dict[str, torch.Tensor]:
        if not weights:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                first = torch.nn.Linear(vision_hidden, text_hidden)
                second = torch.nn.Linear(text_hidden, text_hidden)
            for linear, module in (("linear_1", first), ("linear_2", second)):
                for kind in ("weight", "bias"):
                    weights[f"{PROJECTOR_PREFIX}{linear}.{kind}"] = getattr(module, kind).detach()
        return weights

    plan = ConversionPlan()
    shapes = {
        "linear_1.weight": (text_hidden, vision_hidden),
        "linear_1.bias": (text_hidden,),
        "linear_2.weight": (text_hidden, text_hidden),
        "linear_2.bias": (text_hidden,),
    }
    for suffix, shape in shapes.items():
        name = PROJECTOR_PREFIX + suffix
        plan.add(name, shape, lambda name=name: build()[name], [f"<new: nn.Linear init, seed {seed}>"])
    return plan


def plan_llm(
    source: TensorSource,
    family: str,
    body_prefix: str,
    lm_head_key: str,
    allow_transfer: bool = False,
    tie_word_embeddings: bool = False,
) -> ConversionPlan:
    """LLM body keys under `body_prefix` -> `model.language_model.*`, `lm_head_key` -> `lm_head.weight`.

    Nemotron-H bodies keep NVIDIA's sub-names (`embeddings`, `layers.{i}.mixer.*`, `norm_f`), except the legacy
    `embedding.weight`. Qwen2 bodies keep HF's (`embed_tokens`, `layers.{i}.self_attn.*`, `norm`). TransV tensors
    (`merge_modules.*`, `alpha`) are accepted only from a TimeViper checkpoint (`allow_transfer`). Whether every name
    fits the model is decided later by `check_plan`. A tied source (no lm_head) gets a copy of the embeddings.
    """
    plan = ConversionPlan()
    for key in source.keys():
        label, shape = source.label(key), source.shape(key)
        if key == lm_head_key:
            plan.add(LM_HEAD, shape, _loader(source, key), [label])
            continue
        if not key.startswith(body_prefix):
            continue
        name = key[len(body_prefix) :]
        if family == "nemotron_h" and name == "embedding.weight":
            name = "embeddings.weight"
        if (name.startswith("merge_modules.") or name == "alpha") and not allow_transfer:
            plan.reject(label, "TransV tensors cannot come from a base LLM checkpoint")
        elif re.fullmatch(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq", name):
            plan.skip(label, "buffer recomputed by the model")
        else:
            plan.add(TEXT_PREFIX + name, shape, _loader(source, key), [label])
    if LM_HEAD not in plan.tensors and tie_word_embeddings:
        embeddings = TEXT_PREFIX + ("embeddings.weight" if family == "nemotron_h" else "embed_tokens.weight")
        if embeddings in plan.tensors:
            tied = plan.tensors[embeddings]
            plan.add(LM_HEAD, tied.shape, tied.load, tied.sources)
            logger.info("the source ties lm_head to the embeddings: writing a copy as lm_head.weight")
    return plan


def attention_parameter_names(family: str) -> list[str]:
    """Names of one attention module's parameters, which TransV's cross-attention shares."""
    if family == "qwen2":
        return ["q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias", "o_proj.weight"]
    return ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]


def nearest_attention_layer(config, layer_idx: int) -> int:
    """The first attention block at or after `layer_idx` (every Qwen2 layer is one)."""
    for index in range(layer_idx, len(config.layer_types)):
        if config.layer_types[index] == "full_attention":
            return index
    raise ConversionError(
        f"no attention block at or after layer {layer_idx} to initialise TransV from; attention blocks are at "
        f"{[i for i, kind in enumerate(config.layer_types) if kind == 'full_attention']}"
    )


def plan_transfer_init(plan: ConversionPlan, config) -> ConversionPlan:
    """TransV for a fresh model: copy q/k/v/o of the nearest attention block at or after each transfer stage's layer,
    and `alpha = 0`, so that every stage starts as plain dropping (reference `init_merge_modules_from_nearest_self_attn`)."""
    family = config.text_config.model_type
    module = "self_attn" if family == "qwen2" else "mixer"
    new = ConversionPlan()
    transfer_stages = [index for index, stage in enumerate(config.compression_stages) if stage.transfer]
    for stage_index in transfer_stages:
        layer = nearest_attention_layer(config, config.compression_stages[stage_index].layer_idx)
        for name in attention_parameter_names(family):
            source_name = f"{TEXT_PREFIX}layers.{layer}.{module}.{name}"
            if source_name not in plan.tensors:
                raise ConversionError(f"cannot initialise TransV stage {stage_index}: {source_name} is not in the source")
            tensor = plan.tensors[source_name]
            new.add(f"{TEXT_PREFIX}merge_modules.{stage_index}.{name}", tensor.shape, tensor.load, tensor.sources)
        new.add(f"{TEXT_PREFIX}merge_modules.{stage_index}.alpha", (1,), lambda: torch.zeros(1), ["<new: zeros>"])
    return new


def split_transfer_gates(plan: ConversionPlan, config) -> ConversionPlan:
    """The reference's one gate vector `alpha` (entry j: the j-th transfer stage) as each TransV module's own gate
    `merge_modules.{stage}.alpha`. Run after `check_transfer_tensors`, which checks that the vector is there."""
    vector = plan.tensors.get(f"{TEXT_PREFIX}alpha")
    if vector is None:
        return plan
    transfer_stages = [index for index, stage in enumerate(config.compression_stages) if stage.transfer]
    if tuple(vector.shape) != (len(transfer_stages),):
        raise ConversionError(
            f"{', '.join(vector.sources)}: alpha has shape {tuple(vector.shape)}, token_compression has "
            f"{len(transfer_stages)} transfer stages"
        )
    split = ConversionPlan(skipped=plan.skipped, unexpected=plan.unexpected, conflicts=plan.conflicts, used=plan.used)
    for name, tensor in plan.tensors.items():
        if name != vector.name:
            split.tensors[name] = tensor
    for slot, stage_index in enumerate(transfer_stages):
        split.add(
            f"{TEXT_PREFIX}merge_modules.{stage_index}.alpha", (1,),
            lambda slot=slot: vector.load()[slot : slot + 1], [f"{source}[{slot}]" for source in vector.sources],
        )
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
        problems.append(f"transfer stage {stage} ({config.compression_stages[int(stage)]}) has no merge_modules.{stage}.* tensors")
    alpha = plan.tensors.get(f"{TEXT_PREFIX}alpha")
    if alpha is not None and not transfer_stages:
        problems.append(f"{', '.join(alpha.sources)}: alpha present but token_compression has no transfer stage")
    if alpha is None and transfer_stages:
        problems.append("alpha is missing but token_compression has transfer stages")
    if problems:
        stages = "-".join(stage.to_reference_string() for stage in config.compression_stages) or "none"
        raise ConversionError(
            f"the checkpoint's TransV tensors do not match --token-compression ({stages}); pass the schedule the "
            "checkpoint was trained with",
            problems,
        )


# ---------------------------------------------------------------------------------------------------------------------
# What the model expects
# ---------------------------------------------------------------------------------------------------------------------


def expected_state_dict_shapes(config, modeling=None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of `TimeViperForConditionalGeneration(config)`'s state dict.

    With the modeling module the model is built on the meta device (no memory), which is the truth the output must
    load into. Without it, the shapes are derived from the config by `spec_state_dict_shapes`.
    """
    if modeling is None:
        return spec_state_dict_shapes(config)
    with torch.device("meta"):
        model = modeling.TimeViperForConditionalGeneration(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def spec_state_dict_shapes(config, vision_prefix: str = VISION_PREFIX) -> dict[str, tuple[int, ...]]:
    """The state-dict layout of TimeViper written out from the config (see the module docstring)."""
    shapes: dict[str, tuple[int, ...]] = {}
    vision = config.vision_config
    width, mlp, channels, patch = vision.hidden_size, vision.intermediate_size, vision.num_channels, vision.patch_size
    shapes[vision_prefix + "embeddings.patch_embedding.weight"] = (width, channels, patch, patch)
    shapes[vision_prefix + "embeddings.patch_embedding.bias"] = (width,)
    shapes[vision_prefix + "embeddings.position_embedding.weight"] = ((vision.image_size // patch) ** 2, width)
    for layer in range(vision.num_hidden_layers):
        prefix = f"{vision_prefix}encoder.layers.{layer}."
        for name, shape in {
            "layer_norm1": (width,),
            "layer_norm2": (width,),
            "self_attn.q_proj": (width, width),
            "self_attn.k_proj": (width, width),
            "self_attn.v_proj": (width, width),
            "self_attn.out_proj": (width, width),
            "mlp.fc1": (mlp, width),
            "mlp.fc2": (width, mlp),
        }.items():
            shapes[f"{prefix}{name}.weight"] = shape
            shapes[f"{prefix}{name}.bias"] = shape[:1]
    shapes[vision_prefix + "post_layernorm.weight"] = (width,)
    shapes[vision_prefix + "post_layernorm.bias"] = (width,)
    if getattr(vision, "vision_use_head", False):
        raise ConversionError("TimeViper's vision tower has no head; set vision_use_head=False")

    text = config.text_config
    hidden = text.hidden_size
    shapes[PROJECTOR_PREFIX + "linear_1.weight"] = (hidden, width)
    shapes[PROJECTOR_PREFIX + "linear_1.bias"] = (hidden,)
    shapes[PROJECTOR_PREFIX + "linear_2.weight"] = (hidden, hidden)
    shapes[PROJECTOR_PREFIX + "linear_2.bias"] = (hidden,)

    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    attention = {
        "q_proj.weight": (heads * head_dim, hidden),
        "k_proj.weight": (kv_heads * head_dim, hidden),
        "v_proj.weight": (kv_heads * head_dim, hidden),
        "o_proj.weight": (hidden, heads * head_dim),
    }
    if text.model_type == "qwen2":
        attention.update({"q_proj.bias": (heads * head_dim,), "k_proj.bias": (kv_heads * head_dim,), "v_proj.bias": (kv_heads * head_dim,)})
        shapes[TEXT_PREFIX + "embed_tokens.weight"] = (text.vocab_size, hidden)
        for layer in range(text.num_hidden_layers):
            prefix = f"{TEXT_PREFIX}layers.{layer}."
            shapes[prefix + "input_layernorm.weight"] = (hidden,)
            shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
            for name, shape in attention.items():
                shapes[prefix + "self_attn." + name] = shape
            shapes[prefix + "mlp.gate_proj.weight"] = (text.intermediate_size, hidden)
            shapes[prefix + "mlp.up_proj.weight"] = (text.intermediate_size, hidden)
            shapes[prefix + "mlp.down_proj.weight"] = (hidden, text.intermediate_size)
        shapes[TEXT_PREFIX + "norm.weight"] = (hidden,)
    else:
        inner = text.mamba_num_heads * text.mamba_head_dim
        conv_dim = inner + 2 * text.n_groups * text.ssm_state_size
        shapes[TEXT_PREFIX + "embeddings.weight"] = (text.vocab_size, hidden)
        for layer, kind in enumerate(text.layer_types):
            prefix = f"{TEXT_PREFIX}layers.{layer}."
            shapes[prefix + "norm.weight"] = (hidden,)
            if kind == "linear_attention":
                mixer = {
                    "in_proj.weight": (inner + conv_dim + text.mamba_num_heads, hidden),
                    "conv1d.weight": (conv_dim, 1, text.conv_kernel),
                    "dt_bias": (text.mamba_num_heads,),
                    "A_log": (text.mamba_num_heads,),
                    "D": (text.mamba_num_heads,),
                    "norm.weight": (inner,),
                    "out_proj.weight": (hidden, inner),
                }
                if text.use_conv_bias:
                    mixer["conv1d.bias"] = (conv_dim,)
            elif kind == "full_attention":
                mixer = dict(attention)
            elif kind == "mlp":
                mixer = {"up_proj.weight": (text.intermediate_size, hidden), "down_proj.weight": (hidden, text.intermediate_size)}
            else:
                raise ConversionError(f"layer {layer} is a {kind!r} block, which TimeViper does not implement")
            for name, shape in mixer.items():
                shapes[prefix + "mixer." + name] = shape
        shapes[TEXT_PREFIX + "norm_f.weight"] = (hidden,)

    transfer_stages = [index for index, stage in enumerate(config.compression_stages) if stage.transfer]
    for index in transfer_stages:
        for name, shape in attention.items():
            shapes[f"{TEXT_PREFIX}merge_modules.{index}.{name}"] = shape
        shapes[f"{TEXT_PREFIX}merge_modules.{index}.alpha"] = (1,)
    shapes[LM_HEAD] = (text.vocab_size, hidden)
    return shapes


def align_vision_prefix(plan: ConversionPlan, expected: dict[str, tuple[int, ...]]) -> ConversionPlan:
    """Move planned vision tensors under `vision_tower.vision_model.` if that is how the model names them."""
    if not any(name.startswith(NESTED_VISION_PREFIX) for name in expected):
        return plan
    renamed = ConversionPlan(skipped=plan.skipped, unexpected=plan.unexpected, conflicts=plan.conflicts, used=plan.used)
    for name, tensor in plan.tensors.items():
        if name.startswith(VISION_PREFIX) and not name.startswith(NESTED_VISION_PREFIX):
            name = NESTED_VISION_PREFIX + name[len(VISION_PREFIX) :]
        renamed.add(name, tensor.shape, tensor.load, tensor.sources)
    return renamed


def check_plan(plan: ConversionPlan, expected: dict[str, tuple[int, ...]]) -> None:
    """Stop, listing every problem, unless the plan produces exactly the expected tensors with the expected shapes."""
    problems = []
    for label, reason in sorted(plan.unexpected.items()):
        problems.append(f"unexpected source tensor {label}: {reason}")
    problems.extend(f"conflict: {line}" for line in plan.conflicts)
    for name in sorted(set(plan.tensors) - set(expected)):
        problems.append(f"unexpected tensor {name} (from {', '.join(plan.tensors[name].sources)}): the model has no such parameter")
    for name in sorted(set(expected) - set(plan.tensors)):
        problems.append(f"missing tensor {name} {tuple(expected[name])}: no source provides it")
    for name in sorted(set(expected) & set(plan.tensors)):
        if tuple(plan.tensors[name].shape) != tuple(expected[name]):
            problems.append(
                f"shape mismatch for {name}: the model expects {tuple(expected[name])}, "
                f"{', '.join(plan.tensors[name].sources)} gives {plan.tensors[name].shape}"
            )
    if problems:
        raise ConversionError(f"the sources do not fit the TimeViper model ({len(problems)} problems)", problems)


def summarize_skipped(skipped: dict[str, str]) -> list[str]:
    """One line per reason: `reason: count tensors (first, ...)`."""
    by_reason: dict[str, list[str]] = {}
    for label, reason in skipped.items():
        by_reason.setdefault(reason, []).append(label)
    lines = []
    for reason, labels in by_reason.items():
        example = ", ".join(labels[:3]) + (", ..." if len(labels) > 3 else "")
        lines.append(f"{len(labels)} tensors skipped, {reason} ({example})")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def write_safetensors_shards(
    plan: ConversionPlan,
    folder: Path,
    dtype: torch.dtype,
    max_shard_size: int,
    order: Iterable[str] | None = None,
    progress: bool = True,
) -> dict:
    """Write every planned tensor, cast to `dtype`, as safetensors shards in `folder`; return the index dict.

    Shard headers are computed from the planned shapes, so each tensor is loaded, cast, written and dropped before
    the next one: peak memory is one tensor (plus its cast copy), not one shard. One shard is named
    `model.safetensors`; several are `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.
    """
    from tqdm.auto import tqdm

    if sys.byteorder != "little":
        raise ConversionError("safetensors files are little-endian; this writer runs on little-endian hosts only")
    names = list(order) if order is not None else sorted(plan.tensors, key=_natural_key)
    if sorted(names) != sorted(plan.tensors):
        raise ConversionError("internal error: the write order does not list every planned tensor exactly once")
    element_size = torch.empty((), dtype=dtype).element_size()
    sizes = {name: math.prod(plan.tensors[name].shape) * element_size for name in names}

    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name in names:
        if shards[-1] and shard_bytes + sizes[name] > max_shard_size:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += sizes[name]
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors" for index in range(len(shards))]

    weight_map = {}
    total = sum(sizes.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="Writing shards", disable=not progress) as bar:
        for file, shard in zip(files, shards):
            header = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name in shard:
                header[name] = {
                    "dtype": SAFETENSORS_DTYPES[dtype],
                    "shape": list(plan.tensors[name].shape),
                    "data_offsets": [offset, offset + sizes[name]],
                }
                offset += sizes[name]
            encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
            encoded += b" " * (-len(encoded) % 8)
            with open(folder / file, "wb") as handle:
                handle.write(len(encoded).to_bytes(8, "little"))
                handle.write(encoded)
                for name in shard:
                    handle.write(_tensor_bytes(plan.tensors[name], dtype))
                    weight_map[name] = file
                    bar.update(sizes[name])
    index = {
        "metadata": {"total_size": total, "total_parameters": plan.num_parameters()},
        "weight_map": {name: weight_map[name] for name in sorted(weight_map)},
    }
    if len(files) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def _tensor_bytes(planned: PlannedTensor, dtype: torch.dtype) -> memoryview:
    tensor = planned.load()
    if not isinstance(tensor, torch.Tensor):
        raise ConversionError(f"{planned.name}: the source {planned.sources} did not give a tensor")
    if tuple(tensor.shape) != planned.shape:
        raise ConversionError(f"{planned.name}: planned shape {planned.shape}, loaded {tuple(tensor.shape)} from {planned.sources}")
    if not tensor.is_floating_point():
        raise ConversionError(f"{planned.name}: {tensor.dtype} is not a floating-point tensor ({planned.sources})")
    cast = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    check_finite(planned, tensor, cast)
    return memoryview(cast.reshape(-1).view(torch.uint8).numpy())


# Elements checked per step by `check_finite`: its temporary mask stays at 16 MiB whatever the tensor's size.
FINITE_CHECK_CHUNK = 1 << 24


def check_finite(planned: PlannedTensor, source: torch.Tensor, cast: torch.Tensor) -> None:
    """Stop on NaN/Inf in a written tensor. Always on (verification is off by default for large models): one pass over
    each tensor, in chunks, while it is in memory anyway."""
    flat = cast.reshape(-1)
    bad = sum(int((~torch.isfinite(chunk)).sum()) for chunk in flat.split(FINITE_CHECK_CHUNK))
    if bad:
        in_source = int((~torch.isfinite(source.detach())).sum())
        cause = "in the source" if in_source else f"from the cast to {str(cast.dtype).removeprefix('torch.')} (values beyond its range)"
        raise ConversionError(
            f"{planned.name}: {bad} of {flat.numel()} values are NaN or Inf {cause}; sources {planned.sources}"
        )


# Written by the converter into every folder it makes: what `--force` may replace. In a temporary folder it says
# `"complete": false`; in a finished output it lists every file the converter wrote.
OUTPUT_MARKER = ".timeviper-convert.json"


def write_output_marker(folder: Path, complete: bool) -> None:
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir())
    marker = {"written_by": "timeviper convert", "complete": complete, "files": [f for f in files if f != OUTPUT_MARKER]}
    (folder / OUTPUT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def read_output_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("written_by") == "timeviper convert" else None


def protected_folder(output: Path) -> str | None:
    """Why `--force` must never replace `output`, whatever it holds: the working directory, the home folder, a folder
    above either, the file system root, or a git checkout."""
    resolved = output.resolve()
    for what, place in (("the current directory", Path.cwd()), ("the home folder", Path.home())):
        place = place.resolve()
        if resolved == place or resolved in place.parents:
            return f"it is {what}" if resolved == place else f"it holds {what}"
    if (resolved / ".git").exists():
        return "it is a git checkout"
    return None


def foreign_content(output: Path) -> str | None:
    """Why an existing `output` is not a finished output of this converter (so `--force` may not delete it), or None.
    An empty folder holds nothing to lose."""
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
    return sorted(path for path in output.parent.iterdir() if path.name.startswith(prefix)) if output.parent.is_dir() else []


def _size(folder: Path) -> str:
    total = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())
    return f"{total / 1e9:.2f} GB" if total >= 1e8 else f"{total / 1e6:.1f} MB"


def recover_interrupted_conversion(output: Path) -> None:
    """Finish what a killed conversion left next to `output` (call with the output's lock held).

    A kill between the two renames of a `--force` swap leaves `output` missing and the old copy in
    `.{name}.replaced-*/old`: it is put back. A replaced copy next to an existing `output` was superseded and is
    deleted. `.{name}.partial-*` folders that carry the converter's marker are cut-short writes and are deleted; others
    are only reported.
    """
    for backup in _siblings(output, "replaced"):
        old = backup / "old"
        if old.exists() and not (output.exists() or output.is_symlink()):
            os.rename(old, output)
            logger.warning("restored %s from %s: a conversion was killed while replacing it", output, backup)
        elif old.exists():
            logger.warning("deleting %s (%s): the copy of %s that a finished --force conversion replaced", backup, _size(backup), output)
        shutil.rmtree(backup)
    for partial in _siblings(output, "partial"):
        if read_output_marker(partial) is None:
            logger.warning("%s (%s) looks like an unfinished conversion by an older version; delete it if nothing uses it", partial, _size(partial))
            continue
        logger.warning("deleting %s (%s): what a killed conversion into %s had written", partial, _size(partial), output)
        shutil.rmtree(partial)


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """An exclusive lock on `.{name}.lock` next to `output`: one conversion at a time writes (or recovers) it."""
    import fcntl

    output.parent.mkdir(parents=True, exist_ok=True)
    path = output.parent / f".{output.name}.lock"
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConversionError(f"another conversion is writing {output} (it holds {path}); wait for it to end") from None
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
    """Before any work: finish what a killed conversion left next to `output`, then refuse an output that is, or holds,
    a source, an existing output without `force`, and with `force` anything but a previous output of this converter."""
    output = Path(output).absolute()
    with output_lock(output):
        recover_interrupted_conversion(output)
        _check_output(output, force, sources)


@contextlib.contextmanager
def atomic_output_dir(output: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `output`; on success rename it to `output`, on failure delete it.

    An existing `output` is replaced only with `force`, only when this converter wrote it (`OUTPUT_MARKER`), and only
    once the new folder is complete. The whole write holds the output's lock; a kill at any point leaves state that the
    next conversion into `output` recovers from (`recover_interrupted_conversion`).
    """
    output = Path(output).absolute()
    with output_lock(output):
        recover_interrupted_conversion(output)
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


# ---------------------------------------------------------------------------------------------------------------------
# Remote code, tokenizer, processor, generation config, model card
# ---------------------------------------------------------------------------------------------------------------------


def load_remote_code(folder: str | Path = REPO_ROOT, need_modeling: bool = False, need_processing: bool = False):
    """Import the three flat TimeViper files of `folder` as one package, the way `trust_remote_code` does.

    The package name hashes the folder and the files' contents, so a changed file is imported afresh. Returns a
    namespace with `configuration`, `modeling` and `processing`; a file that does not exist gives None.
    """
    folder = Path(folder).resolve()
    digest = hashlib.sha256(str(folder).encode())
    for file in REMOTE_CODE_FILES:
        if (folder / file).is_file():
            digest.update((folder / file).read_bytes())
    package = f"_timeviper_remote_{digest.hexdigest()[:16]}"
    if package not in sys.modules:
        module = types.ModuleType(package)
        module.__path__ = [str(folder)]
        sys.modules[package] = module
    modules = {}
    for file in REMOTE_CODE_FILES:
        stem = file[: -len(".py")]
        modules[stem.split("_")[0]] = importlib.import_module(f"{package}.{stem}") if (folder / file).is_file() else None
    if modules["configuration"] is None:
        raise ConversionError(f"{folder / REMOTE_CODE_FILES[0]} is missing")
    if need_modeling and modules["modeling"] is None:
        raise ConversionError(f"{folder / REMOTE_CODE_FILES[1]} is missing")
    if need_processing and modules["processing"] is None:
        raise ConversionError(f"{folder / REMOTE_CODE_FILES[2]} is missing")
    return types.SimpleNamespace(**modules, folder=folder)


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
    """Give a tokenizer without a pad token the LLM's own pad id (Nemotron-H: 0), so that `padding=True` batches work.
    The pad id must lie inside the embedding table: padded positions are embedded, then masked."""
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


def build_timeviper_config(
    remote, text_config, vision_config, tokenizer, projector_type: str, tokens_per_frame: int, vision_feature_layer: int,
    token_compression, dtype: torch.dtype,
):
    """`TimeViperConfig` of the output, with the placeholder ids taken from the tokenizer.

    `projector_type` may be the reference's arch specifier; `tome_mlp-N` sets the tokens per frame to N.
    """
    projector_type, tokens_from_type = parse_projector_type(projector_type)
    for sub_config in (text_config, vision_config):
        sub_config.dtype = dtype
    return remote.configuration.TimeViperConfig(
        vision_config=vision_config,
        text_config=text_config,
        projector_type=projector_type,
        tokens_per_frame=tokens_from_type or tokens_per_frame,
        vision_feature_layer=vision_feature_layer,
        token_compression=token_compression,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        dtype=dtype,
    )


def build_generation_config(family: str, tokenizer, text_config, llm_folder: Path | None):
    """Greedy decoding that stops at the backbone's end-of-turn tokens (plus whatever the source generation config lists)."""
    from transformers import GenerationConfig

    eos_ids: list[int] = []

    def add(ids):
        for token_id in ids if isinstance(ids, (list, tuple)) else [ids]:
            if token_id is not None and token_id not in eos_ids:
                eos_ids.append(int(token_id))

    source = Path(llm_folder) / "generation_config.json" if llm_folder is not None else None
    if source is not None and source.is_file():
        add(json.loads(source.read_text()).get("eos_token_id"))
    add(tokenizer.eos_token_id)
    vocabulary = tokenizer.get_vocab()
    for token in STOP_TOKENS[family]:
        if token in vocabulary:
            add(vocabulary[token])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else text_config.pad_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else text_config.bos_token_id
    return GenerationConfig(bos_token_id=bos, eos_token_id=eos_ids, pad_token_id=pad, do_sample=False)


def write_processor(folder: Path, tokenizer, config, processing) -> None:
    """Save `TimeViperProcessor` (image + video processors, tokenizer, the backbone's chat template) with its auto_map."""
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
               library_name: str = "transformers", **metadata):
    """A `huggingface_hub.ModelCard` for a TimeViper folder: metadata (license, base_model, pipeline_tag,
    library_name, tags, and any other `ModelCardData` field in `metadata`) plus the architecture table, the usage
    snippet and `notes`."""
    from huggingface_hub import ModelCard, ModelCardData

    text = config.text_config
    counts = {kind: list(config.layer_types).count(kind) for kind in dict.fromkeys(config.layer_types)}
    blocks = ", ".join(f"{count} {kind}" for kind, count in counts.items())
    stages = "-".join(stage.to_reference_string() for stage in config.compression_stages) or "none"
    hybrid = text.model_type == "nemotron_h"
    tags = ["timeviper", "video", "video-text-to-text", *(["mamba", "hybrid"] if hybrid else []), "custom_code",
            *extra_tags]
    data = ModelCardData(
        **license_fields, base_model=list(base_models) or None, pipeline_tag="image-text-to-text", library_name=library_name,
        tags=list(dict.fromkeys(tags)), **metadata,
    )
    language_model = "a hybrid Mamba-Transformer (Nemotron-H)" if hybrid else "a Qwen2 transformer"
    # The range of the code that built `config` (the converters run the remote-code files they write).
    supported = sys.modules[type(config).__module__].SUPPORTED_TRANSFORMERS
    body = f"""# TimeViper

TimeViper is a video-language model for long videos: SigLIP encodes the frames, each frame is reduced to
{config.vision_tokens_per_frame} tokens (`{config.projector_type}` projector), and {language_model} language model reads
them, optionally dropping vision tokens inside the LLM and transferring their content to the text (TransV).

| part | value |
|---|---|
| vision tower | SigLIP, {config.vision_config.num_hidden_layers} layers, width {config.vision_config.hidden_size}, {config.vision_config.image_size} px, features from hidden state {config.vision_feature_layer} |
| projector | `{config.projector_type}`, {config.vision_tokens_per_frame} tokens per frame |
| language model | `{text.model_type}`, width {text.hidden_size}, {len(config.layer_types)} blocks ({blocks}) |
| token compression | `{stages}` |

## Usage

The model code ships with the checkpoint, so loading needs `trust_remote_code=True`; it runs on transformers
`{supported}` (`pip install "transformers{supported}"`).

```python
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

repo = "path/or/hub-id/of/this/folder"
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, dtype=torch.bfloat16, device_map="auto")
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

messages = [{{"role": "user", "content": [
    {{"type": "video", "path": "video.mp4"}},
    {{"type": "text", "text": "Describe what happens in the video."}},
]}}]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    processor_kwargs={{"fps": 1}},  # 1 frame per second, at most 256 frames
).to(model.device)
output = model.generate(**inputs, max_new_tokens=128)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Or `pipeline("image-text-to-text", model=repo, trust_remote_code=True)` with the same messages.

{notes}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_card(folder: Path, config, family: str, llm_folder: Path | None, base_models: list[str],
                     conversion_note: str) -> None:
    card = model_card(config, base_models, card_license(family, llm_folder), (), f"## Conversion\n\n{conversion_note}")
    card.save(folder / "README.md")


def guess_base_model(path: Path | None) -> str | None:
    """A Hub id for the model card from a local folder or file name, when the name is a known upstream one."""
    if path is None:
        return None
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
    folder: Path,
    config,
    remote,
    tokenizer,
    family: str,
    llm_folder: Path | None,
    base_models: list[str],
    conversion_note: str,
) -> None:
    """Everything but the weights: config.json (with auto_map), remote code, processor/tokenizer, generation config, card."""
    config.architectures = ["TimeViperForConditionalGeneration"]
    config.save_pretrained(str(folder))
    for file in REMOTE_CODE_FILES:
        if (remote.folder / file).is_file():
            shutil.copyfile(remote.folder / file, folder / file)
        else:
            raise ConversionError(f"{remote.folder / file} is missing: the output would not load with trust_remote_code")
    set_pad_token(tokenizer, config.text_config)
    write_processor(folder, tokenizer, config, remote.processing)
    build_generation_config(family, tokenizer, config.text_config, llm_folder).save_pretrained(str(folder))
    write_model_card(folder, config, family, llm_folder, base_models, conversion_note)


# ---------------------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------------------


def should_verify(flag: bool | None, num_parameters: int) -> bool:
    if flag is not None:
        return flag
    if num_parameters > VERIFY_AUTO_MAX_PARAMETERS:
        logger.info("skipping verification of a %.1fB-parameter model (pass --verify to force it)", num_parameters / 1e9)
        return False
    return True


def load_converted_model(folder: Path):
    """Load the converted folder with its own copy of the remote code, in fp32 on CPU."""
    remote = load_remote_code(folder, need_modeling=True)
    model, info = remote.modeling.TimeViperForConditionalGeneration.from_pretrained(
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
def compare_text_logits(model, reference, vocab_size: int, avoid_ids: Iterable[int] = (), seq_len: int = 24, seed: int = 0) -> float:
    """Max |logits| difference between the TimeViper model and the source LLM on a random text-only prompt."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (2, seq_len), generator=generator)
    for token_id in avoid_ids:
        ids[ids == token_id] = 0
    ours = model(input_ids=ids).logits.float()
    theirs = reference(input_ids=ids).logits.float()
    if ours.shape != theirs.shape:
        raise ConversionError(f"logit shapes differ: converted {tuple(ours.shape)}, source {tuple(theirs.shape)}")
    return (ours - theirs).abs().max().item()


@torch.no_grad()
def compare_vision_features(model, reference_tower, feature_layer: int, image_size: int, seed: int = 0) -> float:
    """Max difference of the selected hidden state between our vision tower and a reference `SiglipVisionModel`."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2, 3, image_size, image_size, generator=generator) * 2 - 1
    tower = model.get_submodule("model.vision_tower")
    ours = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
    theirs = reference_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
    return (ours.float() - theirs.float()).abs().max().item()


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
    reference.load_state_dict(vision_state_dict(plan), strict=True)
    return round_trip_dtype(reference, dtype)


def vision_state_dict(plan: ConversionPlan) -> dict[str, torch.Tensor]:
    """The planned vision tensors under `SiglipVisionModel`'s own names, for building a reference tower."""
    tensors = {}
    for name, tensor in plan.tensors.items():
        for prefix in (NESTED_VISION_PREFIX, VISION_PREFIX):
            if name.startswith(prefix):
                tensors[name[len(prefix) :]] = tensor.load().clone()
                break
    return tensors


def report_verification(results: dict[str, float], tolerance: float) -> None:
    for what, diff in results.items():
        logger.info("verify: %s max abs diff %.3e (tolerance %.0e)", what, diff, tolerance)
    failed = [f"{what}: max abs diff {diff:.3e} > {tolerance:.0e}" for what, diff in results.items() if not diff <= tolerance]
    if failed:
        raise ConversionError("the converted model does not reproduce the source", failed)


def add_shared_arguments(parser) -> None:
    """The options both conversion CLIs share: the output, the model layout and how the result is written."""
    parser.add_argument("--output", required=True, type=Path, help="output folder (must not exist unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--projector-type", default="tome_mlp", help="tome_mlp, mlp, or the reference's tome_mlp-N / gelu_mlp (default: %(default)s)")
    parser.add_argument("--tokens-per-frame", type=int, default=16, help="ToMe output tokens per frame for tome_mlp (default: %(default)s)")
    parser.add_argument("--vision-feature-layer", type=int, default=-2, help="vision hidden state fed to the projector (default: %(default)s)")
    parser.add_argument("--vision-num-heads", type=int, default=None, help="heads of a SigLIP whose width is not a known one")
    parser.add_argument("--image-size", type=int, default=None, help="vision input size (default: 384 if it fits the patch grid)")
    parser.add_argument("--dtype", default="bf16", help="dtype of the written weights: bf16, fp16 or fp32 (default: %(default)s)")
    parser.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default: %(default)s)")
    parser.add_argument("--base-model", action="append", dest="base_models", help="Hub id for the model card (repeatable)")
    parser.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=None,
        help="load the result and compare it with the sources (default: on up to 2B parameters)",
    )
    parser.add_argument("--verify-atol", type=float, default=1e-3, help="largest accepted max abs difference in verification (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_and_report_plan(plan: "ConversionPlan", config, modeling) -> tuple["ConversionPlan", dict]:
    """Align the plan's vision prefix with the model's, stop on any missing / unexpected / mis-shaped tensor, and
    log what will be written and skipped. Returns the plan and the model's expected shapes (in state-dict order)."""
    expected = expected_state_dict_shapes(config, modeling)
    plan = align_vision_prefix(plan, expected)
    check_plan(plan, expected)
    logger.info("%d tensors to write; %d source tensors skipped", len(plan.tensors), len(plan.skipped))
    for line in summarize_skipped(plan.skipped):
        logger.info(line)
    return plan, expected
