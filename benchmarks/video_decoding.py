"""Benchmark: seek-based sampled decoding (processing_timeviper.decode_video_pyav) vs decoding every frame.

Generates a long synthetic H.264 MP4 (default: 1 hour, 640x360, 25 fps, x264 ``veryfast`` CRF 18, a keyframe every
5 s, 2 B-frames; each frame's index is colour-coded and the bottom quarter holds a moving noisy pattern), then
measures, on CPU:

* ``seek_1fps``: every 1 fps frame (3600 for an hour) with the seek-based decoder;
* ``seek_uniform_256``: the processor default for an hour-long video (1 fps, uniformly capped to 256 frames),
  decoding only;
* ``processor_default``: the whole ``TimeViperVideoProcessor()(path)`` call (the same 256 frames, plus the
  384x384 resize and normalisation);
* ``frame_table_scan``: one demux pass over the file, which variable-frame-rate and Matroska/WebM videos add;
* ``full_decode``: the baseline, decoding every frame in order (``thread_type="AUTO"``, as the seek decoder) and
  converting only the 1 fps frames to RGB. It is timed on a prefix (``--baseline-seconds``, default 600 s) and
  extrapolated linearly to the whole video (decoding cost per frame is uniform in this synthetic video); pass
  ``--baseline-seconds 0`` to decode the whole file.

Sampled frames are checked against the requested indices through their colour code, and their timestamps. Results
go to ``benchmarks/results/video_decoding.json``. The generated video is kept in the temp dir (with a
``.generation.json`` recording how long it took) and reused by later runs.

Usage::

    python benchmarks/video_decoding.py --generate-only     # write the 1-hour video (~10-15 min on 2 cores)
    python benchmarks/video_decoding.py --repeats 3         # measure (reuses the video)
    python benchmarks/video_decoding.py --duration 120      # quick run
    python benchmarks/video_decoding.py --size 320x240 --preset ultrafast   # other size / faster generation
"""

import argparse
import json
import os
import platform
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))

import av  # noqa: E402
import numpy as np  # noqa: E402

from processing_timeviper import (  # noqa: E402
    TimeViperVideoProcessor,
    _scan_frame_table,
    decode_video_pyav,
    sample_frame_indices,
)
from tiny_assets import frame_index_from_pixels, write_test_video  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3600, help="video length in seconds (default 3600)")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--size", default="640x360", help="WIDTHxHEIGHT (default 640x360)")
    parser.add_argument("--preset", default="veryfast", help="libx264 preset for generation (default veryfast)")
    parser.add_argument("--generate-only", action="store_true", help="write the video (if needed) and stop")
    parser.add_argument("--keyint-seconds", type=float, default=5.0, help="keyframe interval in seconds")
    parser.add_argument("--baseline-seconds", type=float, default=600,
                        help="prefix timed for the full-decode baseline (0: whole video)")
    parser.add_argument("--video", default=None, help="video path (default: a file in the system temp dir)")
    parser.add_argument("--regenerate", action="store_true", help="rewrite the video even if it exists")
    parser.add_argument("--repeats", type=int, default=1, help="take the best of this many timings")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "video_decoding.json"))
    args = parser.parse_args()
    try:
        args.width, args.height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size must be WIDTHxHEIGHT, got {args.size!r}")
    return args


def video_matches(path, num_frames, fps, width, height) -> bool:
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            return (stream.frames == num_frames and float(stream.average_rate) == fps
                    and (stream.codec_context.width, stream.codec_context.height) == (width, height))
    except Exception:
        return False


def best_of(repeats, fn):
    best, result = None, None
    for _ in range(repeats):
        result = None  # free the previous result before the next run (3600 RGB frames at 640x360 are 2.5 GB)
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return best, result


def full_decode(path, num_frames, wanted):
    """Decode frames 0..num_frames-1 in order; convert the wanted ones to RGB (what a sequential reader does)."""
    wanted = set(wanted)
    kept = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index >= num_frames:
                break
            if index in wanted:
                frame.to_ndarray(format="rgb24")
                kept += 1
    return kept


