"""Faults and bad input: nothing is lost, and nothing runs silently wrong. Each test fails without its fix."""

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from tiny_models import VIDEO_TOKEN_ID, tiny_model

from evaluation.tasks import parse_timestamps

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------------
# Non-finite pixel values


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixel_values_are_an_error_naming_the_input(bad):
    model = tiny_model()
    ids = torch.tensor([[5, 6] + [VIDEO_TOKEN_ID] * 8 + [7]])
    pixels = torch.zeros(2, 3, 28, 28)
    pixels[1, 0, 3, 4] = bad
    with pytest.raises(ValueError, match="pixel_values_videos holds 1 NaN/Inf"):
        model(input_ids=ids, pixel_values_videos=pixels)
    with pytest.raises(ValueError, match="pixel_values holds 1 NaN/Inf"):
        model.get_image_features(pixels[1:])


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: answer parsing


def test_grounding_parser_is_linear_in_the_output_length():
    """A run of 16k digits took 16 s with the old pattern (quadratic); linear parsing takes milliseconds."""
    for text in ("1" * 16_000, "1" * 16_000 + " to 5", "<answer>" * 16_000 + "3 to 4"):
        started = time.perf_counter()
        parse_timestamps(text)
        assert time.perf_counter() - started < 1.0, text[:20]
    assert parse_timestamps("<answer>x</answer> 1 to 2 <ANSWER>at 3.5 - 7 s</answer>") == (3.5, 7.0)
    assert parse_timestamps("from 0:05 to 1:02:03.5 seconds") == (5.0, 3723.5)


def test_concurrent_score_runs_into_one_folder_keep_every_metrics_entry(tmp_path, monkeypatch):
    """The first run is held between reading and writing metrics.json while a second run scores another name: with
    the lock the second waits and adds its entry to the first's; without it one of the two entries was lost."""
    import json
    import threading
    import types

    from evaluation import tasks

    for name in ("a", "b"):
        line = {"id": "1", "task": "mcq", "options": ["x", "y"], "answer": "A", "prediction": "A"}
        (tmp_path / f"{name}.shard0of1.jsonl").write_text(json.dumps(line) + "\n")
    first_has_read, second_done = threading.Event(), threading.Event()

    def dumps(value, **kwargs):
        if threading.current_thread().name == "first" and isinstance(value, dict) and "a" in value:
            first_has_read.set()
            second_done.wait(timeout=1.0)
        return json.dumps(value, **kwargs)

    monkeypatch.setattr(tasks, "json", types.SimpleNamespace(loads=json.loads, dumps=dumps))
    first = threading.Thread(target=tasks.score_output_dir, args=(tmp_path, "a", "mcq"), name="first")
    first.start()
    assert first_has_read.wait(timeout=30)
    second = threading.Thread(target=lambda: (tasks.score_output_dir(tmp_path, "b", "mcq"), second_done.set()))
    second.start()
    first.join(timeout=30)
    second.join(timeout=30)
    assert sorted(json.loads((tmp_path / "metrics.json").read_text())) == ["a", "b"]
    assert not list(tmp_path.glob("*.tmp"))


def test_invalid_utf8_is_reported_with_file_and_line(tmp_path):
    import json

    from evaluation.tasks import AnnotationError, load_annotations
    from training.data import DataFormatError, load_samples

    good = {"id": "1", "video": "v.mp4", "question": "q", "options": ["x", "y"], "answer": "A"}
    path = tmp_path / "bench.jsonl"
    path.write_bytes(json.dumps(good).encode() + b'\n{"id": "2", "question": "caf\xe9"}\n')
    with pytest.raises(AnnotationError, match=rf"{path}:2: not valid UTF-8 \(byte 0xe9"):
        load_annotations(path, "mcq", check_videos=False)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps({"conversations": turns}).encode() + b"\n\n" + b'{"id": "\xff"}\n')
    with pytest.raises(DataFormatError, match=rf"{path}:3: not valid UTF-8 \(byte 0xff"):
        load_samples(path)


# ---------------------------------------------------------------------------------------------------------------------
# Training: the source model and checkpoints


@pytest.mark.parametrize("inside", ["", "run"])
def test_training_refuses_an_output_dir_that_is_or_is_inside_the_model(tmp_path, capsys, inside):
    from training import train

    model = tmp_path / "model"
    model.mkdir()
    output = model / inside if inside else model
    with pytest.raises(SystemExit):
        train.parse_args(["--model", str(model), "--data", "x.jsonl", "--output_dir", str(output)])
    assert "the --model folder" in capsys.readouterr().err
    args, _ = train.parse_args(["--model", str(model), "--data", "x.jsonl", "--output_dir", str(tmp_path / "out")])
    assert args.model == str(model)


