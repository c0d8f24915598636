"""TimeViperProcessor: chat templates, placeholder expansion, labels, padding, and the Hub round trip.

Oracles: hand-written expected strings of the reference's templates and a short transcription of the reference's
`Conversation.get_prompt` (timeviper/data/conversation.py) kept below; labels follow the reference's `_create_labels`.
"""

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from timeviper.processing_timeviper import (
    MCQ_ANSWER_PROMPT,
    TimeViperImageProcessor,
    TimeViperProcessor,
    TimeViperVideoProcessor,
    build_labels,
    get_chat_template,
    grounding_preamble,
    mcq_prompt,
)
from tiny_assets import make_frame, make_tiny_tokenizer, write_test_video


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = {"height": 28, "width": 28}
TOKENS_PER_FRAME = 4


def make_processor(backbone="nemotron_h", **kwargs):
    return TimeViperProcessor(
        video_processor=TimeViperVideoProcessor(size=SIZE),
        tokenizer=make_tiny_tokenizer(backbone),
        chat_template=get_chat_template(backbone),
        tokens_per_frame=TOKENS_PER_FRAME,
        **kwargs,
    )


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    """12 s at 25 fps (300 colour-coded frames), keyframe every 20 frames."""
    path = tmp_path_factory.mktemp("videos") / "clip.mp4"
    return str(write_test_video(path, num_frames=300, fps=25, size=(32, 32), keyint=20))


def frames(n, start=0):
    return np.stack([make_frame(start + i, (32, 24)) for i in range(n)])


def user(*items):
    return {"role": "user", "content": list(items)}


def text(value):
    return {"type": "text", "text": value}


VIDEO = {"type": "video"}


# ----------------------------------------------------------------------------------------------------------------
# Chat templates
# ----------------------------------------------------------------------------------------------------------------


def reference_get_prompt(style, messages):
    """Transcription of the reference `Conversation.get_prompt` for `nano_base` and `qwen2` (message None = the
    generation slot). Placeholders are already in the message strings."""
    if style == "nemotron_h":
        out = "<SPECIAL_10>System\n<SPECIAL_12>\n"
        for role, message in messages:
            header = "User\n" if role == "user" else "Assistant\n"
            out += f"<SPECIAL_11>{header}{message}\n<SPECIAL_12>" if message else f"<SPECIAL_11>{header}"
        return out
    out = "<|im_start|>system\nYou are a helpful assistant." + "<|im_end|>" + "\n"
    for i, (role, message) in enumerate(messages):
        header = f"<|im_start|>{role}\n"
        if message:
            out += header + message + "<|im_end|>" + ("" if i == len(messages) - 1 else "\n")
        else:
            out += header
    return out


def test_nemotron_h_template_exact_strings():
    processor = make_processor("nemotron_h")
    conversation = [user(VIDEO, text("What happens?"))]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        "<SPECIAL_10>System\n<SPECIAL_12>\n<SPECIAL_11>User\n<video>What happens?\n<SPECIAL_12>"
        "<SPECIAL_11>Assistant\n"
    )
    conversation += [{"role": "assistant", "content": "A dog runs."}]
    assert processor.apply_chat_template(conversation) == (
        "<SPECIAL_10>System\n<SPECIAL_12>\n<SPECIAL_11>User\n<video>What happens?\n<SPECIAL_12>"
        "<SPECIAL_11>Assistant\nA dog runs.\n<SPECIAL_12>"
    )
    with_system = [{"role": "system", "content": "Be brief."}] + conversation
    rendered = processor.apply_chat_template(with_system)
    assert rendered.startswith("<SPECIAL_10>System\nBe brief.<SPECIAL_12>\n<SPECIAL_11>")


