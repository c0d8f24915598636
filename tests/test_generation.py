"""generate() on the hybrid cache: cached decoding equals full recomputation, batching equals single samples."""

import pytest
import torch
from tiny_models import VIDEO_TOKEN_ID, open_transfer_gates, tiny_model
from transformers import TextStreamer

from timeviper.modeling_timeviper import CACHE_NAME, TimeViperHybridCache

TOKENS_PER_FRAME = 4
SCHEDULES = [None, "uni_1_0.5-unidrop_3_0.34", "uni_1_0.5-attn_2_0.25"]


def make_model(backbone, schedule, seed=0):
    model = tiny_model(backbone, seed=seed, token_compression=schedule)
    open_transfer_gates(model, 0.8)  # non-trivial TransV: random cross-attention weights and open gates
    return model


def video_prompt(num_frames, prefix=(5, 6), question=(7, 8, 9, 10), seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = list(prefix) + [VIDEO_TOKEN_ID] * (num_frames * TOKENS_PER_FRAME) + list(question)
    return torch.tensor([ids]), torch.randn(num_frames, 3, 28, 28, generator=generator)


@torch.no_grad()
def greedy_by_recomputation(model, input_ids, pixels, steps):
    """The oracle: rerun the whole sequence without a cache for every new token; the attention-guided query stays
    on the last prompt token, as at prefill."""
    query = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1)
    tokens, all_logits = input_ids, []
    for _ in range(steps):
        logits = model(input_ids=tokens, pixel_values_videos=pixels, compression_query_positions=query).logits[:, -1]
        all_logits.append(logits)
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens[:, input_ids.shape[1] :], torch.stack(all_logits, 1)


@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cached_greedy_equals_recomputation(backbone, schedule):
    model = make_model(backbone, schedule)
    input_ids, pixels = video_prompt(num_frames=3)
    out = model.generate(
        input_ids=input_ids, pixel_values_videos=pixels, max_new_tokens=8, do_sample=False,
        return_dict_in_generate=True, output_logits=True, eos_token_id=None, pad_token_id=0,
    )
    expected_tokens, expected_logits = greedy_by_recomputation(model, input_ids, pixels, steps=8)
    assert torch.equal(out.sequences[:, input_ids.shape[1] :], expected_tokens)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_left_padded_batch_equals_single_samples(backbone, schedule):
    model = make_model(backbone, schedule)
    short_ids, short_pixels = video_prompt(num_frames=2, question=(7, 8), seed=1)
    long_ids, long_pixels = video_prompt(num_frames=4, question=(9, 10, 11, 12, 13), seed=2)
    singles = [
        model.generate(input_ids=ids, pixel_values_videos=px, max_new_tokens=6, do_sample=False, eos_token_id=None)
        [:, ids.shape[1] :]
        for ids, px in [(short_ids, short_pixels), (long_ids, long_pixels)]
    ]
    pad = long_ids.shape[1] - short_ids.shape[1]
    batch_ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short_ids], 1), long_ids])
    attention_mask = (torch.arange(long_ids.shape[1]) >= torch.tensor([[pad], [0]])).long()
    batched = model.generate(
        input_ids=batch_ids, attention_mask=attention_mask, pixel_values_videos=torch.cat([short_pixels, long_pixels]),
        max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
    )[:, batch_ids.shape[1] :]
    assert torch.equal(batched, torch.cat(singles))


def test_sampling_with_seed_is_reproducible():
    model = make_model("nemotron_h", "uni_1_0.5")
    input_ids, pixels = video_prompt(num_frames=2)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(input_ids=input_ids, pixel_values_videos=pixels, max_new_tokens=10, do_sample=True, top_k=20, eos_token_id=None))
    assert torch.equal(runs[0], runs[1])


def test_eos_ids_stop_generation_and_streamer_receives_tokens():
    model = make_model("nemotron_h", None)
    input_ids, pixels = video_prompt(num_frames=2)
    free = model.generate(input_ids=input_ids, pixel_values_videos=pixels, max_new_tokens=6, do_sample=False, eos_token_id=None)
    new = free[0, input_ids.shape[1] :].tolist()
    stop = new[2]
    received = []

    class RecordingStreamer(TextStreamer):
        def __init__(self):
            pass

        def put(self, value):
            received.append(value.flatten().tolist())

        def end(self):
            received.append("end")

    stopped = model.generate(
        input_ids=input_ids, pixel_values_videos=pixels, max_new_tokens=6, do_sample=False,
        eos_token_id=[90, stop], pad_token_id=0, streamer=RecordingStreamer(),
    )
    assert stopped[0, input_ids.shape[1] :].tolist() == new[: new.index(stop) + 1]
    assert received[-1] == "end"
    assert [token for chunk in received[1:-1] for token in chunk] == new[: new.index(stop) + 1]