def test_resume_skips_half_written_checkpoints_and_names_them(tmp_path, caplog):
    """A kill during a checkpoint save leaves a folder without trainer_state.json (the Trainer writes it last) or with
    a cut-short one; `latest` must resume from the newest complete checkpoint and say which it skipped."""
    from transformers import TrainingArguments

    from training import train

    for step, state in ((2, '{"global_step": 2}'), (4, None), (6, '{"global_st'), (10, '{"global_step": 10}')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-10" / "trainer_state.json").unlink()
    args = TrainingArguments(output_dir=str(tmp_path), resume_from_checkpoint="latest", report_to="none")
    with caplog.at_level("WARNING", logger="timeviper.training"):
        assert train.resolve_resume(args) == str(tmp_path / "checkpoint-2")
    warning = caplog.text
    assert "checkpoint-10 (it has no trainer_state.json" in warning and "checkpoint-6 (its trainer_state.json is cut" in warning
    assert "checkpoint-4" in warning
    explicit = TrainingArguments(output_dir=str(tmp_path), resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    with pytest.raises(FileNotFoundError, match="checkpoint-6: its trainer_state.json is cut short"):
        train.resolve_resume(explicit)


# ---------------------------------------------------------------------------------------------------------------------
# timeviper.sh


def environment_stamp() -> str:
    """What timeviper.sh writes into the environment once it has installed this checkout."""
    import hashlib

    return hashlib.sha1(b"".join((REPO / name).read_bytes() for name in ("setup.cfg", "pyproject.toml", "timeviper.sh"))).hexdigest()


def test_timeviper_sh_keeps_the_callers_directory_for_relative_paths(tmp_path):
    """`./timeviper.sh ask --video clip.mp4` from the clip's folder found no clip: the script changed directory."""
    import subprocess
    import sys

    from inference.tiny_default import write_sample_video

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".timeviper-installed").write_text(environment_stamp() + "\n")
    work = tmp_path / "work"
    work.mkdir()
    write_sample_video(work / "clip.mp4", seconds=2)
    result = subprocess.run(
        [str(REPO / "timeviper.sh"), "ask", "--video", "clip.mp4", "--max-new-tokens", "2"], cwd=work,
        env={**os.environ, "TIMEVIPER_VENV": "../venv"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "[video] 2 frames sampled" in result.stdout


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python3 and the environment's python: logs each call, takes a while, and makes a venv on `-m venv`.
echo "start $*" >> "$FAKE_LOG"
sleep 0.3
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
echo "end $*" >> "$FAKE_LOG"
"""


def test_two_first_runs_of_timeviper_sh_install_once(tmp_path):
    """Two first runs at once both installed into the same .venv; with the lock the second waits and installs nothing."""
    import subprocess

    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "TIMEVIPER_VENV": str(tmp_path / "venv"), "PYTHON": str(fake), "FAKE_LOG": str(log)}
    runs = [
        subprocess.Popen([str(REPO / "timeviper.sh"), "python", "-c", f"run {i}"], env=env, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    assert all(run.wait(timeout=120) == 0 for run in runs), [run.stderr.read() for run in runs]
    calls = log.read_text().splitlines()
    assert sum(line == f"start -m venv {tmp_path / 'venv'}" for line in calls) == 1, calls
    install = [line for line in calls if "run " not in line]
    # the steps of one install, one after another: each start is followed by its own end
    assert all(start == "start " + end.removeprefix("end ") for start, end in zip(install[::2], install[1::2])), calls
    assert {line for line in calls if "run " in line} == {f"{edge} -c run {i}" for edge in ("start", "end") for i in range(2)}


# ---------------------------------------------------------------------------------------------------------------------
# Conversion: --force, kills, damaged sources


def converted_folder(path: Path, text: str = "old") -> Path:
    """A previous output of the converter (it carries the marker)."""
    from convert import common

    with common.atomic_output_dir(path) as folder:
        (folder / "config.json").write_text(text)
    return path


def test_force_replaces_only_a_previous_output_of_the_converter(tmp_path, monkeypatch):
    from convert import common
    from convert.common import ConversionError

    work = converted_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(converted_folder(tmp_path / "home")))
    for output, reason in (
        (Path("."), "it is the current directory"),
        (tmp_path, "it holds the current directory"),
        (Path.home(), "it is the home folder"),
    ):
        with pytest.raises(ConversionError, match=reason):
            common.check_output_available(output, force=True)
    checkout = converted_folder(tmp_path / "checkout")
    (checkout / ".git").mkdir()
    with pytest.raises(ConversionError, match="it is a git checkout"):
        common.check_output_available(checkout, force=True)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match=f"it has no {common.OUTPUT_MARKER}"):
        common.check_output_available(foreign, force=True)
    converted = converted_folder(tmp_path / "converted")
    (converted / "sub").mkdir()
    (converted / "sub" / "added.txt").write_text("mine")
    with pytest.raises(ConversionError, match=r"files the converter did not write: \['sub/added.txt'\]"):
        common.check_output_available(converted, force=True)
    (converted / "sub" / "added.txt").unlink()
    common.check_output_available(converted, force=True)
    assert (foreign / "notes.txt").read_text() == "keep me" and (checkout / ".git").is_dir()


KILLED_SWAP = """
import os, sys
from pathlib import Path
from convert import common

renames = []
def rename(source, target):
    renames.append(source)
    if len(renames) == 2:
        os._exit(9)  # killed after the old copy moved aside, before the new one moved in
    os.replace(source, target)

common.os.rename = rename
with common.atomic_output_dir(Path(sys.argv[1]), force=True) as folder:
    (folder / "config.json").write_text("new")
"""


def test_a_kill_during_the_force_swap_loses_nothing_and_the_next_run_recovers(tmp_path, caplog):
    import subprocess
    import sys

    from convert import common

    output = converted_folder(tmp_path / "out")
    killed = subprocess.run([sys.executable, "-c", KILLED_SWAP, str(output)], cwd=REPO, capture_output=True, timeout=120)
    assert killed.returncode == 9, killed.stderr
    assert not output.exists()
    assert [path.name.split("-")[0] for path in sorted(tmp_path.glob(".out.*-*"))] == [".out.partial", ".out.replaced"]
    with caplog.at_level("WARNING", logger="timeviper.convert"):
        with pytest.raises(common.ConversionError, match="already exists; pass --force"):
            common.check_output_available(output, force=False)
    assert (output / "config.json").read_text() == "old"
    assert "restored" in caplog.text and "deleting" in caplog.text and ".out.partial-" in caplog.text
    assert not list(tmp_path.glob(".out.*-*"))
    with common.atomic_output_dir(output, force=True) as folder:
        (folder / "config.json").write_text("new")
    assert (output / "config.json").read_text() == "new" and not list(tmp_path.glob(".out.*-*"))


@pytest.mark.parametrize("dtype, value, cause", [
    (torch.float32, float("nan"), "in the source"),
    (torch.bfloat16, float("-inf"), "in the source"),
    (torch.float16, 1e6, "from the cast to float16"),
])
def test_non_finite_weights_stop_the_conversion_naming_the_tensor(tmp_path, dtype, value, cause):
    from convert import common
    from convert.common import ConversionError, ConversionPlan

    bad = torch.ones(8, 8)
    bad[2, 3] = value
    plan = ConversionPlan()
    plan.add("model.a.weight", (8, 8), lambda: torch.ones(8, 8), ["src:a"])
    plan.add("model.b.weight", (8, 8), lambda: bad, ["src:b"])
    with pytest.raises(ConversionError, match=rf"model.b.weight: 1 of 64 values are NaN or Inf {cause}.*src:b"):
        common.write_safetensors_shards(plan, tmp_path, dtype, 10**9, progress=False)


def test_truncated_or_corrupt_checkpoint_files_are_named(tmp_path):
    from safetensors.torch import save_file

    from convert.common import ConversionError, open_tensor_source

    folder = tmp_path / "llm"
    folder.mkdir()
    save_file({"a": torch.ones(64, 64)}, folder / "model-00001-of-00002.safetensors")
    save_file({"b": torch.ones(64, 64)}, folder / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(__import__("json").dumps(index))
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ConversionError, match="model-00002-of-00002.safetensors is not a readable safetensors file"):
        open_tensor_source(folder)
    torch.save({"a": torch.ones(64, 64)}, tmp_path / "ckpt.bin")
    (tmp_path / "ckpt.bin").write_bytes((tmp_path / "ckpt.bin").read_bytes()[:300])
    with pytest.raises(ConversionError, match="ckpt.bin is not a readable checkpoint"):
        open_tensor_source(tmp_path / "ckpt.bin")


# ---------------------------------------------------------------------------------------------------------------------
# Inference and evaluation: checkpoints that do not hold the model's weights


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    """The tiny default model saved in six shards, with its processor and remote code."""
    from inference.tiny_default import build_tiny_default
    from timeviper.configuration_timeviper import TimeViperConfig
    from timeviper.modeling_timeviper import TimeViperForConditionalGeneration
    from timeviper.processing_timeviper import TimeViperProcessor

    folder = tmp_path_factory.mktemp("sharded")
    model, processor = build_tiny_default(token_compression="uni_1_0.5-attn_2_0.25")
    TimeViperConfig.register_for_auto_class()
    TimeViperForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    TimeViperProcessor.register_for_auto_class()
    model.save_pretrained(folder, max_shard_size="100KB")
    processor.save_pretrained(folder)
    return folder


def edited_copy(source: Path, target: Path, edit) -> Path:
    import json
    import shutil

    shutil.copytree(source, target)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    edit(index["weight_map"])
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    return target


def shard_names(weight_map) -> list[str]:
    """The checkpoint's shard files in order (how many depends on the tiny model's size)."""
    return sorted(set(weight_map.values()))


def drop_shard(weight_map):
    dropped = shard_names(weight_map)[2]
    for key in [key for key, shard in weight_map.items() if shard == dropped]:
        del weight_map[key]


def redirect_shard(weight_map):
    dropped, target = shard_names(weight_map)[2:4]
    for key in [key for key, shard in weight_map.items() if shard == dropped]:
        weight_map[key] = target


@pytest.mark.parametrize("edit, problem", [
    (drop_shard, "{2} is in the folder, but the index assigns no tensor to it"),
    (redirect_shard, r"{3} does not hold model\.language_model\.layers\."),
])
def test_ask_and_evaluation_refuse_an_index_that_drops_or_redirects_a_shard(sharded_checkpoint, tmp_path, edit, problem):
    """transformers only warned and filled the shard's tensors with random values; the model generated noise."""
    import json
    import subprocess
    import sys

    from inference.checkpoint import CheckpointError, load_checkpoint

    shards = shard_names(json.loads((sharded_checkpoint / "model.safetensors.index.json").read_text())["weight_map"])
    problem = problem.format(*[re.escape(name) for name in shards])
    folder = edited_copy(sharded_checkpoint, tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError, match=problem):
        load_checkpoint(str(folder), torch.float32)
    ask = subprocess.run(
        [sys.executable, "-m", "inference.ask", "--model", str(folder), "--max-new-tokens", "1"], cwd=REPO,
        capture_output=True, text=True, timeout=300,
    )
    assert ask.returncode != 0 and "does not match the shards" in ask.stderr and shards[2] in ask.stderr
    from evaluation import run_eval

    (tmp_path / "a.mp4").write_bytes(b"")
    item = {"id": "q", "video": "a.mp4", "question": "?", "options": ["x", "y"], "answer": "A"}
    (tmp_path / "mcq.jsonl").write_text(json.dumps(item) + "\n")
    code = run_eval.main(["--model", str(folder), "--task", "mcq", "--annotations", str(tmp_path / "mcq.jsonl"),
                          "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--dtype", "float32"])
    assert code == 2 and not (tmp_path / "out" / "mcq.shard0of1.jsonl").exists()


def test_a_truncated_shard_is_named_when_loading_for_inference_or_training(sharded_checkpoint, tmp_path):
    import shutil

    from inference.checkpoint import CheckpointError, load_checkpoint
    from training import train

    folder = tmp_path / "ckpt"
    shutil.copytree(sharded_checkpoint, folder)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-64])
    problem = f"{re.escape(shard.name)} is not a readable safetensors file"
    with pytest.raises(CheckpointError, match=problem):
        load_checkpoint(str(folder), torch.float32)
    with pytest.raises(CheckpointError, match=problem):
        train.build_from_checkpoint(train.TimeViperArguments(model=str(folder)))


