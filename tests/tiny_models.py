"""Tiny TimeViper configs and models for tests: every block type, both backbones, small enough for CPU."""

import sys
from pathlib import Path

import torch

# pytest puts the repository root on sys.path (setup.cfg), a script run from tests/ does not: the tiny configs live
# in inference/, at the root.
if str(Path(__file__).resolve().parent.parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from inference import tiny_default  # noqa: E402
from inference.tiny_default import tiny_vision_config  # noqa: E402
from timeviper.configuration_timeviper import TimeViperConfig  # noqa: E402

TINY_VOCAB = 96
VIDEO_TOKEN_ID = 94
IMAGE_TOKEN_ID = 95


def tiny_text_config(backbone="nemotron_h", **overrides):
    """The embedded default's LLM with a 96-token vocabulary (placeholders at 94 and 95)."""
    return {**tiny_default.tiny_text_config(backbone, TINY_VOCAB), **overrides}


def tiny_config(backbone="nemotron_h", token_compression=None, projector_type="tome_mlp", tokens_per_frame=4, **kw):
    return TimeViperConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(backbone),
        projector_type=projector_type,
        tokens_per_frame=tokens_per_frame,
        video_token_id=VIDEO_TOKEN_ID,
        image_token_id=IMAGE_TOKEN_ID,
        token_compression=token_compression,
        **kw,
    )


def tiny_model(backbone="nemotron_h", seed=0, **kw):
    from timeviper.modeling_timeviper import TimeViperForConditionalGeneration

    torch.manual_seed(seed)
    return TimeViperForConditionalGeneration(tiny_config(backbone, **kw)).eval()


def transfer_gates(model) -> list[torch.nn.Parameter]:
    """The TransV gates `alpha` of a model, one per transfer stage."""
    text_model = model.model.language_model
    return [module.alpha for module in text_model.merge_modules.values()] if text_model.transfer_slot else []


@torch.no_grad()
def open_transfer_gates(model, value: float) -> None:
    for gate in transfer_gates(model):
        gate.fill_(value)
