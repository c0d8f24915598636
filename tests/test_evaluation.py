"""Tests of the evaluation harness (evaluation/): prompts, parsing, metrics, resume, sharding, CLI. CPU, no model."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from evaluation import run_eval  # noqa: E402
from timeviper.processing_timeviper import MCQ_ANSWER_PROMPT  # noqa: E402
from evaluation.tasks import (  # noqa: E402
    FrameSampling,
    AnnotationError,
    PredictionFileError,
    build_grounding_prompt,
    build_mcq_prompt,
    build_prompt,
    compute_grounding_metrics,
    compute_mcq_metrics,
    eval_num_frames,
    group_by_video,
    load_annotations,
    merge_shards,
    parse_mcq_answer,
    parse_timestamps,
    read_predictions,
    run_items,
    score_output_dir,
    shard_indices,
    shard_output_path,
    temporal_iou,
)

# ---------------------------------------------------------------------------------------------------------------------
# helpers


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def make_mcq_benchmark(tmp_path, n=6):
    videos = tmp_path / "videos"
    videos.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        (videos / f"v{i}.mp4").write_bytes(b"")  # existence is all that validation checks
        rows.append(
            {
                "id": f"q{i}",
                "video": f"v{i}.mp4",
                "question": f"Question {i}?",
                "options": ["red", "green", "blue", "black"],
                "answer": "ABCD"[i % 4],
                "category": "color" if i % 2 else "count",
                "duration_group": "short" if i < 3 else "long",
            }
        )
    return write_jsonl(tmp_path / "mcq.jsonl", rows), videos, rows


def make_grounding_benchmark(tmp_path, n=5):
    videos = tmp_path / "videos"
    videos.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        (videos / f"g{i}.mp4").write_bytes(b"")
        rows.append({"id": i, "video": f"g{i}.mp4", "query": f"event {i}", "timestamps": [10.0, 20.0], "duration": 30})
    return write_jsonl(tmp_path / "tvg.jsonl", rows), videos, rows


class FakeModel:
    """answer_fn double: returns the scripted output for each id and records every call."""

    def __init__(self, outputs, fail_after=None):
        self.outputs = outputs
        self.calls = []
        self.fail_after = fail_after

    def __call__(self, record, prompt, answer_prompt):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls.append((record["id"], prompt, answer_prompt))
        return self.outputs(record) if callable(self.outputs) else self.outputs[record["id"]]


# ---------------------------------------------------------------------------------------------------------------------
# prompts


def test_mcq_prompt_prefixes_plain_options_and_keeps_lettered_ones():
    expected = (
        "Which colour?\nA. red\nB. green\n"
        "Please provide your answer by stating the letter followed by the full option."
    )
    assert build_mcq_prompt("Which colour?", ["red", "green"]) == expected
    assert build_mcq_prompt("Which colour?", ["A. red", "B. green"]) == expected
    # "A. Lincoln" alone is not a lettered list when B is not lettered too.
    assert build_mcq_prompt("Who?", ["A. Lincoln", "Washington"]).split("\n")[1:3] == ["A. A. Lincoln", "B. Washington"]


def test_grounding_prompt_matches_reference_text():
    prompt = build_grounding_prompt("a person opens the door", 30.96, 32)
    assert prompt == (
        "The video lasts for 30.96 seconds, and 32 frames are uniformly sampled from it. Investigate the video to "
        "identify the segment that matches the textual query 'a person opens the door', and output the start and end "
        "timestamps in seconds. The output format of the predicted timestamp should be like: 'start to end' seconds"
    )
    prompt, answer_prompt = build_prompt("grounding", {"query": "x", "duration": 100.0}, FrameSampling())
    assert "lasts for 100 seconds, and 100 frames" in prompt and answer_prompt is None
    _, answer_prompt = build_prompt("mcq", {"question": "q", "options": ["a", "b"]})
    assert answer_prompt == MCQ_ANSWER_PROMPT == "Best Option: ("


@pytest.mark.parametrize(
    "duration, fps, max_frames, expected",
    [
        (5, 1, 256, 32),  # too few: 32 uniform frames
        (33, 1, 256, 36),  # 33 padded to a multiple of 4
        (100.2, 1, 256, 104),
        (1000, 1, 256, 256),  # the first 256
        (1000, 1, 512, 512),
        (60, 2, 256, 120),
    ],
)
def test_eval_num_frames(duration, fps, max_frames, expected):
    assert eval_num_frames(duration, fps, max_frames) == expected
    assert FrameSampling(fps, max_frames).num_frames(duration) == expected


def test_auto_sampling_frame_count_has_no_padding():
    sampling = FrameSampling(rule="auto")
    assert [sampling.num_frames(d) for d in (5, 33, 1000)] == [32, 33, 256]
    assert sampling.processor_kwargs() == {"fps": 1.0, "max_frames": 256, "min_frames": 32, "sampling": "auto"}
    with pytest.raises(ValueError, match="min_frames"):
        FrameSampling(max_frames=16)  # below the default min_frames of 32


# ---------------------------------------------------------------------------------------------------------------------
# answer parsing


@pytest.mark.parametrize(
    "output, expected",
    [
        ("A", "A"),
        ("(A)", "A"),
        ("A.", "A"),
        ("A) The man is running.", "A"),
        (" b", "B"),
        ("(b)", "B"),
        ("c.", "C"),
        ("B) green", "B"),  # the usual continuation of "Best Option: ("
        ("D. black\n", "D"),
        ("The answer is C", "C"),
        ("the answer is c.", "C"),
        ("Answer: (D)", "D"),
        ("Best Option: (B)", "B"),
        ("I think it is B", "B"),
        ("Looking at the frames, so (C) is right", "C"),
        # malformed -> no answer, never an exception
        ("", None),
        ("   ", None),
        ("I don't know", None),
        ("A man walks into the room", None),
        ("the options are unclear", None),
        (None, None),
        # letters outside the four offered options are wrong
        ("E", None),
        ("(F) none of these", None),
        ("The answer is E", None),
    ],
)
def test_parse_mcq_answer(output, expected):
    assert parse_mcq_answer(output, 4) == expected


def test_parse_mcq_answer_matches_option_text():
    options = ["A. walking", "B. running fast", "C. running", "D. sitting"]
    assert parse_mcq_answer("He is running fast.", 4, options) == "B"
    assert parse_mcq_answer("sitting", 4, options) == "D"
    assert parse_mcq_answer("walking or sitting", 4, options) is None  # two options named: ambiguous


# ---------------------------------------------------------------------------------------------------------------------
# timestamps and IoU


@pytest.mark.parametrize(
    "output, expected",
    [
        ("12.5 to 20 seconds", (12.5, 20.0)),
        ("The event happens from 3s to 8s.", (3.0, 8.0)),
        ("between 30.2 and 10.1 seconds", (10.1, 30.2)),  # reversed -> swapped
        ("4 - 9 seconds", (4.0, 9.0)),
        ("0:05 to 1:10", (5.0, 70.0)),
        ("first 1 to 2, then 5.5 to 7.0 seconds", (5.5, 7.0)),  # the last pair
        ("<answer>4 to 9</answer> (1 to 2 was wrong)", (4.0, 9.0)),
        ("no timestamps here", None),
        ("around 12 seconds", None),
        (None, None),
    ],
)
def test_parse_timestamps(output, expected):
    assert parse_timestamps(output) == expected


def test_temporal_iou_edge_cases():
    assert temporal_iou((0, 10), (0, 10)) == 1.0
    assert temporal_iou((0, 5), (5, 10)) == 0.0  # touching
    assert temporal_iou((0, 2), (8, 10)) == 0.0  # disjoint
    assert temporal_iou((10, 0), (0, 10)) == 1.0  # reversed prediction is sorted
    assert temporal_iou((0, 10), (5, 15)) == pytest.approx(5 / 15)
    assert temporal_iou((2, 4), (0, 10)) == pytest.approx(0.2)  # contained
    assert temporal_iou((3, 3), (3, 3)) == 1.0
    assert temporal_iou((3, 3), (0, 10)) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# metrics


def test_mcq_metrics_by_hand():
    opts = ["A. x", "B. y", "C. z"]
    lines = [
        {"options": opts, "answer": "A", "prediction": "A) x", "category": "ocr", "duration_group": "short"},
        {"options": opts, "answer": "B", "prediction": "C", "category": "ocr", "duration_group": "short"},
        {"options": opts, "answer": "C", "prediction": "c", "category": "count", "duration_group": "long"},
        {"options": opts, "answer": "A", "prediction": "garbage!", "category": "count", "duration_group": "long"},
        {"options": opts, "answer": "B", "prediction": "The answer is B", "category": None, "duration_group": "long"},
    ]
    m = compute_mcq_metrics(lines)
    assert (m["correct"], m["total"], m["num_unparsed"]) == (3, 5, 1)
    assert m["accuracy"] == pytest.approx(60.0)
    assert m["per_category"] == {
        "count": {"accuracy": 50.0, "correct": 1, "total": 2},
        "ocr": {"accuracy": 50.0, "correct": 1, "total": 2},
    }
    assert m["per_duration_group"]["short"]["accuracy"] == pytest.approx(50.0)
    assert m["per_duration_group"]["long"]["accuracy"] == pytest.approx(200 / 3)


def test_grounding_metrics_by_hand():
    gt = [0.0, 10.0]
    lines = [
        {"timestamps": gt, "prediction": "0 to 10 seconds"},  # IoU 1
        {"timestamps": gt, "prediction": "5 to 15 seconds"},  # IoU 1/3
        {"timestamps": gt, "prediction": "0 to 6 seconds"},  # IoU 0.6
        {"timestamps": gt, "prediction": "20 to 30 seconds"},  # IoU 0
        {"timestamps": gt, "prediction": "I cannot tell"},  # unparsed -> 0
    ]
    m = compute_grounding_metrics(lines)
    assert m["total"] == 5 and m["num_unparsed"] == 1
    assert m["mIoU"] == pytest.approx(100 * (1 + 1 / 3 + 0.6) / 5)
    assert m["R@0.3"] == pytest.approx(60.0)
    assert m["R@0.5"] == pytest.approx(40.0)
    assert m["R@0.7"] == pytest.approx(20.0)


# ---------------------------------------------------------------------------------------------------------------------
# annotations


def test_annotation_validation_names_every_bad_line(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "ok.mp4").write_bytes(b"")
    good = {"id": "a", "video": "ok.mp4", "question": "q", "options": ["x", "y"], "answer": "A"}
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            good,
            '{"id": "b", "video": ',  # line 2: not JSON
            {**good, "id": "c", "options": "x y"},  # line 3: options not a list
            {**good, "id": "d", "answer": "C"},  # line 4: answer outside A-B
            {**good, "id": "e", "video": "missing.mp4"},  # line 5: no such video
            {**good},  # line 6: duplicate id "a"
        ],
    )
    with pytest.raises(AnnotationError) as info:
        load_annotations(path, "mcq", videos)
    message = str(info.value)
    assert "5 problem(s)" in message
    for line_no, text in [(2, "not valid JSON"), (3, "'options'"), (4, "'answer'"), (5, "missing.mp4"), (6, "duplicate")]:
        assert any(f"bad.jsonl:{line_no}:" in row and text in row for row in message.splitlines()), (line_no, message)


def test_annotation_normalises_answers_and_paths(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"")
    base = {"video": "v.mp4", "question": "q", "options": ["A. cat", "B. dog", "C. fish"]}
    path = write_jsonl(
        tmp_path / "ok.jsonl",
        [{**base, "id": 1, "answer": "(b)"}, {**base, "id": 2, "answer": 2}, {**base, "id": 3, "answer": "dog"}],
    )
    records = load_annotations(path, "mcq")
    assert [r["answer"] for r in records] == ["B", "C", "B"]
    assert [r["id"] for r in records] == ["1", "2", "3"]
    assert records[0]["video"] == str(tmp_path / "v.mp4")


def test_grounding_annotation_validation(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"")
    path = write_jsonl(
        tmp_path / "tvg.jsonl",
        [
            {"id": 1, "video": "v.mp4", "query": "q", "timestamps": [5, 2]},
            {"id": 2, "video": "v.mp4", "query": "q", "timestamps": [5]},
            {"id": 3, "video": "v.mp4", "timestamps": [1, 2]},
        ],
    )
    with pytest.raises(AnnotationError) as info:
        load_annotations(path, "grounding")
    assert "tvg.jsonl:2: 'timestamps'" in str(info.value) and "tvg.jsonl:3: missing or empty 'query'" in str(info.value)
    write_jsonl(path, [{"id": 1, "video": "v.mp4", "query": "q", "timestamps": [5, 2]}])
    assert load_annotations(path, "grounding")[0]["timestamps"] == [2.0, 5.0]


# ---------------------------------------------------------------------------------------------------------------------
# resumable runs


def test_run_items_resumes_after_crash(tmp_path):
    path, videos, _ = make_mcq_benchmark(tmp_path, n=5)
    items = load_annotations(path, "mcq", videos)
    out = tmp_path / "out" / "mcq.shard0of1.jsonl"

    crashing = FakeModel(lambda r: "A", fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        run_items(items, crashing, out, "mcq")
    assert len(read_predictions(out)) == 3

    resumed = FakeModel(lambda r: "A")
    summary = run_items(items, resumed, out, "mcq")
    assert [c[0] for c in resumed.calls] == ["q3", "q4"]
    assert (summary.num_skipped, summary.num_answered) == (3, 2)
    assert [p["id"] for p in read_predictions(out)] == ["q0", "q1", "q2", "q3", "q4"]

    again = FakeModel(lambda r: "A")
    run_items(items, again, out, "mcq")
    assert again.calls == []


def test_run_items_redoes_a_truncated_last_line(tmp_path):
    path, videos, _ = make_mcq_benchmark(tmp_path, n=4)
    items = load_annotations(path, "mcq", videos)
    out = tmp_path / "mcq.shard0of1.jsonl"
    run_items(items[:2], FakeModel(lambda r: "B"), out, "mcq")
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"id": "q2", "task": "mcq", "predic')  # crash mid-write
    assert [p["id"] for p in read_predictions(out)] == ["q0", "q1"]

    model = FakeModel(lambda r: "C")
    run_items(items, model, out, "mcq")
    assert [c[0] for c in model.calls] == ["q2", "q3"]
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["q0", "q1", "q2", "q3"]  # every line is valid JSON


def test_valid_last_line_without_newline_gets_one(tmp_path):
    out = tmp_path / "p.jsonl"
    out.write_text('{"id": "a"}\n{"id": "b"}', encoding="utf-8")
    assert [p["id"] for p in read_predictions(out, repair=True)] == ["a", "b"]
    assert out.read_text(encoding="utf-8").endswith('"b"}\n')


def test_corrupt_middle_line_is_an_error(tmp_path):
    out = write_jsonl(tmp_path / "p.jsonl", ['{"id": "a"}', "not json", '{"id": "b"}'])
    with pytest.raises(PredictionFileError, match=r"p\.jsonl:2"):
        read_predictions(out)


def test_prompts_and_records_reach_answer_fn(tmp_path):
    path, videos, _ = make_grounding_benchmark(tmp_path, n=2)
    items = load_annotations(path, "grounding", videos)
    model = FakeModel(lambda r: "The event is from 10 to 20 seconds.")
    run_items(items, model, tmp_path / "g.jsonl", "grounding", FrameSampling(fps=1, max_frames=256))
    record_id, prompt, answer_prompt = model.calls[0]
    assert record_id == "0" and answer_prompt is None
    assert prompt.startswith("The video lasts for 30 seconds, and 32 frames are uniformly sampled from it. ")
    assert "'event 0'" in prompt
    line = read_predictions(tmp_path / "g.jsonl")[0]
    assert line["pred_timestamps"] == [10.0, 20.0] and line["iou"] == 1.0 and line["num_frames"] == 32


def test_questions_are_grouped_by_video_in_first_seen_order():
    items = [{"id": i, "video": video} for i, video in enumerate(["a", "b", "a", "c", "b", "a"])]
    assert [item["id"] for item in group_by_video(items)] == [0, 2, 5, 1, 4, 3]


# ---------------------------------------------------------------------------------------------------------------------
# sharding and merging


@pytest.mark.parametrize("num_items", [0, 1, 5, 17, 100])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 8])
def test_shards_partition_items(num_items, num_shards):
    shards = [shard_indices(num_items, num_shards, i) for i in range(num_shards)]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(num_items))  # union is everything, nothing twice
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards == [shard_indices(num_items, num_shards, i) for i in range(num_shards)]  # deterministic


def test_shard_zigzag_layout():
    assert shard_indices(8, 2, 0) == [0, 1, 6, 7]
    assert shard_indices(8, 2, 1) == [2, 3, 4, 5]
    with pytest.raises(ValueError):
        shard_indices(8, 2, 2)


def test_merge_and_score_across_shards(tmp_path):
    path, videos, rows = make_mcq_benchmark(tmp_path, n=7)
    items = load_annotations(path, "mcq", videos)
    out_dir = tmp_path / "out"
    # q0..q3 right, q4 wrong, q5 malformed, q6 right
    outputs = {"q0": "A", "q1": "B) green", "q2": "The answer is C", "q3": "(d)", "q4": "B", "q5": "??", "q6": "C"}
    num_shards = 3
    for i in range(num_shards):
        shard = [items[j] for j in shard_indices(len(items), num_shards, i)]
        run_items(shard, FakeModel(outputs), shard_output_path(out_dir, "videomme", i, num_shards), "mcq")

    predictions, info = merge_shards(out_dir, "videomme")
    assert sorted(p["id"] for p in predictions) == [f"q{i}" for i in range(7)]
    assert info["missing_shard_files"] == [] and info["num_duplicates_dropped"] == 0

    metrics = score_output_dir(out_dir, "videomme", "mcq", expected_ids=[r["id"] for r in items])
    assert (metrics["correct"], metrics["total"], metrics["num_unparsed"], metrics["num_missing"]) == (5, 7, 1, 0)
    assert metrics["accuracy"] == pytest.approx(500 / 7)
    # count: q0 q2 q4 q6 -> 3 of 4; color: q1 q3 q5 -> 2 of 3
    assert metrics["per_category"]["count"]["correct"] == 3 and metrics["per_category"]["color"]["correct"] == 2
    assert json.loads((out_dir / "metrics.json").read_text())["videomme"]["accuracy"] == pytest.approx(500 / 7)
    assert len((out_dir / "videomme.merged.jsonl").read_text().splitlines()) == 7

    (out_dir / "videomme.shard1of3.jsonl").unlink()
    metrics = score_output_dir(out_dir, "videomme", "mcq", expected_ids=[r["id"] for r in items])
    assert metrics["missing_shard_files"] == ["videomme.shard1of3.jsonl"]
    assert metrics["num_missing"] == len(shard_indices(7, 3, 1))


# ---------------------------------------------------------------------------------------------------------------------
# command line


def test_cli_help_works():
    for args in (["--help"], ["score", "--help"]):
        result = subprocess.run(
            [sys.executable, "-m", "evaluation.run_eval", *args], cwd=REPO_ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert "--output-dir" in result.stdout


def test_cli_runs_shards_then_scores(tmp_path, capsys):
    path, videos, _ = make_grounding_benchmark(tmp_path, n=5)
    out_dir = tmp_path / "out"
    outputs = lambda r: {"0": "10 to 20", "1": "15 to 25 seconds", "2": "no idea"}.get(r["id"], "0 to 30")  # noqa: E731
    common = ["--task", "grounding", "--annotations", str(path), "--video-root", str(videos)]
    common += ["--output-dir", str(out_dir)]
    for i in range(2):
        assert run_eval.main([*common, "--num-shards", "2", "--shard-index", str(i)], answer_fn=FakeModel(outputs)) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["grounding.shard0of2.jsonl", "grounding.shard1of2.jsonl"]
    score_argv = ["score", "--task", "grounding", "--output-dir", str(out_dir), "--annotations", str(path)]
    assert run_eval.main(score_argv) == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())["grounding"]
    ious = [1.0, 5 / 15, 0.0, 1 / 3, 1 / 3]
    assert metrics["mIoU"] == pytest.approx(100 * sum(ious) / 5)
    assert metrics["R@0.3"] == pytest.approx(80.0) and metrics["R@0.5"] == pytest.approx(20.0)
    assert metrics["num_missing"] == 0 and metrics["num_unparsed"] == 1


def test_cli_reports_bad_annotations_before_running(tmp_path, capsys):
    path, videos, rows = make_mcq_benchmark(tmp_path, n=3)
    rows[1]["video"] = "gone.mp4"
    write_jsonl(path, rows)
    model = FakeModel(lambda r: "A")
    argv = ["--task", "mcq", "--annotations", str(path), "--video-root", str(videos), "--output-dir", str(tmp_path)]
    assert run_eval.main(argv, answer_fn=model) == 2
    err = capsys.readouterr().err
    assert "mcq.jsonl:2:" in err and "gone.mp4" in err
    assert model.calls == []


def test_cli_limit_and_merge_flag(tmp_path):
    path, videos, _ = make_mcq_benchmark(tmp_path, n=6)
    out_dir = tmp_path / "out"
    argv = ["--task", "mcq", "--annotations", str(path), "--video-root", str(videos), "--output-dir", str(out_dir)]
    model = FakeModel(lambda r: "A")
    assert run_eval.main([*argv, "--name", "mlvu", "--limit", "4"], answer_fn=model) == 0
    assert [c[0] for c in model.calls] == ["q0", "q1", "q2", "q3"]
    assert run_eval.main([*argv, "--name", "mlvu", "--limit", "4", "--merge"]) == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())["mlvu"]
    assert (metrics["correct"], metrics["total"], metrics["num_expected"]) == (1, 4, 4)


class FakeTokenizer:
    """Tokenises only the answer prompt, as ids 7 8 9 10; decodes ids as space-separated numbers."""

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        assert text == "Best Option: (" and not add_special_tokens
        return {"input_ids": torch.tensor([[7, 8, 9, 10]])}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(int(i)) for i in ids)


class FakeProcessor:
    """A tokenizer, and the calls of the streaming reader (`stream_conversation`, patched by `use_fakes`), which
    returns a 3-token prompt, dummy video features and a stream of 4 sampled frames."""

    def __init__(self):
        self.tokenizer = FakeTokenizer()
        self.calls = []
        self.features = torch.zeros(4, 2, 8)

    def stream_conversation(self, model, processor, conversation, **options):
        from transformers import BatchFeature

        self.calls.append((conversation, options))
        inputs = BatchFeature({"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 1, 1]])})
        return inputs, self.features, [SimpleNamespace(num_frames=4)]

    def video_prompt_ids(self, processor, conversation, num_frames):
        """A further question's prompt about the video of the last stream (its state is reused)."""
        self.calls.append((conversation, num_frames))
        return torch.tensor([[1, 2, 3]])


