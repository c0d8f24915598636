"""Loading a TimeViper checkpoint for inference so that its weights cover the model: transformers only warns about
tensors a checkpoint lacks and fills them with random values, which would generate noise without a word."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

INDEX_FILE = "model.safetensors.index.json"
TRANSFER_PREFIX = "model.language_model.merge_modules."


class CheckpointError(ValueError):
    """A checkpoint whose files or weights do not match the model; the message names the files and tensors."""


def _listed(names, limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _tensor_names(path: Path) -> set[str]:
    """The tensor names of a safetensors file, from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return set(handle.keys())
    except Exception as error:  # safetensors raises its own SafetensorError, which never names the file
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from error


def check_checkpoint_files(folder: Path) -> None:
    """Check (from the headers) that every shard the index names exists and holds the tensors assigned to it, and
    that the index names every `model-*-of-*.safetensors` shard in `folder`."""
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        if (folder / "model.safetensors").is_file():
            _tensor_names(folder / "model.safetensors")
        return
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        tensors_of = defaultdict(set)
        for tensor, shard in weight_map.items():
            tensors_of[shard].add(tensor)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{index_path} is not a valid index (a 'weight_map' of tensor -> shard): {error}") from error
    problems = []
    for shard, tensors in sorted(tensors_of.items()):
        if not (folder / shard).is_file():
            problems.append(f"{shard} does not exist; it should hold {_listed(tensors)}")
            continue
        absent = tensors - _tensor_names(folder / shard)
        if absent:
            problems.append(f"{shard} does not hold {_listed(absent)}, which the index assigns to it")
    for path in sorted(folder.glob("model-*-of-*.safetensors")):
        if path.name not in tensors_of:
            problems.append(f"{path.name} is in the folder, but the index assigns no tensor to it")
    if problems:
        raise CheckpointError(f"{index_path} does not match the shards:\n  " + "\n  ".join(problems))


def closed_transfer_stages(model) -> set[str]:
    """Stage indices (as in `merge_modules.{i}`) of the TransV modules whose gate `tanh(alpha)` is exactly 0."""
    modules = getattr(model.model.language_model, "merge_modules", {})
    return {stage for stage, module in modules.items() if float(module.alpha.detach()) == 0.0}


def check_loading_info(model, info: dict, source: str, transfer_initialised: bool = False) -> None:
    """Raise on tensors the checkpoint lacked (or held in another shape), which transformers filled with random values.
    Tolerated: a TransV module missing whole (its gate stays closed at 0, so the stage only drops tokens), as when a
    `token_compression` override adds a stage. A module that lost only some tensors would run with other weights than
    were trained. With `transfer_initialised` (training initialises missing TransV modules itself, and under ZeRO-3 a
    gate's values are not on this rank to be read) every TransV tensor is tolerated."""
    closed = set() if transfer_initialised else closed_transfer_stages(model)
    missing_keys = set(info["missing_keys"])
    loaded_stages = {  # stages of which the checkpoint held at least one tensor
        stage
        for stage, module in getattr(model.model.language_model, "merge_modules", {}).items()
        for name, _ in module.named_parameters()
        if f"{TRANSFER_PREFIX}{stage}.{name}" not in missing_keys
    }

    def tolerated(key: str) -> bool:
        if not key.startswith(TRANSFER_PREFIX):
            return False
        stage = key[len(TRANSFER_PREFIX) :].split(".")[0]
        return transfer_initialised or (stage in closed and stage not in loaded_stages)

    missing = {key for key in info["missing_keys"] if not tolerated(key)}
    mismatched = {entry[0] for entry in info["mismatched_keys"] if not tolerated(entry[0])}
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint (they would be random): {_listed(missing)}")
    if mismatched:
        problems.append(f"of another shape in the checkpoint: {_listed(mismatched)}")
    problems += list(info["error_msgs"])
    if problems:
        raise CheckpointError(f"the checkpoint {source} does not hold the model's weights:\n  " + "\n  ".join(problems))


def load_checkpoint(path: str, dtype, revision: str | None = None, **config_overrides):
    """`AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, ...)` that raises a `CheckpointError`
    naming the files and tensors when the checkpoint does not hold every weight of the model."""
    from transformers import AutoModelForImageTextToText

    if Path(path).is_dir():
        check_checkpoint_files(Path(path))
    model, info = AutoModelForImageTextToText.from_pretrained(
        path, trust_remote_code=True, revision=revision, dtype=dtype, output_loading_info=True, **config_overrides
    )
    check_loading_info(model, info, path)
    return model