def main():
    args = parse_args()
    num_frames = int(round(args.duration * args.fps))
    keyint = max(1, int(round(args.keyint_seconds * args.fps)))
    path = args.video or os.path.join(
        os.environ.get("TMPDIR", "/tmp"),
        f"timeviper_bench_{int(args.duration)}s_{args.width}x{args.height}_{args.fps}fps_k{keyint}_{args.preset}.mp4",
    )
    # How the video was made (and in how long) is kept next to it, so that a later run reusing it can report it.
    generation_record = path + ".generation.json"

    if args.regenerate or not video_matches(path, num_frames, args.fps, args.width, args.height):
        print(f"Generating {args.duration:.0f} s video ({num_frames} frames, {args.width}x{args.height}, "
              f"x264 {args.preset}) at {path} ...", flush=True)
        start = time.perf_counter()
        write_test_video(path, num_frames=num_frames, fps=args.fps, size=(args.width, args.height), keyint=keyint,
                         texture=True, preset=args.preset)
        generation = {"seconds": round(time.perf_counter() - start, 1), "preset": args.preset,
                      "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
        with open(generation_record, "w") as handle:
            json.dump(generation, handle)
        print(f"  generated in {generation['seconds']:.1f} s", flush=True)
    generation = {}
    if os.path.exists(generation_record):
        with open(generation_record) as handle:
            generation = json.load(handle)
    if args.generate_only:
        return

    with av.open(path) as container:
        stream = container.streams.video[0]
        codec_name = stream.codec_context.name
        has_b_frames = bool(stream.codec_context.has_b_frames)
    results = {}
    load_at_start = os.getloadavg()

    def timed_seek(name, indices):
        stats = {}
        seconds, (frames, metadata) = best_of(args.repeats, lambda: decode_video_pyav(path, indices, stats=stats))
        assert [frame_index_from_pixels(f) for f in frames] == indices, "seek decoding returned wrong frames"
        assert metadata.timestamps == [i / args.fps for i in indices], "wrong timestamps"
        results[name] = {
            "sampled_frames": len(indices),
            "seconds": round(seconds, 3),
            "sampled_frames_per_second": round(len(indices) / seconds, 1),
            **stats,
        }
        print(name, results[name], flush=True)

    # Seek-based 1 fps (every 1 fps frame, no cap).
    one_fps = sample_frame_indices(num_frames, float(args.fps), fps=1.0)
    timed_seek("seek_1fps", one_fps)

    # Processor default: 1 fps capped to 256 frames by uniform subsampling; decoding only ...
    capped = sample_frame_indices(num_frames, float(args.fps), fps=1.0, max_frames=256)
    timed_seek("seek_uniform_256", capped)

    # ... and the whole video processor call (decode + 384x384 bicubic resize + normalisation).
    processor = TimeViperVideoProcessor()
    seconds, out = best_of(args.repeats, lambda: processor(path))
    assert out["video_metadata"][0].frames_indices == capped
    results["processor_default"] = {
        "sampled_frames": len(capped),
        "seconds": round(seconds, 3),
        "sampled_frames_per_second": round(len(capped) / seconds, 1),
        "pixel_values_videos_shape": list(out["pixel_values_videos"].shape),
    }
    print("processor_default", results["processor_default"], flush=True)
    del out

    # What a video without a trustworthy constant rate (variable frame rate, Matroska/WebM) adds: one demux pass
    # over the whole file to build the frame table.
    def scan():
        counts = {"scanned_packets": 0}
        with av.open(path) as container:
            table, _ = _scan_frame_table(container, container.streams.video[0], counts)
        return len(table)

    seconds, packets = best_of(args.repeats, scan)
    assert packets == num_frames
    results["frame_table_scan"] = {"packets": packets, "seconds": round(seconds, 3)}
    print("frame_table_scan", results["frame_table_scan"], flush=True)

    # Baseline: decode every frame (prefix, extrapolated).
    prefix_frames = num_frames
    if args.baseline_seconds > 0:
        prefix_frames = min(num_frames, int(args.baseline_seconds * args.fps))
    prefix_wanted = [i for i in one_fps if i < prefix_frames]
    seconds, kept = best_of(args.repeats, lambda: full_decode(path, prefix_frames, prefix_wanted))
    assert kept == len(prefix_wanted)
    extrapolated = seconds * num_frames / prefix_frames
    results["full_decode"] = {
        "timed_frames": prefix_frames,
        "timed_seconds": round(seconds, 3),
        "extrapolated": prefix_frames < num_frames,
        "decoded_frames_per_second": round(prefix_frames / seconds, 1),
        "seconds_for_whole_video": round(extrapolated, 3),
        "sampled_frames_per_second_at_1fps": round(len(one_fps) / extrapolated, 1),
    }
    print("full_decode", results["full_decode"], flush=True)

    baseline = results["full_decode"]["seconds_for_whole_video"]
    results["speedup_1fps"] = round(baseline / results["seek_1fps"]["seconds"], 2)
    results["speedup_uniform_256"] = round(baseline / results["seek_uniform_256"]["seconds"], 2)
    results["speedup_processor_default"] = round(baseline / results["processor_default"]["seconds"], 2)
    report = {
        "video": {
            "duration_seconds": args.duration,
            "frames": num_frames,
            "fps": args.fps,
            "size": [args.width, args.height],
            "keyframe_interval_frames": keyint,
            "codec": codec_name,
            "b_frames": has_b_frames,
            "file_megabytes": round(os.path.getsize(path) / 1e6, 2),
            "x264_preset": generation.get("preset", args.preset),
            "generation_seconds": generation.get("seconds"),
            "load_average_at_generation_end": generation.get("load_average_at_end"),
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "pyav": av.__version__,
            "numpy": np.__version__,
            "load_average_at_start": [round(x, 2) for x in load_at_start],
        },
        "method": (
            "seek_*: decode_video_pyav (demux forward, decode only from the keyframe before each wanted frame up to "
            "it, the decoder skipping unwanted non-reference frames; seek for long gaps; thread_type AUTO), RGB "
            "frames stacked into one array. The MP4 header vouches for a constant rate, so no frame-table scan. "
            "processor_default: TimeViperVideoProcessor()(path) with its defaults (1 fps capped to 256 frames, "
            "decode + 384x384 PIL bicubic resize + normalisation). frame_table_scan: one demux pass over the file "
            "(what a variable-frame-rate or Matroska/WebM file adds). full_decode: sequential decode of every frame "
            "(thread_type AUTO), RGB conversion of the 1 fps frames only; timed on the first timed_frames frames and "
            "extrapolated linearly when 'extrapolated' is true. speedup_* = full_decode seconds_for_whole_video / "
            "seconds. Times are best of `repeats`, wall clock on a shared machine."
        ),
        "repeats": args.repeats,
        "results": results,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
