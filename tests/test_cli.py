"""The README's main job end to end: the ask CLI (tiny default and a saved checkpoint), batched chat-template
inputs, and the evaluation harness on a real (tiny) checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference.tiny_default import build_tiny_default, write_sample_video

REPO = Path(__file__).resolve().parents[1]


def run_module(*args, timeout=300):
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from timeviper.configuration_timeviper import TimeViperConfig
    from timeviper.modeling_timeviper import TimeViperForConditionalGeneration
    from timeviper.processing_timeviper import TimeViperProcessor

    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    model, processor = build_tiny_default(token_compression="uni_1_0.5-attn_2_0.25")
    TimeViperConfig.register_for_auto_class()
    TimeViperForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    TimeViperProcessor.register_for_auto_class()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_ask_with_the_tiny_random_model():
    out = run_module("inference.ask", "--model", "random-tiny", "--max-new-tokens", "4")
    assert "TINY RANDOM-WEIGHT model" in out
    assert "[video] 12 frames sampled from 12.0 s" in out
    assert "[tokens] 48 vision + " in out
    assert "[answer]" in out and "[time]" in out


def test_ask_with_a_saved_checkpoint_and_compression_override(tiny_checkpoint, tmp_path):
    video = write_sample_video(tmp_path / "clip.mp4", seconds=6)
    out = run_module(
        "inference.ask", "--model", str(tiny_checkpoint), "--video", str(video), "--question", "What moves?",
        "--fps", "2", "--max-frames", "8", "--token-compression", "unidrop_1_0.5", "--max-new-tokens", "3",
    )
    assert "[video] 8 frames sampled from 6.0 s" in out
    assert "before block 1: uniform keeps 16 vision tokens (drop)" in out


def test_ask_reports_a_missing_video(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "inference.ask", "--video", str(tmp_path / "nope.mp4")], cwd=REPO,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "video file not found" in result.stderr


@pytest.mark.numerics
def test_batched_chat_inputs_generate_like_single_samples(tmp_path):
    model, processor = build_tiny_default(token_compression="uni_1_0.5-attn_2_0.25")
    clips = [write_sample_video(tmp_path / f"{i}.mp4", seconds=s) for i, s in enumerate((4, 7))]
    conversations = [
        [{"role": "user", "content": [{"type": "video", "path": str(clip)}, {"type": "text", "text": question}]}]
        for clip, question in zip(clips, ["Where is the square?", "Describe the colours, please."])
    ]

    def generate(batch):
        inputs = processor.apply_chat_template(
            batch, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "left"},
        )
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=None)
        return out[:, inputs["input_ids"].shape[1] :]

    singles = torch.cat([generate([conversation]) for conversation in conversations])
    assert torch.equal(generate(conversations), singles)


def test_evaluation_harness_runs_a_real_checkpoint(tiny_checkpoint, tmp_path):
    write_sample_video(tmp_path / "a.mp4", seconds=5)
    items = [
        {"id": f"q{i}", "video": "a.mp4", "question": "Which colour is the square?", "options": ["red", "blue", "green"], "answer": "A"}
        for i in range(2)
    ]
    annotations = tmp_path / "mcq.jsonl"
    annotations.write_text("".join(json.dumps(item) + "\n" for item in items))
    run_module(
        "evaluation.run_eval", "--model", str(tiny_checkpoint), "--task", "mcq", "--annotations", str(annotations),
        "--video-root", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--max-new-tokens", "2",
        "--min-frames", "4", "--max-frames", "4", "--device", "cpu", "--dtype", "float32",
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    (result,) = metrics.values()
    assert result["total"] == 2


def test_ask_several_questions_answers_each_as_asked_alone(tmp_path, capsys):
    """One video, two --question flags: the video state is built once and each answer equals a run of its own."""
    from inference.ask import main

    video = str(write_sample_video(tmp_path / "clip.mp4", seconds=5))
    common = ["--video", video, "--max-new-tokens", "6", "--device", "cpu", "--token-compression",
              "uni_1_0.5-attn_2_0.25"]
    questions = ["What moves?", "Which colour is the square at the end of the clip?"]

    def answers(out):
        return [line for line in out.splitlines() if line.startswith("[answer]")]

    main([*common, "--question", questions[0], "--question", questions[1]])
    together = capsys.readouterr().out
    assert together.count("[state] video prefilled once") == 1
    alone = []
    for question in questions:
        main([*common, "--question", question])
        alone += answers(capsys.readouterr().out)
    assert answers(together) == alone and len(alone) == 2
