"""Ask questions about a video and stream the answers.

    python -m inference.ask --model CHECKPOINT --video clip.mp4 --question "What happens after the dog jumps?"

Several --question flags ask them in turn about the same video, which is encoded and prefilled once (its state is
reused: each further question costs its own tokens and the compression stages that depend on it).

Without --model, the embedded trained tiny model (inference/needle_model/, trained on the synthetic needle task of
training/synthetic.py) answers a needle question about a generated held-out clip, and the right answer is printed
beside it. `--model random-tiny` builds the tiny random-weight model instead (its answers are noise; it shows the
pipeline end to end); without --video it gets a generated sample clip.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TextStreamer

from inference.streaming import PREFILL_CHUNK_TOKENS, STREAM_CHUNK_FRAMES, processing_module, video_prompt_ids

RANDOM_TINY = "random-tiny"
DEFAULT_QUESTION = "Describe what happens in this video."


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="converted TimeViper checkpoint folder or Hub id; 'random-tiny' for the tiny "
                        "random-weight model (default: the embedded tiny model trained on the needle task)")
    parser.add_argument("--revision", help="Hub revision to pin the remote code to")
    parser.add_argument("--video", help="video file (default: a generated clip; a held-out needle clip for the default model)")
    parser.add_argument("--question", action="append", help="repeat for several questions about the video (default: "
                        f"the needle question for the embedded trained model, else {DEFAULT_QUESTION!r})")
    parser.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video (default 1)")
    parser.add_argument("--max-frames", type=int, default=256, help="uniformly subsample to at most this many")
    parser.add_argument("--start", type=float, help="clip start in seconds")
    parser.add_argument("--end", type=float, help="clip end in seconds")
    parser.add_argument("--token-compression", help="in-LLM compression schedule, e.g. 'uni_7_0.5-attn_39_0.05' (keep "
                        "ratios); overrides the checkpoint's. Stages the checkpoint has no TransV weights for start "
                        "with a closed gate, i.e. they drop tokens.")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    return parser.parse_args(argv)


def resolve_device_dtype(device: str, dtype: str):
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return torch.device(device), getattr(torch, dtype)


def load(args, dtype, scratch):
    if args.model == RANDOM_TINY:
        from inference.tiny_default import build_tiny_default

        print("[model] the embedded TINY RANDOM-WEIGHT model; its answers are noise.")
        return build_tiny_default(token_compression=args.token_compression)
    from transformers import AutoProcessor

    from inference.checkpoint import CheckpointError, load_checkpoint

    model_path = args.model
    if model_path is None:
        from inference.trained_default import MODEL_DIR, materialize_checkpoint

        print(f"[model] no --model given: the embedded tiny model trained on the needle task ({MODEL_DIR})")
        model_path = str(materialize_checkpoint(Path(scratch) / "needle_model"))
    overrides = {} if args.token_compression is None else {"token_compression": args.token_compression}
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True, revision=args.revision)
    try:
        model = load_checkpoint(model_path, dtype, revision=args.revision, **overrides)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None
    return model.eval(), processor


def default_video_and_question(args, scratch):
    """The generated clip and the questions (for the embedded trained model, the needle question) when --video is
    not given."""
    if args.model is None:
        from inference.trained_default import demo_clip, demo_question

        clip = demo_clip()
        video = str(clip.write_video(Path(scratch) / "needle.mp4"))
        print(
            f"[video] no --video given: generated a {clip.num_frames} s held-out needle clip at {video}; the "
            f"{clip.color} square shows at t = {clip.needle_frames[0]}-{clip.needle_frames[-1]} s "
            f"(right answer: {clip.answer_letter}. {clip.color})"
        )
        return video, args.question or [demo_question()]
    from inference.tiny_default import write_sample_video

    video = str(write_sample_video(Path(scratch) / "sample.mp4"))
    print(f"[video] no --video given: generated a 12 s sample clip at {video}")
    return video, args.question or [DEFAULT_QUESTION]


def report_token_budget(model, num_vision: int, num_text: int) -> None:
    print(f"[tokens] {num_vision} vision + {num_text} text tokens enter the LLM")
    for stage in model.config.compression_stages:
        kept = int(num_vision * stage.keep_ratio)
        how = "TransV" if stage.transfer else "drop"
        print(f"[tokens]   before block {stage.layer_idx}: {stage.method} keeps {kept} vision tokens ({how})")


class TimingStreamer(TextStreamer):
    """Streams the answer after an "[answer]" tag and records when its first token arrived (the end of prefill)."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.first_token_time = None
        self.num_tokens = 0

    def put(self, value):
        if not self.next_tokens_are_prompt:
            if self.first_token_time is None:
                self.first_token_time = time.perf_counter()
                print("[answer] ", end="", flush=True)
            self.num_tokens += value.numel()
        super().put(value)


