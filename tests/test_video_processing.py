"""Frame sampling, seek-based PyAV decoding and the video/image transforms of video_processing_timeviper.

Oracles: hand-computed index lists; a full sequential decode of the same file (decoded pixels must be identical);
colour-coded frames (the frame index is recovered from the pixels); PIL bicubic resize + (x / 255 - 0.5) / 0.5.
"""

import io
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from timeviper.video_processing_timeviper import (
    TimeViperImageProcessor,
    TimeViperVideoProcessor,
    decode_video_pyav,
    reference_eval_indices,
    sample_frame_indices,
    transform_frames,
    uniform_indices,
)
from tiny_assets import (
    decode_all_frames,
    frame_index_from_pixels,
    make_frame,
    vfr_timestamps,
    write_audio_only,
    write_empty_video,
    write_test_video,
)


av = pytest.importorskip("av")

SIZE = {"height": 28, "width": 28}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Short colour-coded videos: 300 frames at 25 fps (12 s), keyframe every 20 frames, 2 B-frames; and others."""
    root = tmp_path_factory.mktemp("videos")
    paths = {
        "gop20": write_test_video(root / "gop20.mp4", num_frames=300, fps=25, size=(64, 48), keyint=20),
        "gop50": write_test_video(root / "gop50.mp4", num_frames=500, fps=25, size=(32, 32), keyint=50),
        "mpeg4": write_test_video(root / "mpeg4.mp4", num_frames=60, fps=30, size=(32, 32), keyint=7, codec="mpeg4"),
        "ntsc": write_test_video(root / "ntsc.mp4", num_frames=90, fps=29.97, size=(32, 32), keyint=15),
    }
    return {name: Path(path) for name, path in paths.items()}


def indices_from_pixel_values(pixel_values: torch.Tensor) -> list[int]:
    """Undo the (x / 255 - 0.5) / 0.5 normalisation and read each frame's code."""
    frames = ((pixel_values * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)
    return [frame_index_from_pixels(f) for f in frames]


# ----------------------------------------------------------------------------------------------------------------
# Sampling rules (pure functions, hand-computed values)
# ----------------------------------------------------------------------------------------------------------------


def test_uniform_indices_are_segment_midpoints():
    # splits = linspace(0, 10, 5) -> [0, 2, 5, 7, 10] (truncated); midpoints (a + b) // 2
    assert uniform_indices(4, 10) == [1, 3, 6, 8]
    assert uniform_indices(1, 7) == [3]
    assert uniform_indices(8, 50) == [3, 9, 15, 21, 28, 34, 40, 46]
    assert uniform_indices(5, 3) == [0, 1, 2]  # fewer frames than asked: all of them
    with pytest.raises(ValueError, match="num_frames"):
        uniform_indices(0, 10)


def test_reference_eval_rule():
    # 40 s at 10 fps: one frame per second, already a multiple of 4 and >= 32.
    assert reference_eval_indices(400, 10.0) == list(range(0, 400, 10))
    # 39 frames -> padded to 40 by repeating the last index.
    assert reference_eval_indices(390, 10.0) == list(range(0, 390, 10)) + [380]
    # 300 s -> the FIRST 256 seconds (truncation, not uniform subsampling).
    assert reference_eval_indices(3000, 10.0) == list(range(0, 2560, 10))
    # Too short: padding first ([0, 10] -> [0, 10, 10, 10]), then the uniform fallback if still < min_frames.
    assert reference_eval_indices(20, 10.0, min_frames=4) == [0, 10, 10, 10]
    assert reference_eval_indices(20, 10.0, min_frames=5) == [2, 6, 10, 14, 18]
    assert reference_eval_indices(100, 10.0) == uniform_indices(32, 100)
    # Round half to even (torch.round): arange(0, 100, 12.5) -> 0 12.5 25 37.5 50 62.5 75 87.5
    assert reference_eval_indices(100, 25.0, fps=2.0, min_frames=1) == [0, 12, 25, 38, 50, 62, 75, 88]
    # An index that rounds up to `total` is dropped: arange(0, 10, 9.8) -> [0, 9.8] -> [0, 10] -> [0] -> padded.
    assert reference_eval_indices(10, 9.8, min_frames=1) == [0, 0, 0, 0]
    assert sample_frame_indices(400, 10.0, sampling="reference_eval") == list(range(0, 400, 10))


def test_fps_rule_segment_starts():
    assert sample_frame_indices(100, 10.0, fps=1.0) == list(range(0, 100, 10))
    assert sample_frame_indices(100, 25.0, fps=2.0) == [0, 12, 25, 38, 50, 62, 75, 88]
    assert sample_frame_indices(95, 10.0, fps=1.0) == list(range(0, 95, 10))  # 9.5 s -> 10 segments
    # Window [2 s, 5 s) at 10 fps: segment starts 2, 3, 4 s.
    assert sample_frame_indices(100, 10.0, fps=1.0, start=2.0, end=5.0) == [20, 30, 40]
    # Window from 0.55 s: frames 5.5 -> 6 (half to even), 15.5 -> 16, ...
    assert sample_frame_indices(40, 10.0, fps=1.0, start=0.55) == [6, 16, 26, 36]
    assert sample_frame_indices(100, 10.0, fps=1.0, end=3.0) == [0, 10, 20]
    # fps rule giving more than max_frames: uniform subsampling of its 100 frames (positions 12, 37, 62, 87).
    assert sample_frame_indices(1000, 10.0, fps=1.0, max_frames=4) == [120, 370, 620, 870]
    # fewer than min_frames: uniform midpoints of the window instead.
    assert sample_frame_indices(50, 10.0, fps=1.0, min_frames=8) == [3, 9, 15, 21, 28, 34, 40, 46]
    # neither fps nor num_frames: every frame (of the window).
    assert sample_frame_indices(5, None) == [0, 1, 2, 3, 4]


def test_fps_above_the_frame_rate_is_capped():
    """fps above the video's rate samples every frame once (with a warning) instead of repeating each frame."""
    with pytest.warns(UserWarning, match=r"fps=60.0 is above the video's frame rate \(25.000"):
        assert sample_frame_indices(50, 25.0, fps=60.0) == list(range(50))
    with pytest.warns(UserWarning, match="above"):  # a window starting mid-frame: still each frame once
        assert sample_frame_indices(50, 25.0, fps=60.0, start=0.3, end=0.5) == [7, 8, 9, 10, 11, 12]
    with pytest.warns(UserWarning, match="repeats frames"):  # reference_eval reproduces the reference
        indices = sample_frame_indices(4, 2.0, fps=4.0, sampling="reference_eval", min_frames=1)
    assert indices == [0, 0, 1, 2, 2, 2, 3, 3]  # round(arange(0, 4, 0.5)) without the 4, padded to 8


def test_window_keeps_the_frame_on_screen_at_start():
    """start=7.3 s at 25 fps is frame 182.5: frame 182 is on screen then, and is sampled."""
    assert sample_frame_indices(300, 25.0, fps=1.0, start=7.3, end=10.0) == [182, 208, 232]
    assert sample_frame_indices(300, 25.0, start=7.3, end=7.4) == [182, 183, 184]  # on screen during [7.3, 7.4)


def test_num_frames_rule():
    assert sample_frame_indices(10, None, num_frames=4) == [1, 3, 6, 8]
    assert sample_frame_indices(100, 10.0, num_frames=4, start=2.0, end=6.0) == [25, 35, 45, 55]
    assert sample_frame_indices(3, 30.0, num_frames=8) == [0, 1, 2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fps": 1.0, "num_frames": 4}, "mutually exclusive"),
        ({"num_frames": 0}, "num_frames"),
        ({"fps": 0.0}, "fps"),
        ({"start": 5.0, "end": 5.0}, "before"),
        ({"start": 6.0, "end": 2.0}, "before"),
        ({"start": 10.0}, "beyond the video's duration"),
        ({"start": -1.0}, ">= 0"),
        ({"max_frames": 0}, "max_frames"),
        ({"sampling": "reference_eval", "num_frames": 4}, "num_frames"),
        ({"sampling": "reference_eval", "start": 1.0}, "start"),
        ({"sampling": "nearest"}, "Unknown sampling"),
    ],
)
def test_sampling_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_frame_indices(100, 10.0, **kwargs)


