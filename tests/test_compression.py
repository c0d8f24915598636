"""In-LLM compression: which tokens are kept, TransV, and everything per token following one gather."""

import math

import pytest
import torch
from tiny_models import VIDEO_TOKEN_ID, open_transfer_gates, tiny_model, transfer_gates

from timeviper.modeling_timeviper import first_supervised_query, select_uniform


def video_batch(frame_counts, text=(7, 8, 9), prefix=(5,), seed=0):
    """Left-padded batch; returns ids, mask, pixels (frames of all rows concatenated)."""
    rows = [list(prefix) + [VIDEO_TOKEN_ID] * (4 * f) + list(text) for f in frame_counts]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(sum(frame_counts), 3, 28, 28, generator=torch.Generator().manual_seed(seed))
    return ids, mask, pixels


def test_uniform_indices_are_the_reference_integer_linspace():
    assert select_uniform(10, 4).tolist() == torch.linspace(0, 9, 4, dtype=torch.long).tolist()
    model = tiny_model(token_compression="unidrop_1_0.5")
    ids, mask, pixels = video_batch([3])  # 12 vision tokens at positions 1..12, keep 6
    with torch.no_grad():
        kept = model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels).kept_positions[0]
    vision_kept = [p - 1 for p in kept.tolist() if 1 <= p <= 12]
    assert vision_kept == torch.linspace(0, 11, 6, dtype=torch.long).tolist()  # global across frames
    assert kept.tolist()[0] == 0 and kept.tolist()[-3:] == [13, 14, 15]


def test_keep_counts_are_fractions_of_the_original_tokens_per_sample():
    model = tiny_model(token_compression="uni_1_0.5-attn_2_0.25")
    ids, mask, pixels = video_batch([3, 5])
    with torch.no_grad():
        kept = model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels).kept_positions
    for row in range(2):
        positions = kept[row][kept[row] >= 0]
        num_vision = int((ids[row, positions] == VIDEO_TOKEN_ID).sum())
        original = int((ids[row] == VIDEO_TOKEN_ID).sum())
        assert num_vision == int(original * 0.25)
        assert len(positions) == int(mask[row].sum()) - original + num_vision


def naive_attention_selection(attention, hidden, query_index, vision_index, num_keep):
    """Reference computation: full causal L x L attention of the raw residual, mean over heads, query row."""
    q = attention.q_proj(hidden).view(hidden.shape[0], attention.num_heads, -1).transpose(0, 1)
    k = attention.k_proj(hidden).view(hidden.shape[0], attention.num_kv_heads, -1).transpose(0, 1)
    k = k.repeat_interleave(attention.num_heads // attention.num_kv_heads, 0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attention.head_dim)
    causal = torch.ones(hidden.shape[0], hidden.shape[0], dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, -math.inf).softmax(-1).mean(0)
    return weights[query_index, vision_index].topk(num_keep).indices.sort().values


@pytest.mark.numerics
@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
def test_attention_selection_equals_the_full_matrix_computation(backbone):
    model = tiny_model(backbone, token_compression="attn_2_0.25")
    ids, _, pixels = video_batch([4])
    captured = {}
    model.model.language_model.layers[1].register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
    with torch.no_grad():
        kept = model(input_ids=ids, pixel_values_videos=pixels).kept_positions[0]
        vision_index = (ids[0] == VIDEO_TOKEN_ID).nonzero().squeeze(1)
        attention = model.model.language_model.layers[2].attention
        expected = naive_attention_selection(attention, captured["h"][0], ids.shape[1] - 1, vision_index, 4)
    assert [p for p in kept.tolist() if ids[0, p] == VIDEO_TOKEN_ID] == vision_index[expected].tolist()


@pytest.mark.numerics
def test_transv_at_zero_gate_equals_plain_dropping():
    transfer = tiny_model(token_compression="uni_1_0.5-attn_2_0.25", seed=3)
    dropping = tiny_model(token_compression="unidrop_1_0.5-attndrop_2_0.25", seed=3)
    dropping.load_state_dict(transfer.state_dict(), strict=False)
    ids, mask, pixels = video_batch([2, 3])
    with torch.no_grad():
        a = transfer(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels).logits
        b = dropping(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels).logits
        open_transfer_gates(transfer, 0.5)
        c = transfer(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (c - b).abs().max() > 1e-3  # an open gate changes the text tokens


def test_init_transfer_from_nearest_attention_copies_weights_and_zeroes_gates():
    model = tiny_model(token_compression="uni_0_0.5-uni_3_0.25")  # attention blocks: 2 and 6
    open_transfer_gates(model, 1.0)
    model.init_transfer_from_nearest_attention()
    layers, merge = model.model.language_model.layers, model.model.language_model.merge_modules
    assert torch.equal(merge["0"].q_proj.weight, layers[2].mixer.q_proj.weight)  # block 2 is the first attention
    assert torch.equal(merge["1"].o_proj.weight, layers[6].mixer.o_proj.weight)
    assert all(torch.count_nonzero(gate) == 0 for gate in transfer_gates(model))


def test_loss_follows_the_kept_tokens_and_reaches_transv_gates():
    model = tiny_model(token_compression="uni_1_0.5-attn_2_0.25").train()
    ids, mask, pixels = video_batch([3, 2], text=(7, 8, 9, 10, 11))
    labels = ids.masked_fill(mask == 0, -100).clone()
    labels[ids == VIDEO_TOKEN_ID] = -100
    labels[:, :-3] = -100  # supervise the last three tokens
    out = model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, labels=labels)
    kept = out.kept_positions
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    targets = shifted.gather(1, kept.clamp(min=0)).masked_fill(kept < 0, -100)
    expected = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert all(gate.grad.abs().sum() > 0 for gate in transfer_gates(model))
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_training_query_is_the_token_before_the_first_supervised_label():
    labels = torch.tensor([[-100, -100, -100, 4, 5, -100, 6], [-100] * 7])
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    assert first_supervised_query(labels, mask).tolist() == [2, 6]


def test_placeholder_count_mismatch_is_a_clear_error():
    model = tiny_model()
    ids, _, pixels = video_batch([3])
    with pytest.raises(ValueError, match="12 placeholder tokens .* 2 frames x 4 tokens"):
        model(input_ids=ids, pixel_values_videos=pixels[:2])
    with pytest.raises(ValueError, match="no pixel values"):
        model(input_ids=ids)


def test_attention_scoring_goes_through_the_blocks_own_call():
    """FSDP gathers a block's sharded weights in hooks around the block's call, so scoring must use that call."""
    model = tiny_model(token_compression="attn_2_0.25")
    calls = []
    model.model.language_model.layers[2].register_forward_pre_hook(
        lambda module, args, kwargs: calls.append("score_query" in kwargs and kwargs["score_query"] is not None),
        with_kwargs=True,
    )
    ids, _, pixels = video_batch([2])
    with torch.no_grad():
        model(input_ids=ids, pixel_values_videos=pixels)
    assert calls == [True, False]  # scoring first, then the block itself