@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
def test_text_only_generation(backbone):
    model = make_model(backbone, "uni_1_0.5")
    input_ids = torch.tensor([[5, 6, 7, 8, 9]])
    out = model.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False, eos_token_id=None)
    expected, _ = greedy_by_recomputation(model, input_ids, None, steps=5)
    assert torch.equal(out[:, 5:], expected)


def cache_bytes_formula(model, batch, lengths_per_segment, dropped_per_stage, dtype_bytes=4):
    """Mamba: conv (conv_dim x (kernel-1)) + SSM (heads x head_dim x state, float32) per block; attention: K and V
    of the segment the block sits in; TransV: K and V of the dropped tokens."""
    config = model.config.text_config
    total, segment = 0, 0
    stage_layers = [stage.layer_idx for stage in model.config.compression_stages]
    conv_dim = config.mamba_num_heads * config.mamba_head_dim + 2 * config.n_groups * config.ssm_state_size
    for layer_idx, kind in enumerate(model.config.layer_types):
        segment += layer_idx in stage_layers
        if kind == "linear_attention":
            total += batch * conv_dim * (config.conv_kernel - 1) * dtype_bytes
            total += batch * config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size * 4
        elif kind == "full_attention":
            total += 2 * batch * config.num_key_value_heads * lengths_per_segment[segment] * config.head_dim * dtype_bytes
    for stage_index, dropped in dropped_per_stage.items():
        total += 2 * batch * config.num_key_value_heads * dropped * config.head_dim * dtype_bytes
    return total


def test_cache_memory_matches_formula():
    model = make_model("nemotron_h", "uni_1_0.5-unidrop_3_0.25")
    input_ids, pixels = video_prompt(num_frames=4)  # 16 vision + 6 text tokens
    cache = TimeViperHybridCache()
    with torch.no_grad():
        model(input_ids=input_ids, pixel_values_videos=pixels, past_key_values=cache, use_cache=True, logits_to_keep=1)
    # segment 0: 22 tokens; after stage 0 (keep 8 of 16): 14; after stage 1 (keep 4): 10. Stage 0 transfers 8.
    assert cache.memory_bytes() == cache_bytes_formula(model, 1, [22, 14, 10], {0: 8})
    assert [valid.shape[1] for valid in cache.segment_valid] == [22, 14, 10]


def test_beam_search_reorders_the_cache():
    model = make_model("nemotron_h", "uni_1_0.5")
    input_ids, pixels = video_prompt(num_frames=2)
    out = model.generate(input_ids=input_ids, pixel_values_videos=pixels, max_new_tokens=4, num_beams=2, do_sample=False, eos_token_id=None)
    assert out.shape == (1, input_ids.shape[1] + 4)


def test_pixels_after_prefill_are_rejected():
    model = make_model("nemotron_h", None)
    input_ids, pixels = video_prompt(num_frames=1)
    cache = TimeViperHybridCache()
    with torch.no_grad():
        model(input_ids=input_ids, pixel_values_videos=pixels, past_key_values=cache)
        with pytest.raises(ValueError, match="prefill"):
            model(input_ids=input_ids[:, -1:], pixel_values_videos=pixels, past_key_values=cache)


def test_prefill_computes_only_the_last_logits():
    model = make_model("nemotron_h", "uni_1_0.5")
    input_ids, pixels = video_prompt(num_frames=2)
    shapes = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape)))
    model.generate(input_ids=input_ids, pixel_values_videos=pixels, max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert shapes == [(1, 1, model.config.text_config.vocab_size)] * 3


def test_padded_prefill_needs_no_quadratic_mask():
    from timeviper.modeling_timeviper import TokenLayout

    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    holes = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert TokenLayout.from_key_validity(left, 5).row_spans == [(2, 5), (0, 5)]
    assert TokenLayout.from_key_validity(right, 5).row_spans == [(0, 3), (0, 5)]
    assert TokenLayout.from_key_validity(left, 5).attention_mask is None
    assert TokenLayout.from_key_validity(holes, 5).attention_mask.shape == (2, 1, 5, 5)  # the general fallback


def padded_video_batch():
    """Two prompts of different lengths, the shorter left-padded."""
    short_ids, short_pixels = video_prompt(num_frames=2, question=(7, 8), seed=1)
    long_ids, long_pixels = video_prompt(num_frames=3, seed=2)
    pad = long_ids.shape[1] - short_ids.shape[1]
    input_ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short_ids], 1), long_ids])
    attention_mask = (torch.arange(long_ids.shape[1]) >= torch.tensor([[pad], [0]])).long()
    return input_ids, attention_mask, torch.cat([short_pixels, long_pixels])