def test_fps_needs_frame_rate():
    with pytest.raises(ValueError, match="frame rate"):
        sample_frame_indices(100, None, fps=1.0)


# ----------------------------------------------------------------------------------------------------------------
# Seek-based decoding
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "indices",
    [
        [0],
        [299],
        [0, 1, 2, 3],
        [19, 20, 21],  # around a keyframe
        list(range(0, 300, 25)),  # 1 fps
        [299, 0, 150, 150, 7],  # unsorted with repeats
        [3, 97, 98, 211, 212, 213, 290],
        list(range(300)),
    ],
)
def test_seek_decode_equals_full_decode(videos, indices):
    full = decode_all_frames(videos["gop20"])
    frames, metadata = decode_video_pyav(videos["gop20"], indices)
    assert frames.shape == (len(indices), 48, 64, 3) and frames.dtype == np.uint8
    assert [frame_index_from_pixels(f) for f in frames] == indices
    for frame, index in zip(frames, indices):
        np.testing.assert_array_equal(frame, full[index])  # bit-identical to the sequential decode
    assert metadata.frames_indices == indices


@pytest.mark.parametrize("name", ["mpeg4", "ntsc", "gop50"])
def test_seek_decode_other_codecs_and_rates(videos, name):
    full = decode_all_frames(videos[name])
    total = len(full)
    indices = sorted(set([0, total - 1] + uniform_indices(9, total) + list(range(0, total, 13))))
    frames, _ = decode_video_pyav(videos[name], indices)
    assert [frame_index_from_pixels(f) for f in frames] == indices
    for frame, index in zip(frames, indices):
        np.testing.assert_array_equal(frame, full[index])