def test_qwen2_template_exact_strings():
    processor = make_processor("qwen2")
    conversation = [user(VIDEO, text("What happens?"))]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<video>What happens?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    conversation += [{"role": "assistant", "content": [text("A dog runs.")]}]
    assert processor.apply_chat_template(conversation) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<video>What happens?"
        "<|im_end|>\n<|im_start|>assistant\nA dog runs.<|im_end|>"
    )
    with_system = [{"role": "system", "content": "Be brief."}] + conversation
    assert processor.apply_chat_template(with_system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
def test_templates_match_reference_transcription(backbone):
    processor = make_processor(backbone)
    turns = [
        ("user", "<video>Q1 with\nnewline"),
        ("assistant", "A1"),
        ("user", "Q2"),
        ("assistant", "A2 ends."),
    ]
    messages = [
        user(VIDEO, text("Q1 with\nnewline")),
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2 ends."},
    ]
    assert processor.apply_chat_template(messages) == reference_get_prompt(backbone, turns)
    assert processor.apply_chat_template(messages[:3], add_generation_prompt=True) == reference_get_prompt(
        backbone, turns[:3] + [("assistant", None)]
    )


@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
def test_mcq_answer_prompt_continues_assistant_turn(backbone):
    processor = make_processor(backbone)
    question = mcq_prompt("What colour is the car?", ["red", "blue"])
    conversation = [user(VIDEO, text(question)), {"role": "assistant", "content": MCQ_ANSWER_PROMPT}]
    rendered = processor.apply_chat_template(conversation, continue_final_message=True)
    expected = processor.apply_chat_template(conversation[:1], add_generation_prompt=True) + MCQ_ANSWER_PROMPT
    assert rendered == expected


def test_mcq_prompt_and_grounding_preamble():
    assert mcq_prompt("Q?", ["red", "blue"]) == (
        "Q?\nA. red\nB. blue\nPlease provide your answer by stating the letter followed by the full option."
    )
    assert mcq_prompt("Q?", ["A. red", "B. blue"]) == mcq_prompt("Q?", ["red", "blue"])  # VideoMME style kept
    assert MCQ_ANSWER_PROMPT == "Best Option: ("
    assert grounding_preamble(150.5, 32) == (
        "The video lasts for 150.5 seconds, and 32 frames are uniformly sampled from it."
    )
    assert grounding_preamble(12, 8) == "The video lasts for 12 seconds, and 8 frames are uniformly sampled from it."


# ----------------------------------------------------------------------------------------------------------------
# Placeholder expansion and tokenisation
# ----------------------------------------------------------------------------------------------------------------


def test_placeholder_expansion_counts():
    processor = make_processor()
    tokenizer = processor.tokenizer
    images = [PIL.Image.fromarray(make_frame(i, (20, 20))) for i in range(2)]
    out = processor(
        text="<video>first <image> then <video> and <image>",
        videos=[frames(3), frames(5, start=10)],
        images=images,
        return_tensors="pt",
    )
    ids = out["input_ids"][0].tolist()
    video_id, image_id = processor.video_token_id, processor.image_token_id
    assert ids.count(video_id) == (3 + 5) * TOKENS_PER_FRAME
    assert ids.count(image_id) == 2 * TOKENS_PER_FRAME
    assert out["pixel_values_videos"].shape == (8, 3, 28, 28)
    assert out["pixel_values"].shape == (2, 3, 28, 28)
    expected = (
        "<video>" * (3 * TOKENS_PER_FRAME) + "first " + "<image>" * TOKENS_PER_FRAME + " then "
        + "<video>" * (5 * TOKENS_PER_FRAME) + " and " + "<image>" * TOKENS_PER_FRAME
    )
    assert tokenizer.decode(ids) == expected
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values_videos", "pixel_values"}


def test_no_bos_and_plain_text():
    processor = make_processor()
    out = processor(text=processor.apply_chat_template([user(text("hi"))], add_generation_prompt=True))
    assert out["input_ids"][0][0] == processor.tokenizer.convert_tokens_to_ids("<SPECIAL_10>")
    assert "token_type_ids" not in out


def test_videos_across_batch_in_order(video_path):
    processor = make_processor()
    out = processor(
        text=["<video>a", "b<video>", "<video><video>c"],
        videos=[[frames(2)], [{"path": video_path, "num_frames": 3}], [frames(1), frames(4)]],
        num_frames=None,
        return_metadata=True,
    )
    assert out["video_num_frames"].tolist() == [2, 3, 1, 4]
    counts = [row.count(processor.video_token_id) for row in out["input_ids"]]
    assert counts == [2 * TOKENS_PER_FRAME, 3 * TOKENS_PER_FRAME, 5 * TOKENS_PER_FRAME]
    assert [m.frames_indices for m in out["video_metadata"]][1] == [50, 150, 250]


@pytest.mark.parametrize(
    "text_input, num_videos, message",
    [
        ("<video><video>two placeholders", 1, "2 <video> placeholder"),
        ("no placeholder", 1, "0 <video> placeholder"),
        ("<video>one", 2, "1 <video> placeholder"),
    ],
)
def test_placeholder_count_mismatch(text_input, num_videos, message):
    processor = make_processor()
    with pytest.raises(ValueError, match=message):
        processor(text=text_input, videos=[frames(2)] * num_videos)


def test_image_count_mismatch_and_placeholder_without_media():
    processor = make_processor()
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        processor(text="<image>", images=[make_frame(0), make_frame(1)])
    with pytest.raises(ValueError, match="0 video"):
        processor(text="<video> but nothing given")


def test_truncation_cutting_placeholders_raises():
    processor = make_processor()
    with pytest.raises(ValueError, match="truncation"):
        processor(text="<video>describe", videos=frames(4), truncation=True, max_length=8)


def test_tokenizer_without_placeholder_token():
    with pytest.raises(ValueError, match="<clip>"):
        TimeViperProcessor(tokenizer=make_tiny_tokenizer(), video_token="<clip>")


def test_unknown_kwarg_raises():
    processor = make_processor()
    with pytest.raises(TypeError, match="num_frame"):
        processor(text="<video>", videos=frames(2), num_frame=2)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_sides(side):
    processor = make_processor()
    pad_id = processor.tokenizer.pad_token_id
    out = processor(text=["<video>x", "<video>a longer text"], videos=[frames(1), frames(1)], padding=True,
                    padding_side=side, return_tensors="pt")
    short = len(processor.tokenizer("x", add_special_tokens=False)["input_ids"]) + TOKENS_PER_FRAME
    long = out["input_ids"].shape[1]
    assert out["attention_mask"][0].sum() == short and out["attention_mask"][1].sum() == long
    pads = out["input_ids"][0][:long - short] if side == "left" else out["input_ids"][0][short:]
    assert torch.all(pads == pad_id)
    mask = out["attention_mask"][0]
    assert torch.all(mask[:long - short] == 0) if side == "left" else torch.all(mask[short:] == 0)
    assert out["input_ids"].dtype == torch.long


# ----------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------


def test_build_labels_pure_function():
    sep = 5
    ids = [0, 0, 9, sep, 1, 2, sep, 3, 4, sep, 6, sep, 7, sep]
    mask = [0, 0] + [1] * 12
    labels = build_labels(ids, sep, attention_mask=mask, ignore_ids=(4,))
    # separators at 3, 6, 9, 11, 13: supervise (6, 9] and (11, 13]; token 4 ignored.
    assert labels == [-100] * 7 + [3, -100, sep] + [-100, -100] + [7, sep]
    batched = build_labels(torch.tensor([ids, ids]), sep)
    assert batched.shape == (2, 14) and batched.dtype == torch.long


def supervised_text(processor, input_ids, labels):
    return processor.tokenizer.decode([t for t, l in zip(input_ids, labels) if l != -100])


@pytest.mark.parametrize(
    "backbone, expected",
    [
        ("nemotron_h", "<SPECIAL_11>Assistant\nA1\n<SPECIAL_12><SPECIAL_11>Assistant\nA2\n<SPECIAL_12>"),
        ("qwen2", "\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>"),
    ],
)
def test_labels_supervise_assistant_turns_only(backbone, expected):
    processor = make_processor(backbone)
    conversation = [
        user({"type": "video", "video": frames(2)}, text("Q1")),
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_labels=True)
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert len(ids) == len(labels)
    assert supervised_text(processor, ids, labels) == expected
    # Each supervised span is contiguous and placeholders are never supervised.
    assert all(l == -100 for t, l in zip(ids, labels) if t == processor.video_token_id)
    assert all(l in (-100, t) for t, l in zip(ids, labels))


@pytest.mark.parametrize("side", ["left", "right"])
def test_labels_with_padding(side):
    processor = make_processor("qwen2")
    conversations = [
        [user({"type": "video", "video": frames(1)}, text("Q")), {"role": "assistant", "content": "Short."}],
        [user({"type": "video", "video": frames(3)}, text("Q")), {"role": "assistant", "content": "Much longer."}],
    ]
    out = processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_labels=True,
                                        padding=True, padding_side=side, return_tensors="pt")
    labels, mask = out["labels"], out["attention_mask"]
    assert labels.shape == out["input_ids"].shape
    assert torch.all(labels[mask == 0] == -100)
    assert supervised_text(processor, out["input_ids"][0].tolist(), labels[0].tolist()) == (
        "\n<|im_start|>assistant\nShort.<|im_end|>"
    )
    first_real = int(mask[0].nonzero()[0])
    assert (first_real > 0) == (side == "left")


