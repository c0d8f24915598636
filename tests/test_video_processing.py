"""Frame sampling, seek-based PyAV decoding and the video/image transforms of processing_timeviper.

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

from timeviper.processing_timeviper import (
    TimeViperImageProcessor,
    TimeViperVideoProcessor,
    decode_video_pyav,
    reference_eval_indices,
    sample_frame_indices,
    transform_frames,
    uniform_indices,
)
from tiny_assets import decode_all_frames, frame_index_from_pixels, make_frame, write_test_video


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