def test_seek_decode_skips_unneeded_frames(videos):
    # 1 fps on a 2 s GOP (50 frames at 25 fps): each GOP needs frames 0..~25 only.
    stats = {}
    indices = list(range(0, 500, 25))
    frames, _ = decode_video_pyav(videos["gop50"], indices, stats=stats)
    assert [frame_index_from_pixels(f) for f in frames] == indices
    assert stats["decoded_packets"] < 0.7 * 500, stats
    # Sparse frames far apart: seeks, and decodes a small part of the file.
    stats = {}
    indices = [30, 260, 480]
    frames, _ = decode_video_pyav(videos["gop50"], indices, stats=stats)
    assert [frame_index_from_pixels(f) for f in frames] == indices
    assert stats["seeks"] >= 3 and stats["decoded_packets"] < 120, stats


def test_seek_decode_long_gop_terminates(tmp_path):
    """A wanted frame deep in a GOP longer than the seek threshold (8 s here) must not cause repeated seeks."""
    path = write_test_video(tmp_path / "long_gop.mp4", num_frames=420, fps=25, size=(32, 32), keyint=200)
    stats = {}
    indices = [5, 150, 390, 410]
    frames, _ = decode_video_pyav(path, indices, stats=stats)
    assert [frame_index_from_pixels(f) for f in frames] == indices
    assert stats["seeks"] <= 3, stats


def test_metadata(videos):
    frames, metadata = decode_video_pyav(videos["gop20"], [0, 25, 50])
    assert metadata.total_num_frames == 300
    assert metadata.fps == pytest.approx(25.0)
    assert metadata.duration == pytest.approx(12.0, abs=0.05)
    assert (metadata.width, metadata.height) == (64, 48)
    assert metadata.video_backend == "pyav"
    assert metadata.timestamps == pytest.approx([0.0, 1.0, 2.0])
    _, ntsc = decode_video_pyav(videos["ntsc"], [0, 30])
    assert ntsc.fps == pytest.approx(29.97, abs=1e-3)
    assert ntsc.timestamps == pytest.approx([0.0, 30 / 29.97], abs=1e-3)


def test_decode_from_bytes_and_file_object(videos):
    data = videos["gop20"].read_bytes()
    from_bytes, _ = decode_video_pyav(data, [5, 100])
    from_file, _ = decode_video_pyav(io.BytesIO(data), [5, 100])
    with open(videos["gop20"], "rb") as handle:
        from_handle, _ = decode_video_pyav(handle, [5, 100])
    for frames in (from_bytes, from_file, from_handle):
        assert [frame_index_from_pixels(f) for f in frames] == [5, 100]


