"""The embedded trained default: a tiny TimeViper trained on the needle task (training/synthetic.py) with
`python -m training.train_default`, shipped in `inference/needle_model/` (weights, config, processor, tokenizer and
chat template; no code files, so that they cannot drift from the package's)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from evaluation.tasks import build_mcq_prompt
from training.synthetic import COLORS, HELD_OUT_SEED_START, QUESTION, NeedleClip

MODEL_DIR = Path(__file__).resolve().parent / "needle_model"
DEMO_SEED = HELD_OUT_SEED_START  # a clip the model never saw in training
DEMO_FRAMES = 48


def materialize_checkpoint(folder, model_dir=MODEL_DIR, token_compression: str | None = None) -> Path:
    """A self-contained copy of `model_dir` in `folder`: its files, the package's remote-code files, and
    `token_compression` ("none" for no compression) in config.json when given. It loads like any checkpoint."""
    from timeviper import copy_remote_code

    model_dir, folder = Path(model_dir), Path(folder)
    if not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"no trained model in {model_dir} (run: python -m training.train_default --out {model_dir})")
    folder.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.is_file():
            shutil.copyfile(path, folder / path.name)
    copy_remote_code(folder)
    if token_compression is not None:
        config = json.loads((folder / "config.json").read_text())
        config["token_compression"] = token_compression  # any form TimeViperConfig reads: "none", a schedule, JSON
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def demo_clip() -> NeedleClip:
    return NeedleClip.draw(DEMO_SEED, DEMO_FRAMES)


def demo_question() -> str:
    """The needle question in the evaluation harness's multiple-choice form."""
    return build_mcq_prompt(QUESTION, list(COLORS))
