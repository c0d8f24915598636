"""Evaluate a TimeViper checkpoint on a local benchmark file, or score finished predictions (evaluation/README.md).

    python -m evaluation.run_eval --model PATH --task mcq --annotations videomme.jsonl --video-root videos/ \\
        --output-dir out/videomme --num-shards 8 --shard-index 0   # one resumable process per shard
    python -m evaluation.run_eval score --task mcq --output-dir out/videomme   # merge the shards, write metrics

``--merge`` on the run command line does the same as ``score``. The model enters only through
`build_model_answer_fn`; `run(args, answer_fn)` accepts any other callable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from inference.checkpoint import CheckpointError, load_checkpoint

from .tasks import (
    SAMPLING_RULES, TASKS, AnnotationError, AnswerFn, FrameSampling, PredictionFileError, group_by_video,
    load_annotations, run_items, score_output_dir, shard_items, shard_output_path,
)

DTYPES = ("bfloat16", "float16", "float32", "auto")


def build_model_answer_fn(model_path: str, task: str, sampling: FrameSampling, *, max_new_tokens: int, device: str,
                          dtype: str) -> AnswerFn:
    """Load a Hub-format TimeViper checkpoint and return ``answer_fn(record, prompt_text, answer_prompt) -> str``
    (a `VideoStateAnswerer`). This is the only code that touches the model."""
    import torch
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    model = load_checkpoint(model_path, "auto" if dtype == "auto" else getattr(torch, dtype))
    model.to(device).eval()
    return VideoStateAnswerer(model, processor, task, sampling, max_new_tokens, device)


class VideoStateAnswerer:
    """Greedy decoding at batch size 1, as in the reference (§6.3). The answer prompt (``Best Option: (`` for MCQ) is
    tokenised without special tokens and appended after the assistant header; only the new tokens are decoded. The
    video streams from its file through the vision tower and the prefill runs in chunks (`inference.streaming`:
    bounded memory at any length, the same answer as the processor's one-shot path); the sampling options apply per
    video item. Consecutive questions about the same video (and clip and sampling) share its state
    (`encode_video_state`): the video is decoded, encoded and prefilled once, and each further question costs its own
    tokens plus the compression stages that depend on it (`run` orders each shard's items by video for this)."""

    def __init__(self, model, processor, task: str, sampling: FrameSampling, max_new_tokens: int, device: str):
        self.model, self.processor, self.task, self.sampling = model, processor, task, sampling
        self.max_new_tokens, self.device = max_new_tokens, device
        # The state of the last video asked about, reused while its questions come.
        self.video_key = self.state = self.num_frames = None

    def __call__(self, record: dict, prompt_text: str, answer_prompt: str | None) -> str:
        import torch

        input_ids = self.prompt_ids(record, prompt_text)
        if answer_prompt:
            answer_ids = self.processor.tokenizer(answer_prompt, add_special_tokens=False, return_tensors="pt")
            input_ids = torch.cat([input_ids, answer_ids["input_ids"].to(input_ids.dtype)], dim=1)
        input_ids = input_ids.to(self.device)
        with torch.inference_mode():
            output_ids = self.model.generate_from_video_state(self.state, input_ids, max_new_tokens=self.max_new_tokens,
                                                              do_sample=False)
        return self.processor.tokenizer.decode(output_ids[0, input_ids.shape[1] :], skip_special_tokens=True)

    def prompt_ids(self, record: dict, prompt_text: str):
        """The prompt's ids; a video other than the last one is streamed, encoded and prefilled into `self.state`."""
        from inference.streaming import video_prompt_ids

        video = {"type": "video", "path": record["video"], "fps": self.sampling.fps,
                 "max_frames": self.sampling.max_frames}
        video_kwargs = self.sampling.processor_kwargs()
        if self.sampling.rule == "auto":  # the reference rule samples the whole video and ignores clip bounds
            for key in ("start", "end"):
                if record.get(key) is not None:
                    video[key] = video_kwargs[key] = record[key]
        conversation = [{"role": "user", "content": [video, {"type": "text", "text": prompt_text}]}]
        key = json.dumps([video, video_kwargs], sort_keys=True, default=str)
        if key == self.video_key:
            return video_prompt_ids(self.processor, conversation, self.num_frames)
        input_ids = self.encode_video(conversation, video_kwargs)
        self.video_key = key
        if self.task == "grounding":
            self.check_frame_count(record)
        return input_ids

    def encode_video(self, conversation: list[dict], video_kwargs: dict):
        import torch

        from inference.streaming import PREFILL_CHUNK_TOKENS, stream_conversation

        self.video_key = self.state = None  # the previous state's memory goes before this one is built
        with torch.inference_mode():
            inputs, features, streams = stream_conversation(self.model, self.processor, conversation, **video_kwargs)
            self.state = self.model.encode_video_state(inputs["input_ids"].to(self.device), video_features=features,
                                                       prefill_chunk_size=PREFILL_CHUNK_TOKENS)
        self.num_frames = streams[0].num_frames
        return inputs["input_ids"]

    def check_frame_count(self, record: dict) -> None:
        """A grounding prompt states the number of frames from the annotated duration: warn when it differs."""
        stated = self.sampling.num_frames(record["duration"])
        if self.num_frames != stated:
            print(f"warning: item {record['id']!r}: the prompt states {stated} frames but {self.num_frames} were "
                  "sampled (does the annotated duration match the video?)", file=sys.stderr)


def probe_duration(video_path: str) -> float:
    """A video's duration in seconds from its container (PyAV), for grounding records without ``duration``."""
    import av

    with av.open(video_path) as container:
        if container.duration is not None and container.duration > 0:
            return container.duration / av.time_base
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
            return float(stream.duration * stream.time_base)
        if stream.frames and stream.average_rate:
            return float(stream.frames / stream.average_rate)
    raise ValueError(f"cannot read the duration of {video_path}; give 'duration' in the annotation")


def fill_durations(records: list[dict], annotations: str) -> None:
    """Set ``duration`` on grounding records that lack it, from the video files; errors name the line."""
    errors = []
    for record in records:
        if record.get("duration"):
            continue
        try:
            record["duration"] = probe_duration(record["video"])
        except Exception as e:  # av raises its own error types for unreadable files
            errors.append(f"{annotations}:{record.get('source_line', '?')}: {e}")
    if errors:
        raise AnnotationError(f"{len(errors)} video(s) without a readable duration:\n" + "\n".join(errors[:50]))


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=TASKS, required=True, help="mcq: multiple-choice QA; grounding: TVG")
    parser.add_argument("--output-dir", required=True, help="folder for the prediction JSONL files and metrics.json")
    parser.add_argument("--name", help="prefix of the output files (default: the task name); one per benchmark")
    parser.add_argument("--annotations", help="benchmark JSONL file (format: evaluation/README.md)")
    parser.add_argument("--video-root", help="folder that relative 'video' paths start from (default: the file's)")


def build_run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.run_eval",
        description="Run a TimeViper checkpoint on a benchmark JSONL file (resumable, shardable). "
        "`python -m evaluation.run_eval score --help` shows the scoring command.",
        epilog="Outputs: {output_dir}/{name}.shard{i}of{K}.jsonl (one prediction per line). With --num-shards 1 the "
        "metrics are computed at the end; otherwise run `score` (or --merge) when every shard has finished.",
    )
    _add_common_arguments(parser)
    parser.add_argument("--model", help="checkpoint folder or Hub id (loaded with trust_remote_code)")
    parser.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video (default 1)")
    parser.add_argument("--max-frames", type=int, default=256, help="keep at most the first N frames (default 256)")
    parser.add_argument("--min-frames", type=int, default=32, help="fewer frames are replaced by N uniform ones (32)")
    parser.add_argument(
        "--sampling", choices=SAMPLING_RULES, default="reference_eval",
        help="frame rule: reference_eval (default; first max-frames frames, padded to a multiple of 4, whole video) "
        "or auto (uniform subsampling to max-frames; honours per-item start/end)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="generation length (default 128)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="model dtype (default bfloat16)")
    parser.add_argument("--num-shards", type=int, default=1, help="split the items over K processes (default 1)")
    parser.add_argument("--shard-index", type=int, default=0, help="which shard this process runs, 0..K-1")
    parser.add_argument("--limit", type=int, help="only the first N annotation records (before sharding)")
    parser.add_argument("--merge", action="store_true", help="do not run the model; merge shard files and score")
    return parser


def build_score_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.run_eval score",
        description="Merge the shard files {name}.shard*of*.jsonl of an output folder and compute metrics "
        "(MCQ: accuracy % overall, per category and duration group; grounding: mIoU and R@0.3/0.5/0.7 in %). "
        "Writes {name}.merged.jsonl and updates metrics.json.",
    )
    _add_common_arguments(parser)
    parser.add_argument("--limit", type=int, help="with --annotations: expect only the first N records")
    return parser