def test_decode_errors(tmp_path):
    missing = tmp_path / "missing_clip.mp4"
    with pytest.raises(ValueError, match="missing_clip.mp4"):
        decode_video_pyav(missing, [0])
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
        decode_video_pyav(str(missing), [0])
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="corrupt"):
        decode_video_pyav(corrupt, [0])
    with pytest.raises(ValueError, match="empty"):
        decode_video_pyav(b"", [0])


# ----------------------------------------------------------------------------------------------------------------
# Variable frame rate, odd sizes, short videos, other containers, bad input
# ----------------------------------------------------------------------------------------------------------------

# Presentation times (ms, time base 1/1000) of a 40-frame variable-frame-rate video, gaps of 20-120 ms:
# 0 100 120 160 200 240 340 460 540 560 580 620 680 760 820 860 880 980 1080 1100 1120 1180 1240 1360 1440 1500 ...
VFR_MS = vfr_timestamps(40, seed=3)


@pytest.fixture(scope="module")
def vfr_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("vfr")
    return {
        container: Path(write_test_video(root / f"vfr.{container}", pts=VFR_MS, keyint=8, size=(32, 32)))
        for container in ("mp4", "mkv")
    }


def shown_at(times_ms, t_seconds) -> int:
    """Oracle: the frame on screen at time t, the last one with pts <= t."""
    return max(i for i, pts in enumerate(times_ms) if pts <= round(t_seconds * 1000))


def test_sampling_by_frame_times():
    """Hand-computed: the sample at time t is the frame on screen at t; windows hold the frames shown in them."""
    times = [0.0, 0.1, 0.15, 0.5, 0.62, 1.3, 1.32, 2.0]
    sample = lambda **kw: sample_frame_indices(8, 3.8, frame_times=times, video_duration=2.1, **kw)  # noqa: E731
    assert sample(fps=1.0) == [0, 4, 7]  # t = 0, 1, 2 s
    assert sample(fps=2.0) == [0, 3, 4, 6, 7]  # t = 0, 0.5, 1, 1.5, 2 s
    assert sample(fps=2.0, start=0.55, end=1.5) == [3, 4]  # t = 0.55 (frame 3 since 0.5 s), 1.05 s
    assert sample(start=0.55, end=1.31) == [3, 4, 5]  # every frame on screen during [0.55, 1.31)
    assert sample(num_frames=2) == [2, 6]  # uniform over frame indices, as for a constant rate
    assert sample(fps=2.0, max_frames=2) == [3, 6]  # positions 1 and 3 of the five
    # Faster than the video's (mean) rate, 3.8 fps: capped at it with a warning, t = k / 3.8 -> 0, 0.26, 0.53, 0.79,
    # 1.05, 1.32, 1.58, 1.84 s; a frame still repeats where the video is locally slower (frames 4 and 6).
    with pytest.warns(UserWarning, match="above the video's frame rate"):
        assert sample(fps=30.0) == [0, 2, 3, 4, 4, 5, 6, 6]
    assert sample(sampling="reference_eval", min_frames=1) == [0, 4, 4, 4]  # by index at 3.8 fps, as the reference
    with pytest.raises(ValueError, match="beyond"):
        sample(start=2.2)
    with pytest.raises(ValueError, match="before"):
        sample(start=1.0, end=1.0)
    with pytest.raises(ValueError, match="one time per frame"):
        sample_frame_indices(7, None, frame_times=times, fps=1.0)
    with pytest.raises(ValueError, match="ascending"):
        sample_frame_indices(8, None, frame_times=times[::-1], fps=1.0)
    # Default duration: last time + mean interval (2.0 + 2/7), so t = 0, 1, 2 s at fps=1 as well.
    assert sample_frame_indices(8, None, frame_times=times, fps=1.0) == [0, 4, 7]


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_vfr_decode_content_and_timestamps(vfr_videos, container):
    path = vfr_videos[container]
    stats = {}
    indices = [39, 0, 5, 17, 17, 30]
    frames, metadata = decode_video_pyav(path, indices, stats=stats)
    assert [frame_index_from_pixels(f) for f in frames] == indices
    assert metadata.timestamps == pytest.approx([VFR_MS[i] / 1000 for i in indices], abs=1e-6)
    assert metadata.total_num_frames == 40
    assert metadata.frame_times == pytest.approx([t / 1000 for t in VFR_MS], abs=1e-6)
    assert VFR_MS[-1] / 1000 < metadata.duration < VFR_MS[-1] / 1000 + 0.13
    assert metadata.fps == pytest.approx(40 / metadata.duration)
    assert stats["scanned_packets"] == 40  # the frame table came from one demux pass
    # Bit-identical to a sequential decode.
    full = decode_all_frames(path)
    for frame, index in zip(frames, indices):
        np.testing.assert_array_equal(frame, full[index])


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_vfr_processor_samples_by_real_time(vfr_videos, container):
    processor = TimeViperVideoProcessor(size=SIZE)
    path = vfr_videos[container]
    for kwargs, times in [
        ({}, [0.0, 1.0, 2.0]),  # default 1 fps over the ~2.7 s video
        ({"fps": 4.0, "start": 0.5, "end": 1.5}, [0.5, 0.75, 1.0, 1.25]),
    ]:
        out = processor(path, **kwargs)
        expected = [shown_at(VFR_MS, t) for t in times]
        metadata = out["video_metadata"][0]
        assert metadata.frames_indices == expected, kwargs
        assert indices_from_pixel_values(out["pixel_values_videos"]) == expected, kwargs
        assert metadata.timestamps == pytest.approx([VFR_MS[i] / 1000 for i in expected], abs=1e-6)
    assert processor(path)["video_metadata"][0].frames_indices == [0, 17, 31]  # not round(k * mean fps) = 15, 31
    with pytest.raises(ValueError, match="before"):
        processor(path, start=1.0, end=1.0)


