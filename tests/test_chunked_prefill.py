"""Chunked prefill (`prefill_chunk_size`) gives what the one-shot prefill gives: every compression stage, both
backbones, chunk boundaries anywhere, left-padded batches."""

import pytest
import torch
from tiny_models import VIDEO_TOKEN_ID, open_transfer_gates, tiny_model

from timeviper.modeling_timeviper import TimeViperHybridCache, TimeViperTextModel

TOKENS_PER_FRAME = 4
# No compression; uniform + attention-guided dropping; the same with TransV (open gates below).
SCHEDULES = [None, "unidrop_1_0.5-attndrop_2_0.25", "uni_1_0.5-attn_2_0.25", "attn_2_0.3-uni_6_0.1"]
# fp32 on CPU: a chunk boundary changes only the order of sums (Mamba scan chunks, attention over fewer or more
# keys at once); the logits of these tiny models move by ~1e-6, a wrong token or state by far more than 1e-4.
ATOL = 1e-4


def make_model(backbone, schedule):
    if backbone == "qwen2" and schedule == "attn_2_0.3-uni_6_0.1":
        schedule = "attn_2_0.3-uni_3_0.1"  # the tiny Qwen2 has 4 layers
    model = tiny_model(backbone, seed=1, token_compression=schedule)
    open_transfer_gates(model, 0.8)  # TransV changes the text tokens
    return model


def padded_batch(frame_counts, seed=0):
    """Left-padded rows: a 3-token prefix, the video, then a question of a length that differs per row."""
    rows = [[5, 6, 7] + [VIDEO_TOKEN_ID] * (TOKENS_PER_FRAME * f) + list(range(8, 11 + i))
            for i, f in enumerate(frame_counts)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(sum(frame_counts), 3, 28, 28, generator=torch.Generator().manual_seed(seed))
    return ids, mask, pixels


@torch.no_grad()
def prefill(model, ids, mask, pixels, chunk_size):
    cache = TimeViperHybridCache()
    extra = {} if chunk_size is None else {"prefill_chunk_size": chunk_size}
    out = model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, past_key_values=cache, **extra)
    return out, cache


@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_chunked_prefill_equals_one_shot(backbone, schedule):
    model = make_model(backbone, schedule)
    ids, mask, pixels = padded_batch([5, 3])  # 20 and 12 vision tokens; row 1 has 10 padding positions
    expected, expected_cache = prefill(model, ids, mask, pixels, None)
    # 1: every token (so also every stage boundary and the first kept token after it); 3: the end of the prefix, then inside frames; 7: inside frames and the question; 23 and 26:
    # one boundary inside the text after the video in each row; a chunk larger than the prompt.
    for chunk_size in (1, 3, 7, 23, 26, 64):
        out, cache = prefill(model, ids, mask, pixels, chunk_size)
        assert torch.equal(out.kept_positions, expected.kept_positions), chunk_size
        valid = (out.kept_positions >= 0)[..., None]
        torch.testing.assert_close(out.logits * valid, expected.logits * valid, atol=ATOL, rtol=0)
        assert_same_cache(cache, expected_cache)


def assert_same_cache(cache, expected):
    assert cache.seen_tokens == expected.seen_tokens
    assert [v.tolist() for v in cache.segment_valid] == [v.tolist() for v in expected.segment_valid]
    for store, reference in ((cache.keys, expected.keys), (cache.values, expected.values),
                             (cache.ssm_states, expected.ssm_states), (cache.conv_states, expected.conv_states)):
        assert store.keys() == reference.keys()
        for layer_idx in store:
            torch.testing.assert_close(store[layer_idx], reference[layer_idx], atol=ATOL, rtol=0)
    assert cache.transfer_memory.keys() == expected.transfer_memory.keys()
    for stage, (key, value, mask) in cache.transfer_memory.items():
        torch.testing.assert_close(key, expected.transfer_memory[stage][0], atol=ATOL, rtol=0)
        torch.testing.assert_close(value, expected.transfer_memory[stage][1], atol=ATOL, rtol=0)
        assert torch.equal(mask, expected.transfer_memory[stage][2])