def score(args: argparse.Namespace) -> dict:
    expected_ids = None
    if args.annotations:
        records = load_annotations(args.annotations, args.task, args.video_root, check_videos=False)
        expected_ids = [record["id"] for record in records[: args.limit]]
    name = args.name or args.task
    metrics = score_output_dir(args.output_dir, name, args.task, expected_ids)
    print(json.dumps(metrics, indent=2, ensure_ascii=False))
    if metrics.get("missing_shard_files"):
        print(f"warning: missing shard files {metrics['missing_shard_files']}", file=sys.stderr)
    if metrics.get("num_missing"):
        print(f"warning: {metrics['num_missing']} annotated items have no prediction", file=sys.stderr)
    return metrics


def run(args: argparse.Namespace, answer_fn: AnswerFn | None = None) -> dict | None:
    """Validate everything, then answer this shard's items; ``answer_fn`` replaces the model (tests)."""
    if not args.annotations:
        raise SystemExit("error: --annotations is required to run")
    if answer_fn is None and not args.model:
        raise SystemExit("error: --model is required to run (or pass score / --merge to only score)")
    if not 0 <= args.shard_index < args.num_shards:
        raise SystemExit(f"error: --shard-index must be in [0, {args.num_shards}), got {args.shard_index}")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"error: --limit must be positive, got {args.limit}")
    try:
        sampling = FrameSampling(args.fps, args.max_frames, args.min_frames, args.sampling)
    except ValueError as e:
        raise SystemExit(f"error: {e} (set --min-frames no higher than --max-frames)") from None

    records = load_annotations(args.annotations, args.task, args.video_root, check_videos=True)
    records = records[: args.limit]
    items = group_by_video(shard_items(records, args.num_shards, args.shard_index))
    if args.task == "grounding":
        fill_durations(items, args.annotations)
    name = args.name or args.task
    output_path = shard_output_path(args.output_dir, name, args.shard_index, args.num_shards)

    if answer_fn is None:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        answer_fn = build_model_answer_fn(args.model, args.task, sampling, max_new_tokens=args.max_new_tokens,
                                          device=device, dtype=args.dtype)

    started, count = time.monotonic(), [0]

    def progress(record: dict, line: dict) -> None:
        count[0] += 1
        elapsed = time.monotonic() - started
        print(f"[{count[0]}] {record['id']}: {line['prediction']!r} ({elapsed / count[0]:.1f} s/item)", flush=True)

    summary = run_items(items, answer_fn, output_path, args.task, sampling, on_item=progress)
    print(f"shard {args.shard_index}/{args.num_shards}: {summary.num_items} items, {summary.num_skipped} already done, "
          f"{summary.num_answered} answered now -> {output_path}", flush=True)
    if args.num_shards == 1:
        return score(args)
    print("run `python -m evaluation.run_eval score ...` once every shard has finished", flush=True)
    return None


def main(argv: list[str] | None = None, answer_fn: AnswerFn | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["score"]:
            score(build_score_parser().parse_args(argv[1:]))
            return 0
        args = build_run_parser().parse_args(argv)
        if args.merge:
            score(args)
        else:
            run(args, answer_fn)
    except (AnnotationError, PredictionFileError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