def stream_answer(tokenizer, generate) -> tuple[float, float, int]:
    """Run ``generate(streamer=...)`` printing the answer as it comes; returns the prefill and decode seconds and
    the number of new tokens."""
    streamer = TimingStreamer(tokenizer)
    t0 = time.perf_counter()
    with torch.inference_mode():
        generate(streamer=streamer)
    t_end = time.perf_counter()
    first_token = streamer.first_token_time or t_end
    return first_token - t0, t_end - first_token, streamer.num_tokens


def vision_progress(model, num_frames: int):
    """A progress bar over the frames the vision tower has encoded (it runs in chunks)."""
    bar = tqdm(total=num_frames, desc="[vision] encoding frames", unit="frame", leave=False, file=sys.stderr)

    def count(module, inputs, output):
        bar.update(output.shape[0])

    return bar, model.model.multi_modal_projector.register_forward_hook(count)


def video_conversation(video: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "path": video}, {"type": "text", "text": question}]}]


def ask_many(model, processor, video, questions, first_ids, video_features, num_frames: int, args) -> None:
    """Several questions about one video: the prompt up to the end of the video is prefilled once
    (`encode_video_state`), then each question runs on a fork of that state."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        state = model.encode_video_state(
            first_ids.to(model.device), video_features=video_features, prefill_chunk_size=PREFILL_CHUNK_TOKENS
        )
    size = state.memory_bytes()
    print(
        f"[state] video prefilled once in {time.perf_counter() - t0:.2f} s; its state holds {size / 2**20:.1f} MiB "
        f"({size / num_frames / 1024:.1f} KiB per frame)"
    )
    for number, question in enumerate(questions, 1):
        ids = video_prompt_ids(processor, video_conversation(video, question), num_frames).to(model.device)
        print(f"[question {number}] {question}")
        prefill, decode, num_tokens = stream_answer(
            processor.tokenizer,
            lambda streamer: model.generate_from_video_state(
                state, ids, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer
            ),
        )
        print(
            f"[time] question {number}: prefill of its {ids.shape[1] - state.prefix_length} tokens "
            f"{prefill:.2f} s | decode {decode:.2f} s ({num_tokens} tokens)"
        )


def main(argv=None):
    args = parse_args(argv)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    with tempfile.TemporaryDirectory() as scratch:
        video, questions = args.video, args.question or [DEFAULT_QUESTION]
        if video is None:
            video, questions = default_video_and_question(args, scratch)
        elif not Path(video).is_file():
            raise SystemExit(f"error: video file not found: {video}")

        t0 = time.perf_counter()
        model, processor = load(args, dtype, scratch)
        model.to(device=device, dtype=dtype)
        t_load = time.perf_counter() - t0

        sampling = {"fps": args.fps, "max_frames": args.max_frames}
        sampling.update({k: v for k, v in (("start", args.start), ("end", args.end)) if v is not None})
        messages = video_conversation(video, questions[0])
        # The video streams from the file: decoding (a background thread) overlaps the vision tower, only the
        # frame features are kept, and the prefill runs in chunks (inference.streaming).
        t0 = time.perf_counter()
        streaming_chat_inputs = processing_module(processor).streaming_chat_inputs
        inputs, (stream,) = streaming_chat_inputs(processor, messages, chunk_frames=STREAM_CHUNK_FRAMES, **sampling)
        t_open = time.perf_counter() - t0
        metadata, num_frames = stream.metadata, stream.num_frames
        stamps = ", ".join(f"{t:.1f}" for t in metadata.timestamps[:12])
        more = " ..." if num_frames > 12 else ""
        print(f"[video] {num_frames} frames sampled from {metadata.duration:.1f} s at t = {stamps}{more} s")
        num_vision = int((inputs["input_ids"] == model.config.video_token_id).sum())
        report_token_budget(model, num_vision, inputs["input_ids"].shape[1] - num_vision)

        bar, handle = vision_progress(model, num_frames)
        t0 = time.perf_counter()
        with torch.inference_mode():
            video_features = model.encode_video(stream.pixel_chunks(device, dtype), num_frames=num_frames)
        t_vision = time.perf_counter() - t0
        handle.remove()
        bar.close()

        if len(questions) > 1:
            ask_many(model, processor, video, questions, inputs["input_ids"], video_features, num_frames, args)
            return
        prefill, decode, num_tokens = stream_answer(processor.tokenizer, lambda streamer: model.generate(
            **inputs.to(device), video_features=video_features, prefill_chunk_size=PREFILL_CHUNK_TOKENS,
            max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer,
        ))
        rate = (num_tokens - 1) / decode if decode > 0 and num_tokens > 1 else float("nan")
        print(
            f"[time] load {t_load:.2f} s | video open {t_open:.2f} s | frames decoded + resized in "
            f"{stream.decode_seconds:.2f} s, overlapped with vision {t_vision:.2f} s | prefill {prefill:.2f} s"
            f" | decode {decode:.2f} s ({num_tokens} tokens, {rate:.1f} tokens/s) on {device} {str(dtype).removeprefix('torch.')}"
        )


if __name__ == "__main__":
    main()