def test_checkpoint_missing_tensors_are_named_after_loading(sharded_checkpoint, tmp_path):
    """An index and shards that agree but lack tensors (here: a whole shard and its index entries removed)."""
    from inference.checkpoint import CheckpointError, load_checkpoint

    folder = edited_copy(sharded_checkpoint, tmp_path / "ckpt", drop_shard)
    (sorted(folder.glob("model-*.safetensors"))[2]).unlink()
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(they would be random\): model\.language_model"):
        load_checkpoint(str(folder), torch.float32)



def test_transv_stages_added_by_an_override_load_with_a_closed_gate(tmp_path):
    """`ask --token-compression` on a checkpoint without TransV: its modules are missing whole, gate included, so the
    gate stays 0 and they only drop tokens; that is no error. A missing module whose gate is open would be, and so
    would a module that lost only its gate (its trained projections would run behind a closed gate)."""
    from tiny_models import open_transfer_gates, transfer_gates

    from inference.checkpoint import CheckpointError, check_loading_info, load_checkpoint
    from inference.tiny_default import build_tiny_default
    from timeviper.configuration_timeviper import TimeViperConfig
    from timeviper.modeling_timeviper import TimeViperForConditionalGeneration

    model, _ = build_tiny_default(token_compression=None)
    TimeViperConfig.register_for_auto_class()
    TimeViperForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    model.save_pretrained(tmp_path)
    loaded = load_checkpoint(str(tmp_path), torch.float32, token_compression="uni_1_0.5")
    assert not any(gate.detach().any() for gate in transfer_gates(loaded))
    only_gate = {"missing_keys": {"model.language_model.merge_modules.0.alpha"}, "mismatched_keys": set(), "error_msgs": []}
    with pytest.raises(CheckpointError, match=r"merge_modules\.0\.alpha"):
        check_loading_info(loaded, only_gate, str(tmp_path))
    open_transfer_gates(loaded, 0.5)
    info = {"missing_keys": {"model.language_model.merge_modules.0.q_proj.weight"}, "mismatched_keys": set(), "error_msgs": []}
    with pytest.raises(CheckpointError, match="merge_modules.0.q_proj.weight"):
        check_loading_info(loaded, info, str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# Training data: bad samples are found before step 1


@pytest.fixture
def mixed_data(tmp_path):
    """Five samples: lines 1 and 5 good, 2 a zero-frame video, 3 a text file named .mp4, 4 too long for max_length=200."""
    import json

    from tiny_assets import write_empty_video, write_test_video

    write_test_video(tmp_path / "good.mp4", num_frames=24, fps=12, size=(32, 32))
    write_empty_video(tmp_path / "empty.mp4")
    (tmp_path / "notes.mp4").write_text("not a video")
    lines = []
    for video, answer in (("good.mp4", "Red."), ("empty.mp4", "x"), ("notes.mp4", "x"), ("good.mp4", "long " * 200),
                          ("good.mp4", "Blue.")):
        turns = [{"role": "user", "content": "What is shown?"}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"video": video, "conversations": turns}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_preflight_reports_every_bad_sample_with_its_line_before_training(mixed_data):
    """They crashed training at their step; now one error lists them before step 1 (or, tolerant, they are dropped)."""
    from inference.tiny_default import build_tiny_default
    from training import train
    from training.data import DataFormatError, TimeViperSFTDataset

    data = str(mixed_data / "train.jsonl")
    steps = []

    class CountSteps(__import__("transformers").TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            steps.append(1)

    argv = ["--tiny", "--data", data, "--video-root", str(mixed_data), "--output_dir", str(mixed_data / "out"),
            "--max_length", "200", "--fps", "2", "--max_frames", "4", "--max_steps", "1", "--report_to", "none",
            "--per_device_train_batch_size", "2", "--save_strategy", "no", "--dataloader_num_workers", "0"]
    with pytest.raises(DataFormatError) as error:
        train.main(argv, callbacks=[CountSteps()])
    message = str(error.value)
    assert message.startswith("3 sample(s) cannot be trained on") and not steps
    assert f"{data}:2: ValueError: Video '{mixed_data / 'empty.mp4'}'" in message  # the decoder's own words
    assert f"{data}:3: ValueError: Could not open video" in message
    assert f"{data}:4: " in message and "exceed max_length=200" in message
    train.main([*argv, "--skip_bad_samples", "true"], callbacks=[CountSteps()])
    assert steps == [1]

    _, processor = build_tiny_default()
    dataset = TimeViperSFTDataset(data, processor, video_root=mixed_data, fps=2, max_frames=4)
    assert len(dataset.preflight(skip_bad_samples=True)) == 2 and len(dataset) == 3
    for index, sample in enumerate(dataset.samples):  # the measured length is the length training sees
        assert dataset.measure(sample, *dataset.probe_media(sample)) == len(dataset[index]["input_ids"])