@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
@pytest.mark.parametrize("schedule", SCHEDULES[1:3])
def test_chunked_generate_gives_the_same_greedy_tokens(backbone, schedule, monkeypatch):
    chunk_sizes = []
    original = TimeViperTextModel.prefill_in_chunks
    monkeypatch.setattr(TimeViperTextModel, "prefill_in_chunks",
                        lambda self, *a, **k: chunk_sizes.append(a[4]) or original(self, *a, **k))
    model = make_model(backbone, schedule)
    ids, mask, pixels = padded_batch([4, 2, 6], seed=3)
    runs = []
    for extra in ({}, {"prefill_chunk_size": 5}):
        runs.append(model.generate(
            input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, max_new_tokens=6, do_sample=False,
            eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_logits=True, **extra,
        ))
    assert chunk_sizes == [5]  # generate()'s own prefill_chunk_size reached the model's chunked prefill, once
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(torch.stack(runs[1].logits), torch.stack(runs[0].logits), atol=ATOL, rtol=0)


def test_video_features_on_the_host_equal_pixel_values():
    """Precomputed features (`get_video_features`) in place of pixels, chunked or not, give the same logits."""
    model = make_model("nemotron_h", "uni_1_0.5-attn_2_0.25")
    ids, mask, pixels = padded_batch([3, 2])
    with torch.no_grad():
        features = model.get_video_features(pixels)
        expected = model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels)
        one_shot = model(input_ids=ids, attention_mask=mask, video_features=features).logits
        chunked = model(input_ids=ids, attention_mask=mask, video_features=features, prefill_chunk_size=6,
                        use_cache=True).logits
    assert torch.equal(one_shot, expected.logits)
    valid = (expected.kept_positions >= 0)[..., None]
    torch.testing.assert_close(chunked * valid, expected.logits * valid, atol=ATOL, rtol=0)


def test_chunked_prefill_keeps_only_the_last_logits_generate_asks_for():
    model = make_model("qwen2", None)
    ids, mask, pixels = padded_batch([2])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, prefill_chunk_size=4,
                    logits_to_keep=1, use_cache=True)
        expected = model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels).logits[:, -1:]
    assert out.logits.shape == expected.shape
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=0)


def test_chunked_prefill_refuses_what_it_cannot_do():
    model = make_model("nemotron_h", None)
    ids, mask, pixels = padded_batch([2])
    with pytest.raises(ValueError, match="torch.no_grad"):
        model(input_ids=ids, pixel_values_videos=pixels, prefill_chunk_size=4, use_cache=True)
    holes = mask.clone()
    holes[0, 4] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="one run"):
        model(input_ids=ids, attention_mask=holes, pixel_values_videos=pixels, prefill_chunk_size=4, use_cache=True)
    with torch.no_grad(), pytest.raises(ValueError, match="either pixel_values_videos or video_features"):
        model(input_ids=ids, pixel_values_videos=pixels, video_features=model.get_video_features(pixels))


def test_static_cache_decodes_in_the_room_the_chunked_prefill_reserved():
    """The static cache's decode buffers are the prefill's own keys/values (no second copy of the cache)."""
    model = make_model("nemotron_h", "uni_1_0.5-attn_2_0.25")
    ids, mask, pixels = padded_batch([3, 2])
    cache = TimeViperHybridCache(max_length=ids.shape[1] + 4)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, past_key_values=cache,
              prefill_chunk_size=5)
    addresses = {layer: keys.data_ptr() for layer, keys in cache.keys.items()}
    runs = [
        model.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, max_new_tokens=4,
                       do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation=implementation,
                       prefill_chunk_size=5)
        for implementation in ("static", "dynamic")
    ]
    assert torch.equal(runs[0], runs[1])
    with torch.no_grad():
        model(input_ids=runs[0][:, ids.shape[1] : ids.shape[1] + 1], past_key_values=cache)
    assert {layer: keys.data_ptr() for layer, keys in cache.keys.items()} == addresses


def test_stage_work_split_into_pieces_gives_the_same_result(monkeypatch):
    """Attention-guided scores project their keys, and TransV its memory, a piece at a time at long lengths."""
    model = make_model("nemotron_h", "uni_1_0.5-attn_2_0.25")
    ids, mask, pixels = padded_batch([5, 3])
    expected, expected_cache = prefill(model, ids, mask, pixels, None)
    monkeypatch.setattr(TimeViperTextModel, "sequence_chunk_size", 3)
    monkeypatch.setattr(type(model.model.language_model.layers[2].attention), "score_chunk_size", 5)
    out, cache = prefill(model, ids, mask, pixels, None)
    assert torch.equal(out.kept_positions, expected.kept_positions)
    torch.testing.assert_close(out.logits, expected.logits, atol=ATOL, rtol=0)
    assert_same_cache(cache, expected_cache)
