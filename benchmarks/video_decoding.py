"""Benchmark: sampled decoding (video_processing_timeviper.decode_video_pyav) against FFmpeg decoding the whole file.

Generates a long synthetic H.264 MP4 (kept in the temp dir and reused; each frame's index colour-coded), then times
each measurement in its own process (wall clock and peak RSS from ``wait4``), alternating so that load on a shared
machine hits all: ``ffmpeg`` (``ffmpeg -i VIDEO -f null -``), ``sampled_1fps`` (every 1 fps frame with
`decode_video_pyav`, frames and timestamps checked), ``processor_default`` (``TimeViperVideoProcessor()(path)``) and
``index_scan`` (the demux pass that numbers the frames). Results: ``benchmarks/results/video_decoding.json``.

    python benchmarks/video_decoding.py --repeats 3       # best of 3 (``timeviper`` importable)
    python benchmarks/video_decoding.py --duration 600    # a 10-minute video instead of an hour
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3600, help="video length in seconds (default 3600)")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--size", default="320x180", help="WIDTHxHEIGHT (default 320x180)")
    parser.add_argument("--keyint-seconds", type=float, default=10.0, help="keyframe interval (default 10 s)")
    parser.add_argument("--preset", default="ultrafast", help="libx264 preset for generation")
    parser.add_argument("--video", default=None, help="video path (default: a file in the system temp dir)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each measurement (best is reported)")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "video_decoding.json"))
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one measurement, in a child
    args = parser.parse_args(argv)
    try:
        args.width, args.height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size must be WIDTHxHEIGHT, got {args.size!r}")
    return args


def video_path(args) -> str:
    keyint = int(round(args.keyint_seconds * args.fps))
    name = f"timeviper_bench_{int(args.duration)}s_{args.width}x{args.height}_{args.fps}fps_k{keyint}_{args.preset}.mp4"
    return args.video or os.path.join(os.environ.get("TMPDIR", "/tmp"), name)


def ensure_video(args, path: str) -> dict:
    """Write the video unless a complete one is there; returns how it was made."""
    import av

    from tiny_assets import write_test_video

    num_frames = int(round(args.duration * args.fps))
    record = path + ".generation.json"
    try:
        with av.open(path) as container:
            complete = container.streams.video[0].frames == num_frames and os.path.exists(record)
    except (OSError, av.error.FFmpegError):
        complete = False
    if not complete:
        print(f"Generating {path} ({num_frames} frames) ...", flush=True)
        start = time.perf_counter()
        write_test_video(path, num_frames=num_frames, fps=args.fps, size=(args.width, args.height),
                         keyint=int(round(args.keyint_seconds * args.fps)), texture=True, preset=args.preset)
        with open(record, "w") as handle:
            json.dump({"seconds": round(time.perf_counter() - start, 1), "preset": args.preset}, handle)
    with open(record) as handle:
        return json.load(handle)


def measure(args, path: str) -> dict:
    """One measurement in this process (the parent reads its wall time and peak RSS). ``import_seconds`` and
    ``rss_after_import_mib``: importing torch and transformers, paid once per process; ``work_seconds``: the
    measurement itself."""
    import resource

    start = time.perf_counter()
    if args.measure == "generate":
        return ensure_video(args, path)
    import timeviper.video_processing_timeviper  # noqa: F401 - imported here so that its time is counted apart from the work
    import tiny_assets  # noqa: F401

    imported, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    before = {"import_seconds": round(imported - start, 3), "rss_after_import_mib": round(usage.ru_maxrss / 1024, 1)}
    result = work(args, path)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime  # all threads of this process
    return {"work_seconds": round(time.perf_counter() - imported, 3), "work_cpu_seconds": round(cpu, 2), **before,
            **result}


def work(args, path: str) -> dict:
    """The measurement `args.measure` itself."""
    from timeviper.video_processing_timeviper import (
        TimeViperVideoProcessor,
        _scan_frame_index,
        decode_video_pyav,
        sample_frame_indices,
    )
    from tiny_assets import frame_index_from_pixels

    num_frames = int(round(args.duration * args.fps))
    if args.measure == "sampled_1fps":
        indices = sample_frame_indices(num_frames, float(args.fps), fps=1.0)
        stats = {}
        frames, metadata = decode_video_pyav(path, indices, stats=stats)
        if [frame_index_from_pixels(f) for f in frames] != indices:
            raise AssertionError("sampled decoding returned wrong frames")
        if metadata.timestamps != [i / args.fps for i in indices]:
            raise AssertionError("wrong timestamps")
        return {"sampled_frames": len(indices), **stats}
    if args.measure == "processor_default":
        out = TimeViperVideoProcessor()(path)
        return {"sampled_frames": int(out["video_num_frames"][0]),
                "pixel_values_videos_shape": list(out["pixel_values_videos"].shape)}
    if args.measure == "index_scan":
        import av

        counts = {"scanned_packets": 0}
        with av.open(path) as container:
            index, count = _scan_frame_index(container, container.streams.video[0], counts, path)
        return {"frames": count, "keyframes": len(index.keyframes)}
    raise ValueError(f"unknown measurement {args.measure!r}")


def run_child(command: list[str]) -> dict:
    """Run a command; its wall time, peak RSS (from wait4) and, for our own children, the JSON it prints.

    The peak RSS of a forked child starts at its parent's (before exec), so the parent imports nothing heavy."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout = process.stdout.read()
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {stderr.decode()[-2000:]}")
    result = {"seconds": round(seconds, 3), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
              "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2)}
    lines = stdout.decode().strip().splitlines()
    if lines and lines[-1].startswith("{"):
        result.update(json.loads(lines[-1]))
    return result


def main():
    args = parse_args()
    path = video_path(args)
    if args.measure:
        print(json.dumps(measure(args, path)))
        return
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        sys.exit("The baseline needs FFmpeg's command line tool `ffmpeg` (e.g. `apt-get install ffmpeg`).")
    me = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--video", path, "--measure"]  # same video
    commands = {
        "ffmpeg": [ffmpeg, "-v", "error", "-nostdin", "-i", path, "-f", "null", "-"],
        "sampled_1fps": me + ["sampled_1fps"],
        "processor_default": me + ["processor_default"],
        "index_scan": me + ["index_scan"],
    }
    generation = run_child(me + ["generate"])  # in a child, so that this process stays small (see run_child)
    runs = {name: [] for name in commands}
    load_at_start = os.getloadavg()
    for repeat in range(args.repeats):
        for name, command in commands.items():  # alternate, so that load on a shared machine hits every one
            runs[name].append(run_child(command))
            print(repeat, name, runs[name][-1], flush=True)
    best = {name: min(results, key=lambda r: r["seconds"]) for name, results in runs.items()}
    for name, result in best.items():
        result["all_seconds"] = [r["seconds"] for r in runs[name]]
        result["all_cpu_seconds"] = [r.get("work_cpu_seconds", r["cpu_seconds"]) for r in runs[name]]
        result["max_peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs[name])
        if "rss_after_import_mib" in result:  # what the measurement itself added to the process
            result["rss_added_by_work_mib"] = round(result["peak_rss_mib"] - result["rss_after_import_mib"], 1)
    ffmpeg_version = subprocess.run([ffmpeg, "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    report = {
        "video": {"path": path, "duration_seconds": args.duration, "fps": args.fps, "size": [args.width, args.height],
                  "keyframe_interval_seconds": args.keyint_seconds, "x264_preset": args.preset,
                  "file_megabytes": round(os.path.getsize(path) / 1e6, 2),
                  "generation_seconds": generation.get("seconds")},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "ffmpeg": ffmpeg_version,
                    "load_average_at_start": [round(x, 2) for x in load_at_start],
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "results": best,
        # Sampled decoding against FFmpeg's full decode (the target is 1.3x): the decoding itself (work) and the
        # whole process, Python start-up and the torch/transformers import included (wall).
        "sampled_1fps_work_over_ffmpeg": round(best["sampled_1fps"]["work_seconds"] / best["ffmpeg"]["seconds"], 3),
        "sampled_1fps_wall_over_ffmpeg": round(best["sampled_1fps"]["seconds"] / best["ffmpeg"]["seconds"], 3),
        # CPU seconds (all threads; the least of the runs), less sensitive than wall time to other load.
        "sampled_1fps_work_cpu_over_ffmpeg_cpu": round(
            min(best["sampled_1fps"]["all_cpu_seconds"]) / min(best["ffmpeg"]["all_cpu_seconds"]), 3),
        "method": "each measurement is its own process (wall clock, peak RSS from wait4); best of `repeats` by wall "
                  "clock, run alternately. work_seconds excludes Python start-up and imports (import_seconds).",
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
