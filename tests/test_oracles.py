"""Our blocks against transformers' own NemotronH / Qwen2 / SigLIP implementations on identical weights."""

import pytest
import torch
from tiny_models import tiny_config, tiny_text_config, tiny_vision_config
from transformers import NemotronHConfig, NemotronHForCausalLM, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from timeviper.modeling_timeviper import TimeViperForConditionalGeneration

pytestmark = pytest.mark.numerics  # re-run under other CPU kernels: test_machine_independence.py

ATOL = 1e-5  # float32


def native_text_model(backbone):
    values = tiny_text_config(backbone)
    values.pop("model_type")
    torch.manual_seed(1)
    if backbone == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**values)).eval()
    native = NemotronHForCausalLM(NemotronHConfig(**values)).eval()
    # transformers clamps dt at time_step_min; ours follows the checkpoint's time_step_limit, as the reference does.
    for layer in native.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = (0.0, float("inf"))
    return native


def load_native_weights(ours: TimeViperForConditionalGeneration, native) -> None:
    state = {}
    for name, tensor in native.state_dict().items():
        if name.startswith("model."):
            state["model.language_model." + name.removeprefix("model.")] = tensor
        else:
            state[name] = tensor
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(not key.startswith("model.language_model.") for key in missing if "rotary" not in key), missing


@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
def test_text_logits_match_transformers(backbone):
    native = native_text_model(backbone)
    ours = TimeViperForConditionalGeneration(tiny_config(backbone)).eval()
    load_native_weights(ours, native)
    input_ids = torch.randint(3, 90, (2, 37))
    with torch.no_grad():
        expected = native(input_ids=input_ids).logits
        actual = ours(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
def test_left_padded_logits_match_transformers(backbone):
    native = native_text_model(backbone)
    ours = TimeViperForConditionalGeneration(tiny_config(backbone)).eval()
    load_native_weights(ours, native)
    input_ids = torch.randint(3, 90, (2, 21))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :6] = 0
    with torch.no_grad():
        expected = native(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = ours(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(actual[attention_mask.bool()], expected[attention_mask.bool()], atol=ATOL, rtol=0)


def test_vision_features_match_siglip_hidden_state():
    config = tiny_config(projector_type="mlp")
    ours = TimeViperForConditionalGeneration(config).eval()
    vision_values = tiny_vision_config()
    siglip = SiglipVisionModel(SiglipVisionConfig(**vision_values)).eval()
    loaded = siglip.load_state_dict(ours.model.vision_tower.state_dict(), strict=False)
    # Ours stops at the block whose output is used (vision_feature_layer = -2): no last block, no post-norm.
    last = vision_values["num_hidden_layers"] - 1
    assert not loaded.unexpected_keys
    assert {key.split(".")[0] if "post_layernorm" in key else key.split(".")[2] for key in loaded.missing_keys} == {
        "post_layernorm", str(last)
    }
    frames = torch.randn(5, 3, 28, 28)
    with torch.no_grad():
        hidden = siglip(frames, output_hidden_states=True).hidden_states[config.vision_feature_layer]
        expected = ours.model.multi_modal_projector(hidden)
        actual = ours.get_video_features(frames)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_vision_chunking_does_not_change_features():
    model = TimeViperForConditionalGeneration(tiny_config()).eval()
    frames = torch.randn(7, 3, 28, 28)
    with torch.no_grad():
        whole = model.get_video_features(frames)
        model.config.vision_chunk_size = 3
        chunked = model.get_video_features(frames)
    assert whole.shape == (7, 4, 48)
    torch.testing.assert_close(chunked, whole, atol=ATOL, rtol=0)