def test_constant_rate_is_recognised_from_the_frame_index(videos):
    """Every frame on a 25 fps grid: a constant rate (the reference's index rule applies), from one demux pass."""
    stats = {}
    _, metadata = decode_video_pyav(videos["gop20"], [0, 250], stats=stats)
    assert stats["scanned_packets"] == 300 and metadata.frame_times is None
    assert metadata.fps == pytest.approx(25.0) and metadata.duration == pytest.approx(12.0)
    assert metadata.timestamps == pytest.approx([0.0, 10.0])


@pytest.mark.parametrize(
    "suffix, codec, pix_fmt",
    [("mp4", "libx264", "yuv444p"), ("webm", "libvpx-vp9", "yuv420p")],
)
def test_odd_frame_size(tmp_path, suffix, codec, pix_fmt):
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} not in this FFmpeg")
    path = write_test_video(tmp_path / f"odd.{suffix}", num_frames=30, fps=25, size=(63, 37), keyint=10,
                            codec=codec, pix_fmt=pix_fmt)
    indices = [0, 11, 25, 29]
    frames, metadata = decode_video_pyav(path, indices)
    assert frames.shape == (4, 37, 63, 3)
    assert (metadata.width, metadata.height) == (63, 37)
    assert [frame_index_from_pixels(f) for f in frames] == indices
    full = decode_all_frames(path)
    for frame, index in zip(frames, indices):
        np.testing.assert_array_equal(frame, full[index])
    out = TimeViperVideoProcessor(size=SIZE)(path)
    assert out["pixel_values_videos"].shape == (2, 3, 28, 28)  # 1.2 s at 1 fps
    assert indices_from_pixel_values(out["pixel_values_videos"]) == [0, 25]


def test_video_shorter_than_one_second(tmp_path):
    path = write_test_video(tmp_path / "short.mp4", num_frames=10, fps=25, size=(32, 32), keyint=10)  # 0.4 s
    processor = TimeViperVideoProcessor(size=SIZE)
    for kwargs in ({}, {"fps": 1.0}, {"fps": 0.1}):
        out = processor(path, **kwargs)
        assert out["video_num_frames"].tolist() == [1], kwargs
        assert indices_from_pixel_values(out["pixel_values_videos"]) == [0]
        assert out["video_metadata"][0].timestamps == [0.0]
    out = processor(path, fps=1.0, start=0.2)
    assert indices_from_pixel_values(out["pixel_values_videos"]) == [5]
    assert out["video_metadata"][0].duration == pytest.approx(0.4)