class FakeGenerator(torch.nn.Module):
    """encode_video_state() remembers its arguments; generate_from_video_state() appends tokens 42 43 to the prompt
    and remembers its state and kwargs."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.states = []
        self.kwargs = None

    def encode_video_state(self, input_ids, **kwargs):
        self.states.append({"input_ids": input_ids, **kwargs})
        return self.states[-1]

    def generate_from_video_state(self, state, input_ids, **kwargs):
        self.kwargs = {"state": state, "input_ids": input_ids, **kwargs}
        return torch.cat([input_ids, torch.tensor([[42, 43]])], dim=1)


def use_fakes(monkeypatch):
    import transformers

    import inference.streaming

    processor, model = FakeProcessor(), FakeGenerator()
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: processor)
    monkeypatch.setattr(run_eval, "load_checkpoint", lambda *a, **k: model)
    monkeypatch.setattr(inference.streaming, "stream_conversation", processor.stream_conversation)
    monkeypatch.setattr(inference.streaming, "video_prompt_ids", processor.video_prompt_ids)
    return processor, model


def test_model_glue_appends_answer_prompt_and_decodes_new_tokens(monkeypatch):
    from inference.streaming import PREFILL_CHUNK_TOKENS

    processor, model = use_fakes(monkeypatch)
    answer_fn = run_eval.build_model_answer_fn(
        "ckpt", "mcq", FrameSampling(rule="auto"), max_new_tokens=5, device="cpu", dtype="float32"
    )
    record = {"id": "q", "video": "/v.mp4", "start": 2.0, "end": 9.0}
    assert answer_fn(record, "PROMPT", "Best Option: (") == "42 43"
    conversation, options = processor.calls[0]
    assert conversation == [
        {
            "role": "user",
            "content": [
                {"type": "video", "path": "/v.mp4", "fps": 1.0, "max_frames": 256, "start": 2.0, "end": 9.0},
                {"type": "text", "text": "PROMPT"},
            ],
        }
    ]
    assert options == {"fps": 1.0, "max_frames": 256, "min_frames": 32, "sampling": "auto", "start": 2.0, "end": 9.0}
    (state,) = model.states
    assert state["video_features"] is processor.features and state["input_ids"].tolist() == [[1, 2, 3]]
    assert state["prefill_chunk_size"] == PREFILL_CHUNK_TOKENS
    assert model.kwargs["state"] is state
    assert model.kwargs["input_ids"].tolist() == [[1, 2, 3, 7, 8, 9, 10]]
    assert model.kwargs["max_new_tokens"] == 5 and model.kwargs["do_sample"] is False

    assert answer_fn({"id": "g", "video": "/v.mp4"}, "PROMPT", None) == "42 43"  # grounding: no answer prompt
    assert model.kwargs["input_ids"].tolist() == [[1, 2, 3]]
    assert len(model.states) == 2  # another clip of the video (no start/end): a state of its own

    # The next question about the same clip reuses its state: no second stream, only its prompt is tokenised.
    assert answer_fn({"id": "h", "video": "/v.mp4"}, "OTHER", "Best Option: (") == "42 43"
    assert len(model.states) == 2 and model.kwargs["state"] is model.states[1]
    assert processor.calls[-1] == (
        [{"role": "user", "content": [{"type": "video", "path": "/v.mp4", "fps": 1.0, "max_frames": 256},
                                      {"type": "text", "text": "OTHER"}]}],
        4,
    )
    assert model.kwargs["input_ids"].tolist() == [[1, 2, 3, 7, 8, 9, 10]]


def test_model_glue_reference_sampling_drops_clip_bounds_and_checks_frame_count(monkeypatch, capsys):
    processor, model = use_fakes(monkeypatch)
    answer_fn = run_eval.build_model_answer_fn(
        "ckpt", "grounding", FrameSampling(), max_new_tokens=5, device="cpu", dtype="float32"
    )
    answer_fn({"id": "g", "video": "/v.mp4", "duration": 30.0, "start": 1.0, "end": 5.0}, "PROMPT", None)
    assert processor.calls[0][1] == {"fps": 1.0, "max_frames": 256, "min_frames": 32, "sampling": "reference_eval"}
    # The fake stream has 4 sampled frames; the prompt said 32
    assert "states 32 frames but 4 were sampled" in capsys.readouterr().err


def test_probe_duration_fills_missing_grounding_duration(tmp_path):
    av = pytest.importorskip("av")
    np = pytest.importorskip("numpy")
    video_path = tmp_path / "clip.mp4"
    with av.open(str(video_path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(25):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    records = [{"id": "x", "video": str(video_path), "source_line": 1}]
    run_eval.fill_durations(records, "ann.jsonl")
    assert records[0]["duration"] == pytest.approx(2.5, abs=0.15)

    records = [{"id": "y", "video": str(tmp_path / "not_a_video.mp4"), "source_line": 7}]
    (tmp_path / "not_a_video.mp4").write_bytes(b"junk")
    with pytest.raises(AnnotationError, match="ann.jsonl:7"):
        run_eval.fill_durations(records, "ann.jsonl")


def test_scoring_does_not_load_the_model_stack():
    """`run_eval score` and annotation checks read JSON only: importing the evaluation code loads neither torch nor
    transformers (seconds and most of a GB on their own)."""
    probe = "import sys, evaluation.run_eval; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
