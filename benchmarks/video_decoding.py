"""Benchmark: seek-based sampled decoding (processing_timeviper.decode_video_pyav) vs decoding every frame.

Generates a long synthetic H.264 video (default: 1 hour, 320x240, 25 fps, a keyframe every 5 s, B-frames; each
frame's index is colour-coded and the bottom quarter holds a moving noisy pattern), then measures, on CPU:

* ``seek_1fps``: every 1 fps frame (3600 for an hour) with the seek-based decoder;
* ``seek_uniform_256``: the processor default for an hour-long video (1 fps, uniformly capped to 256 frames);
* ``full_decode``: the baseline, decoding every frame in order (``thread_type="AUTO"``, as the seek decoder) and
  converting only the 1 fps frames to RGB. It is timed on a prefix (``--baseline-seconds``, default 600 s) and
  extrapolated linearly to the whole video (decoding cost per frame is uniform in this synthetic video); pass
  ``--baseline-seconds 0`` to decode the whole file.

Sampled frames are checked against the requested indices through their colour code. Results go to
``benchmarks/results/video_decoding.json``.

Usage::

    python benchmarks/video_decoding.py                     # 1 hour (generation takes a few minutes)
    python benchmarks/video_decoding.py --duration 120      # quick run
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

from processing_timeviper import decode_video_pyav, sample_frame_indices  # noqa: E402
from tiny_assets import frame_index_from_pixels, write_test_video  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3600, help="video length in seconds (default 3600)")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--keyint-seconds", type=float, default=5.0, help="keyframe interval in seconds")
    parser.add_argument("--baseline-seconds", type=float, default=600,
                        help="prefix timed for the full-decode baseline (0: whole video)")
    parser.add_argument("--video", default=None, help="video path (default: a file in the system temp dir)")
    parser.add_argument("--regenerate", action="store_true", help="rewrite the video even if it exists")
    parser.add_argument("--repeats", type=int, default=1, help="take the best of this many timings")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "video_decoding.json"))
    return parser.parse_args()


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
        f"timeviper_bench_{int(args.duration)}s_{args.width}x{args.height}_{args.fps}fps_k{keyint}.mp4",
    )

    generation_seconds = None
    if args.regenerate or not video_matches(path, num_frames, args.fps, args.width, args.height):
        print(f"Generating {args.duration:.0f} s video ({num_frames} frames) at {path} ...", flush=True)
        start = time.perf_counter()
        write_test_video(path, num_frames=num_frames, fps=args.fps, size=(args.width, args.height), keyint=keyint,
                         texture=True)
        generation_seconds = time.perf_counter() - start
        print(f"  generated in {generation_seconds:.1f} s", flush=True)

    with av.open(path) as container:
        stream = container.streams.video[0]
        codec_name = stream.codec_context.name
        has_b_frames = bool(stream.codec_context.has_b_frames)
    results = {}
    load_at_start = os.getloadavg()

    # Seek-based 1 fps (every 1 fps frame, no cap).
    one_fps = sample_frame_indices(num_frames, float(args.fps), fps=1.0)
    stats = {}
    seconds, (frames, _) = best_of(args.repeats, lambda: decode_video_pyav(path, one_fps, stats=stats))
    recovered = [frame_index_from_pixels(f) for f in frames]
    assert recovered == one_fps, "seek decoding returned wrong frames"
    results["seek_1fps"] = {
        "sampled_frames": len(one_fps),
        "seconds": round(seconds, 3),
        "sampled_frames_per_second": round(len(one_fps) / seconds, 1),
        **stats,
    }
    print("seek_1fps", results["seek_1fps"], flush=True)
    del frames

    # Processor default: 1 fps capped to 256 frames by uniform subsampling.
    capped = sample_frame_indices(num_frames, float(args.fps), fps=1.0, max_frames=256)
    stats = {}
    seconds, (frames, _) = best_of(args.repeats, lambda: decode_video_pyav(path, capped, stats=stats))
    assert [frame_index_from_pixels(f) for f in frames] == capped, "seek decoding returned wrong frames"
    results["seek_uniform_256"] = {
        "sampled_frames": len(capped),
        "seconds": round(seconds, 3),
        "sampled_frames_per_second": round(len(capped) / seconds, 1),
        **stats,
    }
    print("seek_uniform_256", results["seek_uniform_256"], flush=True)
    del frames

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
            "generation_seconds": None if generation_seconds is None else round(generation_seconds, 1),
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
            "it, the decoder skipping unwanted non-reference frames; seek for long gaps; thread_type AUTO). "
            "full_decode: sequential decode of every frame "
            "(thread_type AUTO), RGB conversion of the 1 fps frames only; timed on the first timed_frames frames and "
            "extrapolated linearly when 'extrapolated' is true. Times are best of `repeats`."
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