@pytest.mark.parametrize(
    "suffix, codec",
    [("mkv", "libx264"), ("webm", "libvpx-vp9"), ("webm", "libvpx"), ("avi", "mpeg4")],
)
def test_other_containers(tmp_path, suffix, codec):
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} not in this FFmpeg")
    path = write_test_video(tmp_path / f"clip_{codec}.{suffix}", num_frames=75, fps=25, size=(32, 32), keyint=20,
                            codec=codec)
    indices = [74, 0, 19, 20, 21, 50]
    frames, metadata = decode_video_pyav(path, indices)
    assert metadata.total_num_frames == 75 and metadata.fps == pytest.approx(25.0)
    assert metadata.frame_times is None  # constant rate: the reference's index rule applies
    assert [frame_index_from_pixels(f) for f in frames] == indices
    full = decode_all_frames(path)
    for frame, index in zip(frames, indices):
        np.testing.assert_array_equal(frame, full[index])
    out = TimeViperVideoProcessor(size=SIZE)(path, fps=2.0)
    assert indices_from_pixel_values(out["pixel_values_videos"]) == [0, 12, 25, 38, 50, 62]


def test_stream_without_timestamps(tmp_path):
    """A raw H.264 elementary stream: no frame count, no timestamps; frames are counted while decoding."""
    if "libx264" not in av.codecs_available:
        pytest.skip("libx264 not in this FFmpeg")
    path = write_test_video(tmp_path / "raw.h264", num_frames=60, fps=25, size=(32, 32), keyint=10)
    stats = {}
    frames, metadata = decode_video_pyav(path, [59, 3, 30], stats=stats)
    assert [frame_index_from_pixels(f) for f in frames] == [59, 3, 30]
    assert metadata.total_num_frames == 60 and stats["scanned_packets"] == 60
    assert metadata.timestamps == pytest.approx([59 / 25, 3 / 25, 30 / 25])
    out = TimeViperVideoProcessor(size=SIZE)(path.read_bytes())
    assert indices_from_pixel_values(out["pixel_values_videos"]) == [0, 25, 50]


def test_bad_video_inputs(tmp_path):
    processor = TimeViperVideoProcessor(size=SIZE)
    audio_codecs = [("wav", "pcm_s16le"), ("m4a", "aac")]
    for suffix, codec in audio_codecs:
        if codec not in av.codecs_available:
            continue
        path = write_audio_only(tmp_path / f"only_sound.{suffix}", codec=codec)
        for call in (lambda: decode_video_pyav(path, [0]), lambda: processor(str(path))):
            with pytest.raises(ValueError, match=rf"only_sound\.{suffix}.*no video stream"):
                call()
    # A video stream without a single packet.
    empty = write_empty_video(tmp_path / "no_frames.avi", codec="mpeg4")
    with pytest.raises(ValueError, match=r"no_frames\.avi.*no frames"):
        decode_video_pyav(empty, sample_indices_fn=lambda m: [0])
    with pytest.raises(ValueError, match=r"no_frames\.avi.*no frames"):
        processor(empty)
    # mp4 drops a track without samples: the file then has no video stream.
    with pytest.raises(ValueError, match=r"no_frames\.mp4.*no video stream"):
        processor(write_empty_video(tmp_path / "no_frames.mp4"))


def test_fps_must_be_positive(videos, vfr_videos):
    processor = TimeViperVideoProcessor(size=SIZE)
    for path in (videos["gop20"], vfr_videos["mkv"]):
        for fps in (0, 0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="fps"):
                processor(path, fps=fps)
    with pytest.raises(ValueError, match="fps"):
        sample_frame_indices(8, None, frame_times=[0.1 * i for i in range(8)], fps=-2.0)


def test_non_seekable_file_object(videos, vfr_videos):
    class Pipe(io.RawIOBase):
        def __init__(self, data):
            self._data = io.BytesIO(data)

        def readable(self):
            return True

        def seekable(self):
            return False

        def readinto(self, buffer):
            chunk = self._data.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    frames, _ = decode_video_pyav(Pipe(videos["gop20"].read_bytes()), [5, 100])
    assert [frame_index_from_pixels(f) for f in frames] == [5, 100]
    frames, metadata = decode_video_pyav(Pipe(vfr_videos["mkv"].read_bytes()), [17])
    assert [frame_index_from_pixels(f) for f in frames] == [17]
    assert metadata.timestamps == pytest.approx([0.98])