def test_labels_need_an_assistant_turn():
    processor = make_processor()
    with pytest.raises(ValueError, match="no complete assistant turn"):
        processor.apply_chat_template([user(text("Q"))], add_generation_prompt=True, tokenize=True,
                                      return_dict=True, return_labels=True)


def test_labels_reject_text_without_system_turn():
    processor = make_processor()
    with pytest.raises(ValueError, match="assistant header"):
        processor(
            text="<SPECIAL_11>User\nQ\n<SPECIAL_12><SPECIAL_11>Assistant\nA\n<SPECIAL_12>"
            "<SPECIAL_11>User\nQ2\n<SPECIAL_12>",
            return_labels=True,
        )


# ----------------------------------------------------------------------------------------------------------------
# apply_chat_template with videos
# ----------------------------------------------------------------------------------------------------------------


def test_apply_chat_template_loads_videos_with_item_options(video_path):
    processor = make_processor()
    conversation = [
        user(
            {"type": "video", "path": video_path, "fps": 0.5},
            {"type": "video", "url": video_path, "num_frames": 3, "start": 2.0, "end": 6.0},
            text("Compare."),
        )
    ]
    out = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt", processor_kwargs={"return_metadata": True})
    assert out["video_num_frames"].tolist() == [6, 3]
    assert out["video_metadata"][0].frames_indices == list(range(0, 300, 50))
    assert out["video_metadata"][1].frames_indices == [66, 99, 133]  # window [50, 150): 50 + [16, 49, 83]
    assert out["pixel_values_videos"].shape == (9, 3, 28, 28)
    assert int((out["input_ids"] == processor.video_token_id).sum()) == 9 * TOKENS_PER_FRAME
    # Call-level options reach items without their own; ids only without return_dict.
    ids = processor.apply_chat_template([user({"type": "video", "path": video_path}, text("Hi"))], tokenize=True,
                                        add_generation_prompt=True, num_frames=2)
    assert ids[0].count(processor.video_token_id) == 2 * TOKENS_PER_FRAME