@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_static_cache_decodes_like_the_dynamic_one(backbone, schedule):
    model = make_model(backbone, schedule)
    input_ids, attention_mask, pixels = padded_video_batch()
    outputs = {
        implementation: model.generate(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values_videos=pixels, max_new_tokens=7,
            do_sample=False, return_dict_in_generate=True, output_logits=True, eos_token_id=None, pad_token_id=0,
            cache_implementation=implementation,
        )
        for implementation in ("dynamic", "static")
    }
    cache = outputs["static"].past_key_values
    assert cache.has_static_buffers and cache.max_length == input_ids.shape[1] + 6
    assert cache.seen_tokens == cache.max_length  # every preallocated slot was used, none more
    assert torch.equal(outputs["static"].sequences, outputs["dynamic"].sequences)
    torch.testing.assert_close(
        torch.stack(outputs["static"].logits), torch.stack(outputs["dynamic"].logits), atol=1e-5, rtol=0
    )


def test_static_cache_beam_search_reorders_in_place():
    model = make_model("nemotron_h", "uni_1_0.5-attn_2_0.25")
    input_ids, attention_mask, pixels = padded_video_batch()
    beams = [
        model.generate(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values_videos=pixels, max_new_tokens=5,
            num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation=implementation,
        )
        for implementation in ("dynamic", "static")
    ]
    assert torch.equal(*beams)


def test_static_cache_refuses_what_it_cannot_do():
    model = make_model("nemotron_h", "uni_1_0.5")
    input_ids, pixels = video_prompt(num_frames=1)
    cache = TimeViperHybridCache(max_length=input_ids.shape[1] + 1)
    with torch.no_grad():
        token = model(input_ids=input_ids, pixel_values_videos=pixels, past_key_values=cache).logits[:, -1:].argmax(-1)
        with pytest.raises(ValueError, match="one new token id per row and step, got input_ids of shape \\(1, 2\\)"):
            model(input_ids=torch.cat([token, token], 1), past_key_values=cache)
        token = model(input_ids=token, past_key_values=cache).logits.argmax(-1)
        with pytest.raises(ValueError, match="static cache is full"):
            model(input_ids=token, past_key_values=cache)
        with pytest.raises(ValueError, match="keeps its batch size"):
            cache.batch_repeat_interleave(2)
    with pytest.raises(ValueError, match="cache_implementation='quantized' is not supported"):
        model.generate(input_ids=input_ids, pixel_values_videos=pixels, max_new_tokens=2, cache_implementation="quantized")


def test_grouped_decode_attention_matches_eager_attention():
    from timeviper.modeling_timeviper import eager_attention, grouped_decode_attention

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 8, 1, 16, generator=generator)
    key, value = torch.randn(2, 3, 2, 11, 16, generator=generator)
    mask = torch.rand(3, 1, 1, 11, generator=generator) > 0.4
    mask[..., -1] = True
    expected = eager_attention(query, key, value, mask, False, 0.25)
    torch.testing.assert_close(grouped_decode_attention(query, key, value, mask, 0.25), expected)


@pytest.mark.parametrize(
    ("device", "implementation", "expected_max_length"),
    [("cpu", None, None), ("cuda", None, 30), ("cuda", "dynamic", None), ("cpu", "static", 30)],
)
def test_generate_picks_a_static_cache_on_cuda_by_default(monkeypatch, device, implementation, expected_max_length):
    from transformers import GenerationConfig

    model = make_model("nemotron_h", None)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device(device)))
    model_kwargs = {}
    config = GenerationConfig(cache_implementation=implementation)
    model._prepare_cache_for_generation(config, model_kwargs, None, 1, 30)
    assert model_kwargs[CACHE_NAME].max_length == expected_max_length  # generate() reads the release's name