# ----------------------------------------------------------------------------------------------------------------
# Video processor
# ----------------------------------------------------------------------------------------------------------------


def test_video_processor_default_one_fps(videos):
    processor = TimeViperVideoProcessor(size=SIZE)
    out = processor(str(videos["gop20"]))
    pixel_values = out["pixel_values_videos"]
    assert pixel_values.shape == (12, 3, 28, 28) and pixel_values.dtype == torch.float32
    assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0
    assert indices_from_pixel_values(pixel_values) == list(range(0, 300, 25))
    assert out["video_num_frames"].tolist() == [12]
    metadata = out["video_metadata"][0]
    assert metadata.frames_indices == list(range(0, 300, 25))
    assert metadata.timestamps == pytest.approx([float(s) for s in range(12)])


def test_video_processor_default_size_is_384():
    processor = TimeViperVideoProcessor()
    frames = np.stack([make_frame(i, (40, 30)) for i in range(2)])
    out = processor(frames)
    assert out["pixel_values_videos"].shape == (2, 3, 384, 384)


def test_video_processor_sampling_options(videos):
    processor = TimeViperVideoProcessor(size=SIZE)
    path = videos["gop20"]
    out = processor(path, num_frames=4)
    assert indices_from_pixel_values(out["pixel_values_videos"]) == [37, 112, 187, 262]
    out = processor(path, fps=2.0, start=2.0, end=4.0)
    assert out["video_metadata"][0].frames_indices == [50, 62, 75, 88]  # 2.0, 2.5, 3.0, 3.5 s (62.5 -> 62)
    assert indices_from_pixel_values(out["pixel_values_videos"]) == [50, 62, 75, 88]
    out = processor(path, max_frames=3)
    assert out["video_metadata"][0].frames_indices == [50, 150, 250]  # 3 of the 12 one-per-second frames
    out = processor(path, sampling="reference_eval")
    assert out["video_metadata"][0].frames_indices == uniform_indices(32, 300)  # 12 s < 32 frames: fallback
    out = processor(path, sampling="reference_eval", min_frames=4)
    assert out["video_metadata"][0].frames_indices == list(range(0, 300, 25))
    # Per-video dict options override the call's.
    out = processor([path, {"path": path, "num_frames": 2}], fps=0.5)
    assert out["video_num_frames"].tolist() == [6, 2]
    assert indices_from_pixel_values(out["pixel_values_videos"]) == list(range(0, 300, 50)) + [75, 225]


def test_video_processor_input_types(videos):
    processor = TimeViperVideoProcessor(size=SIZE)
    path = videos["gop20"]
    expected = list(range(0, 300, 25))
    frames_thwc = np.stack([make_frame(i, (32, 24)) for i in range(6)])
    inputs = {
        "str": str(path),
        "path": path,
        "bytes": path.read_bytes(),
        "file": io.BytesIO(path.read_bytes()),
        "dict": {"video": str(path)},
    }
    for name, video in inputs.items():
        out = processor(video)
        assert indices_from_pixel_values(out["pixel_values_videos"]) == expected, name
    # Decoded frames are used as they are (no frame rate known) ...
    for name, video in {
        "array_thwc": frames_thwc,
        "array_tchw": np.ascontiguousarray(frames_thwc.transpose(0, 3, 1, 2)),
        "tensor_thwc": torch.from_numpy(frames_thwc),
        "tensor_tchw": torch.from_numpy(frames_thwc).permute(0, 3, 1, 2),
        "pil_list": [PIL.Image.fromarray(f) for f in frames_thwc],
        "array_list": list(frames_thwc),
    }.items():
        out = processor(video)
        assert indices_from_pixel_values(out["pixel_values_videos"]) == list(range(6)), name
        assert out["video_metadata"][0].fps is None
    # ... or sampled when num_frames or their frame rate is given.
    out = processor(frames_thwc, num_frames=3)
    assert indices_from_pixel_values(out["pixel_values_videos"]) == [1, 3, 5]
    out = processor(frames_thwc, video_metadata={"fps": 2.0})  # 3 s at 2 fps -> 1 fps sampling
    assert indices_from_pixel_values(out["pixel_values_videos"]) == [0, 2, 4]
    # A batch mixing kinds; frames of all videos are concatenated in order.
    out = processor([frames_thwc, str(path), [PIL.Image.fromarray(f) for f in frames_thwc[:2]]])
    assert out["video_num_frames"].tolist() == [6, 12, 2]
    assert indices_from_pixel_values(out["pixel_values_videos"]) == list(range(6)) + expected + [0, 1]
    # A 5-D batch.
    out = processor(np.stack([frames_thwc, frames_thwc]))
    assert out["pixel_values_videos"].shape == (12, 3, 28, 28)