class ChatObject:
    """A conversation as an object with `.messages`, which transformers 5.25 batches like a list of messages."""

    def __init__(self, *messages):
        self.messages = list(messages)


def test_batch_is_what_the_installed_transformers_batches():
    """Tokenizing follows the base class's batching rule (it changed within the supported releases), so a batch
    of conversation objects gives one row each, with each row's own frames."""
    processor = make_processor("qwen2")
    batch = [ChatObject(user({"type": "video", "video": frames(n)}, text("Q"))) for n in (1, 3)]
    prompts = processor.apply_chat_template(batch, add_generation_prompt=True)
    if not isinstance(prompts, list):  # an older release renders such a list as one conversation
        pytest.skip("the installed transformers does not batch conversation objects")
    out = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert [row.count(processor.video_token_id) for row in out["input_ids"]] == [1 * TOKENS_PER_FRAME,
                                                                                  3 * TOKENS_PER_FRAME]


def test_apply_chat_template_images():
    processor = make_processor("qwen2")
    conversation = [user({"type": "image", "image": PIL.Image.fromarray(make_frame(3, (16, 16)))}, text("What?"))]
    out = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert out["pixel_values"].shape == (1, 3, 28, 28)
    assert out["input_ids"][0].count(processor.image_token_id) == TOKENS_PER_FRAME


def test_image_paths_reach_the_image_processor(tmp_path):
    processor = make_processor()
    path = tmp_path / "frame.png"
    PIL.Image.fromarray(make_frame(3, (16, 16))).save(path)
    out = processor(text=["<image>a", "<image>b"], images=[path, str(path)], return_tensors="pt")
    assert out["pixel_values"].shape == (2, 3, 28, 28)
    assert torch.equal(out["pixel_values"][0], out["pixel_values"][1])
    with pytest.raises(ValueError, match="no_such_image.png"):
        processor(text="<image>", images=str(tmp_path / "no_such_image.png"))


def test_batch_decode_passes_through():
    processor = make_processor()
    ids = processor(text=["hello", "<SPECIAL_11>x"])["input_ids"]
    assert processor.batch_decode(ids) == processor.tokenizer.batch_decode(ids) == ["hello", "<SPECIAL_11>x"]
    assert processor.batch_decode(ids, skip_special_tokens=True)[1] == "x"


