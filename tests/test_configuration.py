"""TimeViperConfig: sub-configs, round trips, the compression schedule formats and their validation."""

import pytest
from tiny_models import tiny_config

from timeviper.configuration_timeviper import (
    NANO_9B_V2_PATTERN,
    TimeViperCompressionStage,
    TimeViperConfig,
    normalize_compression,
    parse_compression_string,
)


def test_defaults_are_the_released_architecture():
    config = TimeViperConfig()
    assert config.text_config.model_type == "nemotron_h" and config.text_config.hidden_size == 4480
    kinds = config.layer_types
    assert len(kinds) == 56 and kinds.count("linear_attention") == 27 and kinds.count("mlp") == 25
    assert [i for i, k in enumerate(kinds) if k == "full_attention"] == [14, 21, 30, 39]
    assert config.vision_config.hidden_act == "gelu" and config.vision_config.num_hidden_layers == 27
    assert config.vision_tokens_per_frame == 16 and config.vision_feature_layer == -2
    assert len(NANO_9B_V2_PATTERN) == 56


def test_reference_string_is_parsed_as_keep_ratios():
    stages = parse_compression_string("uni_7_0.5-attn_39_0.05")
    assert stages == [
        TimeViperCompressionStage(7, 0.5, "uniform", True),
        TimeViperCompressionStage(39, 0.05, "attention", True),
    ]
    assert parse_compression_string("unidrop_7_0.5")[0].transfer is False
    assert [s.to_reference_string() for s in stages] == ["uni_7_0.5", "attn_39_0.05"]


def test_drop_ratio_is_the_papers_notation():
    stage = TimeViperCompressionStage.from_dict({"layer_idx": 7, "drop_ratio": 0.5})
    assert stage.keep_ratio == 0.5
    config = TimeViperConfig(token_compression=[{"layer_idx": 7, "drop_ratio": 0.5}, {"layer_idx": 39, "drop_ratio": 0.95, "method": "attention"}])
    assert [s.keep_ratio for s in config.compression_stages] == [0.5, pytest.approx(0.05)]
    assert config.compression_schedule == "uni_7_0.5-attn_39_0.05"
    assert TimeViperConfig(token_compression="none").compression_schedule == "none"


def test_text_forms_of_a_schedule():
    """What a command line passes: 'none' in any case, the reference string, JSON of one stage or a list."""
    assert normalize_compression(None) == [] and normalize_compression(" none ") == []
    assert normalize_compression("None") == [] and normalize_compression("") == []
    assert normalize_compression("uni_7_0.5-attn_39_0.05") == parse_compression_string("uni_7_0.5-attn_39_0.05")
    assert normalize_compression('[{"layer_idx": 7, "keep_ratio": 0.5}]') == [TimeViperCompressionStage(7, 0.5)]
    assert normalize_compression('{"layer_idx": 7, "keep_ratio": 0.5}') == [TimeViperCompressionStage(7, 0.5)]
    stages = [TimeViperCompressionStage(7, 0.5)]
    assert normalize_compression(stages) == stages  # already parsed: a Python caller's list
    assert TimeViperConfig(token_compression="NONE").token_compression == []


@pytest.mark.parametrize(
    "schedule, message",
    [
        ("attn_7_0.5", "needs an attention block; block 7 is 'linear_attention'"),
        ("uni_7_0.5-uni_14_0.6", "keep ratios must decrease"),
        ("uni_14_0.5-uni_7_0.2", "increasing layer indices"),
        ("uni_60_0.5", "out of range: the LLM has 56 blocks"),
        ("uni_7_1.5", r"keep_ratio must lie in \(0, 1\]"),
        ("uni_7_0", r"keep_ratio must lie in \(0, 1\]"),
        ("pool_7_0.5", "must start with 'uni' or 'attn'"),
        ("uni_7", "must be 'type_layer_keepratio'"),
        ("uni_x_0.5", "integer layer and a float ratio"),
        ([{"layer_idx": 7, "keep_ratio": 0.5, "drop_ratio": 0.5}], "not both"),
        ([{"layer_idx": 7, "keep": 0.5}], "unknown compression stage fields"),
        ('[{"layer_idx": 7, "keep_ratio": 0.5}', "is not valid JSON"),
        ("[7]", "a compression stage must be a dict"),
    ],
)
def test_bad_schedules_raise_clear_errors(schedule, message):
    with pytest.raises(ValueError, match=message):
        TimeViperConfig(token_compression=schedule)


def test_other_validation():
    with pytest.raises(ValueError, match="projector_type"):
        TimeViperConfig(projector_type="qformer")
    with pytest.raises(ValueError, match="tokens_per_frame"):
        TimeViperConfig(tokens_per_frame=1000)
    with pytest.raises(ValueError, match="text_config.model_type"):
        TimeViperConfig(text_config={"model_type": "llama"})


@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
def test_save_and_load_round_trip(tmp_path, backbone):
    config = tiny_config(backbone, token_compression="uni_1_0.5-unidrop_3_0.25")
    config.save_pretrained(tmp_path)
    loaded = TimeViperConfig.from_pretrained(tmp_path)
    assert loaded.text_config.to_dict() == config.text_config.to_dict()
    assert loaded.vision_config.to_dict() == config.vision_config.to_dict()
    assert loaded.compression_stages == config.compression_stages
    assert loaded.layer_types == config.layer_types
