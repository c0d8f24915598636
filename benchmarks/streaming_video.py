"""Long video from a file to the first answer token with bounded memory (streaming encode + chunked prefill), on one
GPU, against today's one-shot path (processor pixels + unchunked prefill) in the same run.

Steps (each writes its record into the JSON as it finishes):
- exact: chunked vs unchunked prefill on the GPU (bf16) at `--exact-frames` with random features: greedy tokens
  and the first token's logits, with the schedule and with compression switched off.
- file: an H.264 file generated here (PyAV's libx264), sampled at its full frame rate; the streaming path
  (`streaming_chat_inputs` -> `encode_video` -> `generate(video_features=..., prefill_chunk_size=...)`) timed from
  the file to the first token, split into decode (background thread), vision and LLM; then decode alone and GPU
  alone measured separately; then the one-shot path (`apply_chat_template` -> `generate(pixel_values_videos=...)`).
  Host peak RSS of each path (the streaming path runs first: ru_maxrss only grows) and GPU peak.
- long_file: a long H.264 file (default 1 h of 1280x720 at 3 fps, 10 s GOPs) sampled at several rates: the
  streaming path, decode alone and GPU alone (no one-shot run: its host memory does not fit at these lengths).
- llm: the LLM side at large frame counts on features of the right shape (random, produced a chunk at a time as the
  prefill reaches them, as `streamed_video_features` does with real frames), chunked prefill + 1 token: peak GPU
  memory and prefill time.

Full-size architectures with random bf16 weights (configs a and b of benchmarks/common.py), nothing downloaded.

    python benchmarks/streaming_video.py --tiny            # CPU smoke test, tiny dims
    source benchmarks/gpu_setup.sh && python benchmarks/streaming_video.py --out benchmarks/results/streaming_video.json
"""

import argparse
import contextlib
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (  # noqa: E402
    add_common_arguments,
    build_model,
    free,
    log,
    make_config,
    mem,
    meta,
    random_features,
    run_steps,
    save,
    sync,
    timed,
    video_prompt_ids,
    weight_bytes,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, out="benchmarks/results/streaming_video.json")
    p.add_argument("--steps", default="exact,file,llm", help="comma-separated, in order: exact, file, long_file, llm")
    p.add_argument("--config", default="b", help="config of common.py: a (no compression) or b (TransV)")
    p.add_argument("--prefill-chunk", type=int, default=16384, help="prefill_chunk_size (tokens)")
    p.add_argument("--stream-chunk", type=int, default=64, help="frames per decoded chunk")
    p.add_argument("--exact-frames", type=int, default=1024)
    p.add_argument("--file-size", default="1280x720")
    p.add_argument("--file-seconds", type=int, default=300)
    p.add_argument("--file-fps", type=int, default=10, help="the file's frame rate, also the sampling rate")
    p.add_argument("--gop", type=int, default=50, help="keyframe interval of the generated file (frames)")
    p.add_argument("--long-file-size", default="1280x720")
    p.add_argument("--long-file-seconds", type=int, default=3600)
    p.add_argument("--long-file-fps", type=int, default=3)
    p.add_argument("--long-gop", type=int, default=30, help="keyframe interval of the long file (frames)")
    p.add_argument("--long-file", default=None,
                   help="use this file (e.g. written earlier by write_video) instead of writing one")
    p.add_argument("--long-sample-fps", default="3,1", help="sampling rates of the long file (one run each)")
    p.add_argument("--llm-frames", default="200000")
    args = p.parse_args(argv)
    unknown = set(args.steps.split(",")) - {"exact", "file", "long_file", "llm"}
    if unknown:
        p.error(f"--steps: unknown step(s) {sorted(unknown)}; the steps are exact, file, long_file, llm")
    if args.tiny:
        args.exact_frames, args.file_size, args.file_seconds, args.file_fps = 8, "96x64", 4, 5
        args.llm_frames, args.prefill_chunk, args.stream_chunk = "64", 64, 8
        args.long_file_size, args.long_file_seconds, args.long_file_fps, args.long_gop = "96x64", 6, 2, 4
    return args


def host_peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def compression_off(model):
    """The same model with its compression stages switched off (config a's LLM path on b's weights)."""
    text = model.model.language_model
    saved = text.stages, text.stage_at_layer
    text.stages, text.stage_at_layer = [], {}
    try:
        yield
    finally:
        text.stages, text.stage_at_layer = saved


def first_token(model, device, **inputs):
    """generate() of 1 greedy token; returns (seconds, output)."""
    return timed(device, lambda: model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0,
                                                return_dict_in_generate=True, output_logits=True))


