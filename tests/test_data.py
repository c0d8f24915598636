"""Training data (training/data.py): the JSONL format, validation errors, frame sampling, labels, the collator.

CPU, tiny model and tokenizer, synthetic PyAV videos whose frames encode their index (tests/tiny_assets.py).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tiny_assets import frame_index_from_pixels, make_frame, write_test_video  # noqa: E402

from evaluation.tasks import build_grounding_prompt  # noqa: E402
from training import train  # noqa: E402
from training.data import (  # noqa: E402
    DataFormatError,
    SampleLoadError,
    TimeViperDataCollator,
    TimeViperSFTDataset,
    load_samples,
    parse_sample,
)

VIDEO_FPS = 12
# (file, frames, first encoded index): 2 s, 3 s, 4 s and 5 s at 12 fps.
VIDEOS = [("v0.mp4", 24, 0), ("v1.mp4", 36, 1000), ("v2.mp4", 48, 2000), ("v3.mp4", 60, 3000)]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    for name, frames, start in VIDEOS:
        write_test_video(root / name, num_frames=frames, fps=VIDEO_FPS, size=(32, 32), start_index=start)
    from PIL import Image

    Image.fromarray(make_frame(7, size=(32, 32))).save(root / "still.png")
    return root


@pytest.fixture(scope="module")
def tiny():
    """(model, processor): the --tiny model of the CLI, with the uni_1_0.5 TransV schedule."""
    torch.manual_seed(0)
    args = train.TimeViperArguments(tiny=True, token_compression="uni_1_0.5")
    return train.build_model_and_processor(args)


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(row if isinstance(row, str) else json.dumps(row))
            handle.write("\n")
    return path


def conversation(question, answer, **extra):
    return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], **extra}


def supervised_spans(item, tokenizer) -> list[str]:
    """The decoded runs of consecutive supervised labels."""
    labels = item["labels"].tolist()
    spans, current = [], []
    for label in labels + [-100]:
        if label != -100:
            current.append(label)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans


def frame_indices(pixel_values) -> list[int]:
    """Recover the encoded index of each processed frame (undo the [-1, 1] normalisation)."""
    frames = ((pixel_values * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)
    return [frame_index_from_pixels(frame) for frame in frames]


# ---------------------------------------------------------------------------------------------------------------------
# Format


def test_both_turn_schemas_are_accepted_and_the_video_goes_first(media):
    ours = {"id": 1, "video": "v0.mp4", **conversation("What is it?", "Red.")}
    reference = {
        "video": str(media / "v0.mp4"),
        "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Red."}],
    }
    sample, sample_id, problems = parse_sample(ours, "f:1", media)
    assert problems == [] and sample_id == "1"
    assert sample.media_type == "video" and sample.media_path == str(media / "v0.mp4")  # relative to the root
    assert sample.messages[0] == {"role": "user", "content": "<video>What is it?"}  # no separator, as the reference
    sample, _, problems = parse_sample(reference, "f:2", None)
    assert problems == []
    assert [m["role"] for m in sample.messages] == ["user", "assistant"]
    assert sample.messages[0]["content"] == "<video>\nWhat is it?"  # the reference's <image> marks the video
    # A video listed under "image" (reference data) is a video.
    sample, _, problems = parse_sample({"image": "v1.mp4", **conversation("Q", "A")}, "f:3", media)
    assert problems == [] and sample.media_type == "video"


def test_labels_cover_exactly_the_assistant_turns(media, tiny, tmp_path):
    _, processor = tiny
    rows = [
        {
            "id": "multi",
            "video": "v1.mp4",
            "conversations": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What colour?"},
                {"role": "assistant", "content": "Green."},
                {"role": "user", "content": "And then?"},
                {"role": "assistant", "content": "Blue."},
            ],
        }
    ]
    dataset = TimeViperSFTDataset(write_jsonl(tmp_path / "d.jsonl", rows), processor, video_root=media, fps=1.0)
    item = dataset[0]
    # 3 s at 1 fps: frames 0, 12, 24 -> 3 frames x 4 tokens.
    assert item["pixel_values_videos"].shape == (3, 3, 28, 28)
    assert int((item["input_ids"] == processor.video_token_id).sum()) == 3 * processor.tokens_per_frame
    assert supervised_spans(item, processor.tokenizer) == [
        "<SPECIAL_11>Assistant\nGreen.\n<SPECIAL_12>",
        "<SPECIAL_11>Assistant\nBlue.\n<SPECIAL_12>",
    ]
    assert (item["labels"][item["input_ids"] == processor.video_token_id] == -100).all()
    text = processor.tokenizer.decode(item["input_ids"])
    assert text.startswith("<SPECIAL_10>System\nBe brief.<SPECIAL_12>\n<SPECIAL_11>User\n<video>")


def test_window_fps_and_frame_cap_select_the_expected_frames(media, tiny, tmp_path):
    _, processor = tiny
    rows = [
        {"id": "window", "video": "v2.mp4", "start": 1.0, "end": 2.0, **conversation("Q", "A")},
        {"id": "capped", "video": "v3.mp4", "fps": 4, "max_frames": 3, **conversation("Q", "A")},
        {"id": "count", "video": "v3.mp4", "num_frames": 2, **conversation("Q", "A")},
    ]
    dataset = TimeViperSFTDataset(write_jsonl(tmp_path / "d.jsonl", rows), processor, video_root=media, fps=4.0)
    # 1 s to 2 s at 4 fps: frames 12, 15, 18, 21 of the video (encoded indices start at 2000).
    assert frame_indices(dataset[0]["pixel_values_videos"]) == [2012, 2015, 2018, 2021]
    # 5 s at 4 fps = 20 frames, uniformly subsampled to 3; then 2 uniform segment midpoints.
    capped = frame_indices(dataset[1]["pixel_values_videos"])
    assert len(capped) == 3 and capped == sorted(capped) and capped[0] >= 3000
    assert frame_indices(dataset[2]["pixel_values_videos"]) == [3015, 3045]


def test_grounding_samples_use_the_evaluation_prompt(media, tiny, tmp_path):
    _, processor = tiny
    rows = [{"id": "tvg", "video": "v3.mp4", "query": "the door opens", "timestamps": [1, 2.5]}]
    dataset = TimeViperSFTDataset(write_jsonl(tmp_path / "d.jsonl", rows), processor, video_root=media, fps=1.0)
    item = dataset[0]
    num_frames = item["pixel_values_videos"].shape[0]
    assert num_frames == 5
    text = processor.tokenizer.decode(item["input_ids"])
    assert "<video>" + build_grounding_prompt("the door opens", 5.0, num_frames) + "\n<SPECIAL_12>" in text
    assert supervised_spans(item, processor.tokenizer) == ["<SPECIAL_11>Assistant\n1 to 2.5 seconds\n<SPECIAL_12>"]


def test_image_and_text_only_samples(media, tiny, tmp_path):
    _, processor = tiny
    rows = [
        {"id": "img", "image": "still.png", **conversation("Describe.", "A still.")},
        {"id": "txt", **conversation("Hi", "Hello.")},
    ]
    dataset = TimeViperSFTDataset(write_jsonl(tmp_path / "d.jsonl", rows), processor, video_root=media)
    image, text = dataset[0], dataset[1]
    assert image["pixel_values"].shape == (1, 3, 28, 28) and "pixel_values_videos" not in image
    assert int((image["input_ids"] == processor.image_token_id).sum()) == processor.tokens_per_frame
    assert "pixel_values" not in text and "pixel_values_videos" not in text
    assert supervised_spans(text, processor.tokenizer) == ["<SPECIAL_11>Assistant\nHello.\n<SPECIAL_12>"]


# ---------------------------------------------------------------------------------------------------------------------
# Collator


def test_collator_pads_right_and_keeps_each_samples_frames_in_order(media, tiny, tmp_path):
    """A batch of videos with 2, 3 and 5 frames gives each row the logits it gets alone (fp32, atol 1e-5):
    right padding is invisible to the valid tokens and the frames fill the placeholders in batch order."""
    model, processor = tiny
    rows = [
        {"id": "a", "video": "v0.mp4", **conversation("Colour?", "Red.")},
        {"id": "b", "video": "v3.mp4", **conversation("What happens next in the clip?", "Nothing.")},
        {"id": "c", "video": "v1.mp4", **conversation("Count?", "Three.")},
    ]
    dataset = TimeViperSFTDataset(write_jsonl(tmp_path / "d.jsonl", rows), processor, video_root=media, fps=1.0)
    items = [dataset[i] for i in range(3)]
    collator = TimeViperDataCollator.from_processor(processor)
    batch = collator(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["pixel_values_videos"].shape[0] == 2 + 5 + 3
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == -100).all()
    model.eval()
    weighted_loss, supervised = 0.0, 0
    with torch.no_grad():
        batched = model(**batch)
        for row, item in enumerate(items):
            alone = model(**collator([item]))
            kept = batched.kept_positions[row]
            # Compression re-pads each row on the left: compare at the input positions both outputs kept.
            ours = {int(p): i for i, p in enumerate(kept.tolist()) if p >= 0}
            theirs = {int(p): i for i, p in enumerate(alone.kept_positions[0].tolist()) if p >= 0}
            assert ours.keys() == theirs.keys()
            index = sorted(ours)
            torch.testing.assert_close(
                batched.logits[row, [ours[p] for p in index]], alone.logits[0, [theirs[p] for p in index]],
                atol=1e-5, rtol=1e-5,
            )
            count = int((item["labels"][1:] != -100).sum())
            weighted_loss, supervised = weighted_loss + alone.loss.item() * count, supervised + count
    assert batched.loss.item() == pytest.approx(weighted_loss / supervised, rel=1e-5)


def test_collator_pads_to_a_multiple(tiny):
    _, processor = tiny
    collator = TimeViperDataCollator.from_processor(processor, pad_to_multiple_of=8)
    batch = collator([{"input_ids": torch.arange(5), "labels": torch.arange(5)}])
    assert batch["input_ids"].shape == (1, 8) and "pixel_values_videos" not in batch


# ---------------------------------------------------------------------------------------------------------------------
# Bad data


def test_bad_samples_are_reported_with_file_line_and_id_when_the_dataset_is_built(media, tiny, tmp_path):
    _, processor = tiny
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"id": "fine", "video": "v0.mp4", **conversation("Q", "A")},
            {"id": "missing", "video": "nowhere/gone.mp4", **conversation("Q", "A")},
            {"id": "no-answer", "video": "v0.mp4", "conversations": [{"role": "user", "content": "Q"}]},
            {"id": "empty", "video": "v0.mp4", "conversations": []},
            "{not json",
            "",
            {"id": "order", "conversations": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q"},
                                               {"role": "assistant", "content": "A"}]},
            {"id": "stray", **conversation("<video>Q", "A")},
            {"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}]},
        ],
    )
    with pytest.raises(DataFormatError) as caught:
        TimeViperSFTDataset(path, processor, video_root=media)
    message = str(caught.value)
    assert "7 problem(s)" in message
    assert f"{path}:2 (id 'missing'): video file not found: {media / 'nowhere/gone.mp4'}" in message
    assert f"{path}:3 (id 'no-answer'): the conversation has no assistant turn" in message
    assert f"{path}:4 (id 'empty'): the conversation is empty" in message
    assert f"{path}:5: not valid JSON" in message
    assert f"{path}:7 (id 'order'): turns must alternate user/assistant" in message
    assert f"{path}:8 (id 'stray'): the text contains <video>/<image> but the sample has no media" in message
    assert f"{path}:9: assistant turn 1 is empty" in message
    assert f"{path}:1 " not in message


def test_bad_data_stops_the_cli_before_training(media, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "video": "gone.mp4", **conversation("Q", "A")}])
    output = tmp_path / "out"
    with pytest.raises(DataFormatError, match=r"bad.jsonl:1 \(id 'x'\): video file not found"):
        train.main(["--tiny", "--data", str(path), "--video-root", str(media), "--output_dir", str(output)])
    assert not output.exists()


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"video": "v0.mp4", "start": 3, "end": 1, **conversation("Q", "A")}, "'start' (3) must be before 'end' (1)"),
        ({"video": "v0.mp4", "fps": 1, "num_frames": 2, **conversation("Q", "A")}, "mutually exclusive"),
        ({"video": "v0.mp4", "query": "q", "timestamps": [4, 2]}, "'timestamps' must be [start, end]"),
        ({"video": "v0.mp4", "query": "q", "timestamps": [1, 2], **conversation("Q", "A")}, "has no 'conversations'"),
        ({"image": "still.png", "video": "v0.mp4", **conversation("Q", "A")}, "either 'video' or 'image'"),
        ({"video": "v0.mp4", **conversation("<video>Q", "<video>A")}, "2 media placeholders"),
        ({"video": "v0.mp4", "caption": "x", **conversation("Q", "A")}, "unknown keys ['caption']"),
        ({"video": "v0.mp4"}, "no 'conversations'"),
    ],
)
def test_each_format_rule_has_a_clear_message(media, tmp_path, row, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataFormatError) as caught:
        load_samples(path, media)
    assert problem in str(caught.value) and f"{path}:1" in str(caught.value)


def test_an_unreadable_video_names_the_sample(tiny, tmp_path):
    _, processor = tiny
    (tmp_path / "broken.mp4").write_bytes(b"this is not a video" * 10)
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "broken", "video": "broken.mp4", **conversation("Q", "A")}])
    dataset = TimeViperSFTDataset(path, processor, video_root=tmp_path)
    with pytest.raises(SampleLoadError, match=r"d.jsonl:1 \(id 'broken'\): ValueError: Could not open video"):
        dataset[0]


def test_too_long_samples_are_rejected_with_a_hint(media, tiny, tmp_path):
    _, processor = tiny
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "long", "video": "v3.mp4", **conversation("Q", "A")}])
    dataset = TimeViperSFTDataset(path, processor, video_root=media, fps=4.0, max_length=40)
    with pytest.raises(SampleLoadError, match=r"\(id 'long'\): \d+ tokens \(20 frames\) exceed max_length=40"):
        dataset[0]