def test_video_processor_errors(videos, tmp_path):
    processor = TimeViperVideoProcessor(size=SIZE)
    with pytest.raises(ValueError, match="empty"):
        processor([])
    with pytest.raises(ValueError, match="mutually exclusive"):
        processor(videos["gop20"], fps=1.0, num_frames=4)
    with pytest.raises(ValueError, match="mutually exclusive"):
        processor({"path": videos["gop20"], "fps": 1.0, "num_frames": 4})
    with pytest.raises(ValueError, match="before"):
        processor(videos["gop20"], start=3.0, end=2.0)
    with pytest.raises(ValueError, match="beyond"):
        processor(videos["gop20"], start=60.0)
    with pytest.raises(ValueError, match="num_frames"):
        processor(videos["gop20"], num_frames=0)
    with pytest.raises(ValueError, match="nowhere.mp4"):
        processor(str(tmp_path / "nowhere.mp4"))
    with pytest.raises(ValueError, match="uint8"):
        processor(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="frame rate"):
        processor(np.zeros((4, 8, 8, 3), dtype=np.uint8), fps=1.0)
    with pytest.raises(TypeError, match="num_frame"):
        processor(videos["gop20"], num_frame=3)


def test_transform_matches_reference_pipeline():
    """Squash resize with PIL bicubic, ToTensor (/255), Normalize(0.5, 0.5): bit-exact."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    expected = np.asarray(PIL.Image.fromarray(image).resize((28, 28), PIL.Image.Resampling.BICUBIC))
    expected = (torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    out = transform_frames([image], size=SIZE)
    assert out.shape == (1, 3, 28, 28)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=0)
    # RGBA is composited on white, grayscale is replicated.
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    assert torch.all(transform_frames([rgba], size=4, do_resize=False) == 1.0)
    gray = PIL.Image.fromarray(np.full((4, 4), 255, dtype=np.uint8), mode="L")
    assert torch.all(transform_frames([gray], size=4) == 1.0)


def test_image_processor():
    processor = TimeViperImageProcessor(size=SIZE)
    images = [PIL.Image.fromarray(make_frame(i, (30, 20))) for i in (3, 9)]
    out = processor(images)
    assert out["pixel_values"].shape == (2, 3, 28, 28)
    assert indices_from_pixel_values(out["pixel_values"]) == [3, 9]
    out = processor(make_frame(5, (30, 20)))
    assert indices_from_pixel_values(out["pixel_values"]) == [5]


def test_image_processor_paths(tmp_path):
    path = tmp_path / "frame.png"
    PIL.Image.fromarray(make_frame(7, (30, 20))).save(path)
    processor = TimeViperImageProcessor(size=SIZE)
    assert indices_from_pixel_values(processor([path, str(path)])["pixel_values"]) == [7, 7]
    with pytest.raises(ValueError, match="no_such_image.png"):
        processor(str(tmp_path / "no_such_image.png"))


def test_progress_bar_while_decoding(videos, capsys):
    indices = list(range(0, 300, 25))
    plain, _ = decode_video_pyav(videos["gop20"], indices)
    shown, _ = decode_video_pyav(videos["gop20"], indices, progress=True)
    np.testing.assert_array_equal(shown, plain)
    assert "decoding" in capsys.readouterr().err
    processor = TimeViperVideoProcessor(size=SIZE)
    processor(videos["gop20"], num_frames=4, progress=True)
    assert "decoding" in capsys.readouterr().err
