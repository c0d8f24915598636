"""Tiny TimeViper configs and models for tests: every block type, both backbones, small enough for CPU."""

import torch

from timeviper.configuration_timeviper import TimeViperConfig

TINY_VOCAB = 96
VIDEO_TOKEN_ID = 94
IMAGE_TOKEN_ID = 95


def tiny_vision_config(**overrides):
    values = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=28,
        patch_size=4, hidden_act="gelu", layer_norm_eps=1e-6, vision_use_head=False,
    )
    values.update(overrides)
    return values


def tiny_text_config(backbone="nemotron_h", **overrides):
    if backbone == "qwen2":
        values = dict(
            model_type="qwen2", vocab_size=TINY_VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
            rope_theta=10000.0, tie_word_embeddings=False,
        )
    else:
        # M - * M - M * M: Mamba, MLP, attention blocks in the order the compression tests need.
        values = dict(
            model_type="nemotron_h", vocab_size=TINY_VOCAB, hidden_size=48, hybrid_override_pattern="M-*M-M*M",
            num_attention_heads=4, num_key_value_heads=2, head_dim=12, intermediate_size=64, mamba_num_heads=4,
            mamba_head_dim=8, ssm_state_size=8, n_groups=2, conv_kernel=4, chunk_size=8, layer_norm_epsilon=1e-5,
            time_step_limit=(0.0, float("inf")), time_step_min=0.001, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    values.update(overrides)
    return values


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
