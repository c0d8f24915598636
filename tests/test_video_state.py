"""A video state (`encode_video_state`) answers each question as an independent full run of its prompt would:
every kind of compression schedule, both backbones, several questions from one state, saved and loaded."""

import json

import pytest
import torch
from tiny_models import VIDEO_TOKEN_ID, open_transfer_gates, tiny_model

from timeviper.modeling_timeviper import TimeViperHybridCache, TimeViperVideoState

# No compression; uniform + attention-guided dropping; the same with TransV; attention-guided first; uniform only
# with TransV (nothing question-dependent: the state covers every block).
SCHEDULES = [None, "unidrop_1_0.5-attndrop_2_0.25", "uni_1_0.5-attn_2_0.25", "attn_2_0.3-uni_3_0.1",
             "uni_1_0.5-uni_3_0.25"]
# fp32 on CPU: a question's tokens attend over the cached keys in a call of their own, and the stage after the
# video re-runs on prefix + question in other chunks, which changes only the order of sums (~1e-7 on these
# logits); a wrong selection, a stale or mutated state moves them by far more than 1e-5.
ATOL = 1e-5
PREFIX = [5, 6, 7] + [VIDEO_TOKEN_ID] * 20  # 5 frames x 4 tokens
QUESTIONS = ([8, 9, 10], [11], [12, 13, 14, 15, 16, 17, 18])


def make_model(backbone, schedule, seed=1):
    model = tiny_model(backbone, seed=seed, token_compression=schedule)
    open_transfer_gates(model, 0.8)  # TransV changes the text tokens
    return model


def video():
    return torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(0))


def snapshot(state):
    cache = state.cache
    tensors = [*cache.conv_states.values(), *cache.ssm_states.values(), *cache.keys.values(),
               *cache.values.values(), *cache.segment_valid, *(t for m in cache.transfer_memory.values() for t in m)]
    if state.resume.held is not None:
        tensors.append(state.resume.held.hidden_states)
    return [t.clone() for t in tensors]


def assert_answers_like_full_runs(model, state, pixels):
    for question in QUESTIONS:
        ids = torch.tensor([PREFIX + question])
        with torch.no_grad():
            expected = model(input_ids=ids, pixel_values_videos=pixels).logits[:, -1]
            logits = model(**state.question_inputs(ids)).logits[:, -1]
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
        greedy = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
        full = model.generate(input_ids=ids, pixel_values_videos=pixels, **greedy)
        assert torch.equal(model.generate_from_video_state(state, ids, **greedy), full), question


@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_questions_from_one_state_equal_independent_full_runs(backbone, schedule):
    model = make_model(backbone, schedule)
    pixels = video()
    with torch.no_grad():
        state = model.encode_video_state(torch.tensor([PREFIX + [8]]), pixel_values_videos=pixels,
                                         prefill_chunk_size=7)
    before = snapshot(state)
    assert_answers_like_full_runs(model, state, pixels)
    for tensor, original in zip(snapshot(state), before, strict=True):
        assert torch.equal(tensor, original)  # forks never write into the state
    question_dependent = schedule is not None and "attn" in schedule
    assert (state.resume.held is not None) == question_dependent
    assert state.num_frames == 5 and state.prefix_length == len(PREFIX)


def test_saved_state_answers_after_loading_and_reports_its_size(tmp_path):
    model = make_model("nemotron_h", "uni_1_0.5-attn_2_0.25")
    pixels = video()
    with torch.no_grad():
        state = model.encode_video_state(torch.tensor([PREFIX]), video_features=model.get_video_features(pixels))
    state.save(tmp_path / "clip")
    metadata = json.loads((tmp_path / "clip" / "video_state.json").read_text())
    assert metadata["schedule"] == "uni_1_0.5-attn_2_0.25" and metadata["num_frames"] == 5
    assert metadata["memory_bytes"] == state.memory_bytes() > 0
    assert metadata["bytes_per_frame"] == pytest.approx(state.memory_bytes() / 5)
    loaded = TimeViperVideoState.load(tmp_path / "clip", model)
    assert loaded.memory_bytes() == state.memory_bytes()
    assert_answers_like_full_runs(model, loaded, pixels)


@pytest.mark.parametrize(
    "other, message",
    [(dict(schedule="uni_1_0.5-attn_6_0.25"), "compression schedule"), (dict(seed=2), "weights")],
)
def test_loading_into_a_mismatched_model_is_refused(tmp_path, other, message):
    model = make_model("nemotron_h", "uni_1_0.5-attn_2_0.25")
    with torch.no_grad():
        model.encode_video_state(torch.tensor([PREFIX]), pixel_values_videos=video()).save(tmp_path)
    mismatched = make_model("nemotron_h", other.get("schedule", "uni_1_0.5-attn_2_0.25"), other.get("seed", 1))
    with pytest.raises(ValueError, match=message):
        TimeViperVideoState.load(tmp_path, mismatched)


def test_a_prompt_that_does_not_continue_the_prefix_is_refused():
    model = make_model("qwen2", "uni_1_0.5-attn_2_0.25")
    with torch.no_grad():
        state = model.encode_video_state(torch.tensor([PREFIX]), pixel_values_videos=video())
    with pytest.raises(ValueError, match="differ from the video state's prefix"):
        state.question_inputs(torch.tensor([[4] + PREFIX[1:] + [8]]))
    with pytest.raises(ValueError, match="must follow the video"):
        state.question_inputs(torch.tensor([PREFIX]))
    with torch.no_grad(), pytest.raises(ValueError, match="no video placeholder"):
        model.encode_video_state(torch.tensor([[5, 6, 7]]), pixel_values_videos=video())


@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
def test_several_new_tokens_after_a_cached_prompt_are_causal(backbone):
    """A plain cache continued by several tokens at once gives the one-shot logits of those tokens."""
    model = make_model(backbone, None)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    cache = TimeViperHybridCache()
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, 4:]
        model(input_ids=ids[:, :4], past_key_values=cache)
        logits = model(input_ids=ids[:, 4:], attention_mask=torch.ones_like(ids), past_key_values=cache).logits
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