def first_divergence(runs):
    """Where two greedy runs first pick different tokens, and how close the unchunked run's top two logits were
    there (a gap below the runs' logit difference is a bf16 near-tie, not a wrong prefill)."""
    for step, (a, b) in enumerate(zip(runs[0].logits, runs[1].logits)):
        if a.argmax(-1).item() != b.argmax(-1).item():
            top = a[0].float().topk(2).values
            return {"first_divergent_step": step, "top2_gap_at_divergence": (top[0] - top[1]).item(),
                    "logits_max_abs_diff_at_divergence": (a.float() - b.float()).abs().max().item()}
    return {}


def step_exact(model, device, args, results):
    """Chunked == unchunked on this GPU, in bf16 (with and without the compression schedule)."""
    ids = video_prompt_ids(model.config, args.exact_frames, device)
    generator = torch.Generator(device=device).manual_seed(0)
    features = random_features(model.config, args.exact_frames, device, model.dtype, generator)
    records = []
    for label, context in (("schedule", contextlib.nullcontext()), ("no compression", compression_off(model))):
        with context:
            runs = [
                model.generate(input_ids=ids, video_features=features, max_new_tokens=8, do_sample=False,
                               pad_token_id=0, return_dict_in_generate=True, output_logits=True, **extra)
                for extra in ({}, {"prefill_chunk_size": max(7, args.prefill_chunk // 8)})
            ]
        diff = (runs[0].logits[0].float() - runs[1].logits[0].float()).abs().max().item()
        scale = runs[0].logits[0].float().abs().max().item()
        record = {"variant": label, "frames": args.exact_frames, "tokens_in": ids.shape[1],
                  "chunk": max(7, args.prefill_chunk // 8),
                  "same_greedy_tokens": bool(torch.equal(runs[0].sequences, runs[1].sequences)),
                  "first_logits_max_abs_diff": diff, "first_logits_max_abs": scale,
                  "new_tokens": [run.sequences[0, ids.shape[1]:].tolist() for run in runs]}
        record.update(first_divergence(runs))
        log("exact", record)
        records.append(record)
    results["exact"] = records


CODEC = "H.264 (libx264 veryfast, crf 23)"


def write_video(path, seconds, fps, size, gop):
    """An H.264 file of moving gradients and a moving square (content the encoder cannot skip)."""
    import av

    width, height = size
    x = np.linspace(0, 255, width).astype(np.uint8)[None, :]
    y = np.linspace(0, 255, height).astype(np.uint8)[:, None]
    frame = np.empty((height, width, 3), np.uint8)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "preset": "veryfast", "crf": "23"}
        for i in range(seconds * fps):
            # uint8 sums wrap around at 256: gradients that scroll without float work per pixel
            frame[..., 0] = x + np.uint8((40 * i) % 256)
            frame[..., 1] = y + np.uint8(int(60 * np.sin(2 * np.pi * i / (fps * 20))) % 256)
            frame[..., 2] = (i * 3) % 256
            square = 40 + (i * 7) % (height - 120)
            frame[square : square + 80, square : square + 80] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def generated_file(size, seconds, fps, gop):
    """A new H.264 file (`write_video`, size "WxH") in a temporary folder: its path and its record."""
    path = os.path.join(tempfile.mkdtemp(), "long.mp4")
    write_s, _ = timed("cpu", lambda: write_video(path, seconds, fps, tuple(int(v) for v in size.split("x")), gop))
    return path, {"size": size, "seconds": seconds, "fps": fps, "gop": gop, "codec": CODEC,
                  "bytes": os.path.getsize(path), "write_s": write_s}


def existing_file_record(path):
    """`generated_file`'s record of a file written before this run, read from the file: frame size and rate, length,
    and the mean keyframe interval (the demuxer's frame index)."""
    import av

    from timeviper.video_processing_timeviper import _scan_frame_index

    with av.open(path) as container:
        stream = container.streams.video[0]
        index, frames = _scan_frame_index(container, stream, {"scanned_packets": 0}, path)
        if index is None:
            raise ValueError(f"{path}: its packets' timestamps do not number its frames; write it with write_video")
        fps = float(stream.average_rate)
        return {"size": f"{stream.codec_context.width}x{stream.codec_context.height}",
                "seconds": round(frames / fps), "fps": int(fps) if fps.is_integer() else fps,
                "gop": frames // len(index.keyframes), "codec": stream.codec_context.name,
                "bytes": os.path.getsize(path), "written": "before this run"}


def tiny_processor(model, path):
    """A processor with a tiny tokenizer (the model takes its ids) and a one-question conversation about `path`."""
    from inference.tiny_default import make_processor, make_tiny_tokenizer, use_tokenizer_ids

    processor = make_processor(make_tiny_tokenizer(), "nemotron_h", model.config.vision_tokens_per_frame,
                               model.config.vision_config.image_size)
    model.config.video_token_id = processor.video_token_id
    use_tokenizer_ids(model, processor)
    messages = [{"role": "user", "content": [{"type": "video", "path": path}, {"type": "text", "text": "What?"}]}]
    return processor, messages


def step_file(model, device, args, results):
    """A generated H.264 file to the first token: the streaming path, decode alone, the GPU alone, the one-shot path."""
    path, spec = generated_file(args.file_size, args.file_seconds, args.file_fps, args.gop)
    record = {"file": spec}
    log("file written", spec)
    processor, messages = tiny_processor(model, path)
    sampling = {"fps": float(args.file_fps), "max_frames": args.file_seconds * args.file_fps}
    first_logits = streaming_and_alone(model, device, args, path, processor, messages, sampling, record)
    results["file"] = record
    save(results, args)
    one_shot_path(model, device, processor, messages, sampling, first_logits, record)  # into the same record


def streaming_and_alone(model, device, args, path, processor, messages, sampling, record):
    """The streaming path first (host peak RSS only grows, so it is read before anything else held frames), then
    decode alone and the GPU alone, and the streaming path's time over the slower of those two. Returns the streaming
    path's first-token logits."""
    inputs, first_logits = streaming_path(model, device, args, processor, messages, sampling, record)
    record.update(decode_alone(path, processor, args, sampling))
    record["gpu_alone_s"] = gpu_alone(model, device, args, path, processor, sampling, inputs, record["frames"])
    bound = max(record["decode_alone_s"], record["gpu_alone_s"])
    record["streaming"]["over_max_of_decode_and_gpu"] = record["streaming"]["file_to_first_token_s"] / bound
    log(f"gpu alone {record['gpu_alone_s']:.1f} s; streaming / max(decode, gpu) = "
        f"{record['streaming']['over_max_of_decode_and_gpu']:.2f}")
    return first_logits


def decode_alone(path, processor, args, sampling):
    """The stream's frames read and dropped."""
    from timeviper.processing_timeviper import VideoStream

    seconds, frames = timed("cpu", lambda: sum(
        chunk.shape[0] for chunk in VideoStream(path, processor.video_processor, args.stream_chunk, **sampling)))
    log(f"decode alone: {frames} frames in {seconds:.1f} s")
    return {"decode_alone_s": seconds, "frames": frames}


def streaming_path(model, device, args, processor, messages, sampling, record):
    """File -> first token through `streaming_chat_inputs` -> `encode_video` -> chunked prefill; returns the
    processor's inputs and the first token's logits."""
    from timeviper.processing_timeviper import streaming_chat_inputs

    free(device)
    host_before = host_peak_bytes()
    sync(device)
    started = time.perf_counter()
    inputs, (stream,) = streaming_chat_inputs(processor, messages, chunk_frames=args.stream_chunk, **sampling)
    opened = time.perf_counter()
    features = model.encode_video(stream.pixel_chunks(device, model.dtype), num_frames=stream.num_frames)
    sync(device)
    encoded = time.perf_counter()
    llm_s, out = first_token(model, device, **inputs.to(device), video_features=features,
                             prefill_chunk_size=args.prefill_chunk)
    record["streaming"] = {
        "file_to_first_token_s": time.perf_counter() - started, "open_s": opened - started,
        "vision_s_overlapped_with_decode": encoded - opened, "decode_thread_s": stream.decode_seconds,
        "llm_prefill_s": llm_s, "gpu_peak_bytes": mem(device)["peak"],
        "host_peak_rss_bytes": host_peak_bytes(), "host_peak_rss_before_bytes": host_before,
        "tokens_in": int(inputs["input_ids"].shape[1]), "first_token": int(out.sequences[0, -1]),
    }
    log("streaming", record["streaming"])
    return inputs, out.logits[0].float()


def gpu_alone(model, device, args, path, processor, sampling, inputs, frames):
    """Seconds from the same uint8 frames already in host memory: normalise -> vision -> chunked prefill."""
    from timeviper.processing_timeviper import VideoStream

    stream = VideoStream(path, processor.video_processor, args.stream_chunk, **sampling)
    chunks = list(stream)
    free(device)

    def run():
        pixels = (stream.normalize(c.to(device, non_blocking=True)).to(model.dtype) for c in chunks)
        features = model.encode_video(pixels, num_frames=frames)
        return first_token(model, device, **inputs.to(device), video_features=features,
                           prefill_chunk_size=args.prefill_chunk)

    seconds, _ = timed(device, run)
    return seconds


def one_shot_path(model, device, processor, messages, sampling, first_logits, record):
    """The processor's pixels of every frame, then an unchunked prefill (compared with the streaming path)."""
    free(device)
    started = time.perf_counter()
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt", processor_kwargs=sampling)
    processed = time.perf_counter()
    pixels = batch["pixel_values_videos"].to(device, model.dtype)
    del batch["pixel_values_videos"]
    gpu_s, out = first_token(model, device, input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device), pixel_values_videos=pixels)
    record["one_shot"] = {
        "file_to_first_token_s": time.perf_counter() - started, "decode_and_preprocess_s": processed - started,
        "vision_and_llm_s": gpu_s, "gpu_peak_bytes": mem(device)["peak"], "host_peak_rss_bytes": host_peak_bytes(),
        "first_token": int(out.sequences[0, -1]),
    }
    record["first_logits_max_abs_diff_vs_streaming"] = (out.logits[0].float() - first_logits).abs().max().item()
    log("one-shot", record["one_shot"], "logit diff", record["first_logits_max_abs_diff_vs_streaming"])


def step_long_file(model, device, args, results):
    """A long file (`--long-file-seconds` at `--long-file-fps`), sampled at each rate of `--long-sample-fps`: the
    streaming path, decode alone and the GPU alone (`streaming_and_alone`). No one-shot run: its host memory (1.77 MB
    of float32 pixels per frame next to the decoded frames) exceeds the machine's at these lengths."""
    if args.long_file:
        path, spec = args.long_file, existing_file_record(args.long_file)
    else:
        path, spec = generated_file(args.long_file_size, args.long_file_seconds, args.long_file_fps, args.long_gop)
    log("long file", spec)
    results["long_file"] = {"file": spec, "points": []}
    processor, messages = tiny_processor(model, path)
    for fps in [float(f) for f in args.long_sample_fps.split(",")]:
        sampling = {"fps": fps, "max_frames": 10**7}
        point = {"sample_fps": fps}
        streaming_and_alone(model, device, args, path, processor, messages, sampling, point)
        results["long_file"]["points"].append(point)
        save(results, args)


def random_feature_stream(model, frames, device, chunk=256, seed=0):
    """Random projector outputs of the right shape, produced a chunk of frames at a time as the prefill reaches
    them (`StreamedVideoFeatures` with the vision tower left out): no features of the whole video exist."""
    from timeviper.modeling_timeviper import StreamedVideoFeatures

    cfg = model.config
    gen = torch.Generator(device=device).manual_seed(seed)

    def chunks():
        for start in range(0, frames, chunk):
            n = min(chunk, frames - start)
            yield random_features(cfg, n, device, model.dtype, gen)

    return StreamedVideoFeatures(lambda features: features, [(chunks(), frames)], cfg.vision_tokens_per_frame,
                                 cfg.text_config.hidden_size)


def step_llm(model, device, args, results):
    for frames in [int(f) for f in args.llm_frames.split(",") if f]:
        ids = video_prompt_ids(model.config, frames, device)
        features = random_feature_stream(model, frames, device)
        record = {"frames": frames, "tokens_in": int(ids.shape[1]),
                  "features": "random, streamed into the prefill a chunk of 256 frames at a time (vision left out)"}
        free(device)
        try:
            seconds, _ = first_token(model, device, input_ids=ids, video_features=features,
                                     prefill_chunk_size=args.prefill_chunk)
            record.update(oom=False, prefill_and_first_token_s=seconds, gpu_peak_bytes=mem(device)["peak"],
                          gpu_reserved_peak_bytes=mem(device)["reserved_peak"])
        except torch.OutOfMemoryError as err:
            record.update(oom=True, error=str(err).splitlines()[0][:300], gpu_peak_bytes=mem(device)["peak"])
        log("llm", record)
        results.setdefault("llm", []).append(record)
        save(results, args)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    results = {"meta": meta(device, args), "config": args.config}
    model, build_s = build_model(make_config(args.config, args.tiny, args.vision_chunk), device, torch.bfloat16)
    results["model"] = {"build_s": build_s, "weight_bytes": weight_bytes(model),
                        "token_compression": model.config.token_compression}
    log("model built", results["model"])
    steps = {"exact": step_exact, "file": step_file, "long_file": step_long_file, "llm": step_llm}
    run_steps([(name, steps[name]) for name in args.steps.split(",")], model, device, args, results)
    log("done")


if __name__ == "__main__":
    main()