def test_tokens_per_frame_must_match_the_model_config():
    processor = make_processor()
    processor.check_model_config(SimpleNamespace(vision_tokens_per_frame=TOKENS_PER_FRAME, projector_type="tome_mlp"))
    with pytest.raises(ValueError, match="expands each frame into 4 placeholder tokens, but the model embeds 16"):
        processor.check_model_config(SimpleNamespace(vision_tokens_per_frame=16, projector_type="tome_mlp"))


def test_default_processor_components():
    processor = TimeViperProcessor(tokenizer=make_tiny_tokenizer(), chat_template=get_chat_template("nemotron_h"))
    assert isinstance(processor.video_processor, TimeViperVideoProcessor)
    assert isinstance(processor.image_processor, TimeViperImageProcessor)
    assert processor.tokens_per_frame == 16 and processor.turn_separator == "<SPECIAL_12>"
    assert processor.video_processor.fps == 1.0 and processor.video_processor.max_frames == 256


# ----------------------------------------------------------------------------------------------------------------
# Hub round trip
# ----------------------------------------------------------------------------------------------------------------


def test_remote_code_imports_are_guarded():
    """transformers' check_imports treats unguarded imports as required; PyAV must stay optional."""
    from transformers.dynamic_module_utils import check_imports, get_imports

    for name in ("processing_timeviper.py", "video_processing_timeviper.py"):
        path = os.path.join(REPO_ROOT, name)
        assert "av" not in get_imports(path)
        check_imports(path)
    # Importing registers nothing (checked in a fresh process: other tests register classes on purpose).
    probe = "import timeviper.processing_timeviper as p; print(p.TimeViperProcessor._auto_class, p.TimeViperVideoProcessor._auto_class)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "None"]


LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoProcessor
    folder, video = sys.argv[1], sys.argv[2]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    conversation = [
        {"role": "user",
         "content": [{"type": "video", "path": video, "num_frames": 3}, {"type": "text", "text": "Q"}]},
        {"role": "assistant", "content": "A"},
    ]
    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_labels=True)
    print(json.dumps({
        "classes": [type(processor).__name__, type(processor.video_processor).__name__,
                    type(processor.image_processor).__name__],
        "module": type(processor).__module__,
        "tokens_per_frame": processor.tokens_per_frame,
        "fps": processor.video_processor.fps,
        "input_ids": out["input_ids"], "labels": out["labels"],
        "pixels_sum": float(out["pixel_values_videos"].sum()),
        "pixels_shape": list(out["pixel_values_videos"].shape),
    }))
    """
)


@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
def test_save_and_load_with_auto_processor(tmp_path, video_path, backbone):
    processor = TimeViperProcessor(
        video_processor=TimeViperVideoProcessor(size=SIZE, fps=2.0),
        tokenizer=make_tiny_tokenizer(backbone),
        chat_template=get_chat_template(backbone),
        tokens_per_frame=3,
    )
    folder = tmp_path / "checkpoint"
    try:  # save_pretrained alone registers the classes and writes the remote code next to the files
        processor.save_pretrained(folder)
    finally:  # class-level registration must not leak into other tests
        for cls in (TimeViperProcessor, TimeViperVideoProcessor, TimeViperImageProcessor):
            cls._auto_class = None
    assert (folder / "chat_template.jinja").read_text() == get_chat_template(backbone)
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_timeviper.TimeViperProcessor"

    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = ""  # the fresh process must load our code from the checkpoint folder
    result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(folder), video_path], capture_output=True,
                            text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["classes"] == ["TimeViperProcessor", "TimeViperVideoProcessor", "TimeViperImageProcessor"]
    assert loaded["module"].startswith("transformers_modules.")
    assert loaded["tokens_per_frame"] == 3 and loaded["fps"] == 2.0

    conversation = [user({"type": "video", "path": video_path, "num_frames": 3}, text("Q")),
                    {"role": "assistant", "content": "A"}]
    expected = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_labels=True)
    assert loaded["input_ids"] == expected["input_ids"]
    assert loaded["labels"] == expected["labels"]
    assert loaded["pixels_shape"] == [3, 3, 28, 28]
    assert loaded["pixels_sum"] == pytest.approx(float(expected["pixel_values_videos"].sum()), rel=1e-6)
