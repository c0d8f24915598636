"""Decoding over a corpus of containers and codecs: every returned frame is the one its metadata names.

The corpus is written here with PyAV's encoders (x264, x265, SVT-AV1, libvpx-vp9, mpeg4, mjpeg, prores_ks) into
MP4, Matroska/WebM, AVI, MOV and MPEG-TS, a few seconds at 64x48 each. Frame ``i`` shows the number ``i`` in its
pixels (`tiny_assets.make_frame`). The oracle is an independent full decode: a plain PyAV loop over every frame,
sorted by presentation timestamp. For each file and each sampling rule, `decode_video_pyav` must return exactly
the frames its ``frames_indices`` name (the pixels' numbers, and bit for bit the oracle's frames), at the oracle's
timestamps, with the oracle's frame count.
"""

import os
import warnings
from fractions import Fraction

import numpy as np
import pytest

from timeviper.video_processing_timeviper import (
    VideoDecodeError,
    decode_video_pyav,
    sample_frame_indices,
)
from tiny_assets import frame_index_from_pixels, make_frame, vfr_timestamps


av = pytest.importorskip("av")

SIZE = (64, 48)


def encode(path, codec, num_frames=75, fps=25, size=SIZE, pix_fmt="yuv420p", options=None, gop=None, bframes=None,
           first_pts=0, pts=None, time_base=None, rotation=None, sar=None, container_options=None, audio=None):
    """Write frames 0..num_frames-1 (each showing its index) with one encoder; returns the path.

    pts/time_base: explicit presentation timestamps (a variable frame rate). first_pts: a constant rate that starts
    late. audio: ``(first second, last second)`` of a tone in a second stream.
    """
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} is not in this FFmpeg build")
    rate = Fraction(fps).limit_denominator(1001)
    time_base = time_base or 1 / rate
    pts = pts or [first_pts + i for i in range(num_frames)]
    with av.open(os.fspath(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = pix_fmt
        stream.codec_context.time_base = time_base
        if gop is not None:
            stream.codec_context.gop_size = gop
        if bframes is not None:
            stream.codec_context.max_b_frames = bframes
        if sar is not None:
            stream.codec_context.sample_aspect_ratio = sar
        if rotation is not None:
            stream.set_display_rotation(rotation)
        stream.options = options or {}
        tone = container.add_stream("aac", rate=8000) if audio else None
        if tone is not None:
            tone.layout = "mono"
            _write_tone(container, tone, *audio)
        for i, p in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(make_frame(i, size, texture=True), format="rgb24")
            frame.pts, frame.time_base = p, time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _write_tone(container, stream, first: float, last: float) -> None:
    rate = 8000
    samples = (np.sin(np.arange(int((last - first) * rate)) * 0.3) * 8000).astype(np.float32)[None, :]
    frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = rate, int(first * rate), Fraction(1, rate)
    for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def x264(keyint, bframes=3, extra=""):
    return {"preset": "veryfast", "crf": "16",
            "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes={bframes}{extra}"}


def x265(keyint):
    return {"preset": "ultrafast", "crf": "16",
            "x265-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes=3:log-level=error"}


# name -> (file name, encode kwargs): the common codecs and containers, and the inputs that trip up seeking.
CORPUS = {
    "h264_bframes": ("h264.mp4", dict(codec="libx264", options=x264(25))),
    "h264_open_gop": ("open_gop.mkv", dict(codec="libx264", options=x264(20, extra=":open-gop=1"))),
    "h264_long_gop": ("long_gop.mp4", dict(codec="libx264", num_frames=150, options=x264(400))),
    "hevc8_mp4": ("hevc8.mp4", dict(codec="libx265", num_frames=60, options=x265(20))),
    "hevc10_mkv": ("hevc10.mkv", dict(codec="libx265", num_frames=60, pix_fmt="yuv420p10le", options=x265(20))),
    # Fixed quantiser 2 (lambda 2 * 118): at the default 200 kb/s the B-frames blur the pixel code.
    "mpeg4_avi_bframes": ("mpeg4.avi", dict(codec="mpeg4", gop=12, bframes=2,
                                            options={"flags": "+qscale", "global_quality": "236"})),
    "vp9_webm": ("vp9.webm", dict(codec="libvpx-vp9", gop=20, options={"crf": "10", "b": "0", "cpu-used": "8"})),
    "av1_mkv": ("av1.mkv", dict(codec="libsvtav1", num_frames=60,
                                options={"preset": "12", "crf": "20", "svtav1-params": "keyint=20"})),
    "mjpeg_avi": ("mjpeg.avi", dict(codec="mjpeg", num_frames=40, pix_fmt="yuvj420p")),
    "prores_mov": ("prores.mov", dict(codec="prores_ks", num_frames=40, pix_fmt="yuv422p10le")),
    "mpegts": ("h264.ts", dict(codec="libx264", num_frames=100, options=x264(25, bframes=2))),
    "mpegts_interlaced": ("interlaced.ts", dict(codec="libx264", num_frames=100,
                                                options=x264(25, bframes=2, extra=":interlaced=1:tff=1"))),
    "rotated": ("rotated.mp4", dict(codec="libx264", num_frames=50, options=x264(25), rotation=90)),
    "non_square_pixels": ("sar.mp4", dict(codec="libx264", num_frames=50, size=(32, 48), sar=Fraction(2, 1),
                                          options=x264(25))),
    "variable_rate": ("vfr.mkv", dict(codec="libx264", pts=vfr_timestamps(60, seed=5), time_base=Fraction(1, 1000),
                                      options=x264(10))),
    "start_offset": ("offset.mp4", dict(codec="libx264", num_frames=60, first_pts=40, options=x264(25))),
    "audio_first_and_longer": ("audio.mkv", dict(codec="libx264", num_frames=50, first_pts=12, options=x264(25),
                                                 audio=(0.0, 4.0))),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return {name: encode(root / file, **kwargs) for name, (file, kwargs) in CORPUS.items()}


def full_decode(path):
    """Oracle: every frame by a plain decode loop, sorted by pts -> (RGB frames, times in seconds, rotation)."""
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        decoded = sorted(((f.pts, f.to_ndarray(format="rgb24"), f.rotation) for f in container.decode(stream)),
                         key=lambda item: item[0])
        time_base = float(stream.time_base)
    times = [(pts - decoded[0][0]) * time_base for pts, _, _ in decoded]
    return [rgb for _, rgb, _ in decoded], times, decoded[0][2]


def as_displayed(rgb, rotation):
    """The oracle's frame turned as FFmpeg's command line shows it (``rotation`` counter-clockwise)."""
    return np.rot90(rgb, k=rotation // 90) if rotation else rgb


RULES = [
    {"fps": 1.0},
    {"fps": 3.0, "start": 0.5, "end": 2.5},  # frame 12.5 at 25 fps: frame 12 is on screen at start
    {"num_frames": 5},
    {"fps": 10.0, "max_frames": 4},
    {"num_frames": 3, "start": 1.1},
    {"sampling": "reference_eval", "min_frames": 4},
    {},  # every frame
]


def sampler(rule):
    """The processor's sampling (`sample_frame_indices` on the decoder's metadata) for one rule."""
    def indices(metadata):
        return sample_frame_indices(metadata.total_num_frames, metadata.fps, frame_times=metadata.frame_times,
                                    video_duration=metadata.duration if metadata.frame_times else None, **rule)
    return indices


@pytest.mark.parametrize("name", list(CORPUS))
def test_every_rule_returns_the_frames_its_metadata_names(corpus, name):
    path = corpus[name]
    oracle, times, rotation = full_decode(path)
    total = len(oracle)
    # The corpus itself: every frame decodes to its own number, in pts order.
    assert [frame_index_from_pixels(f) for f in oracle] == list(range(total)), name
    gaps = np.diff(times)
    constant = np.allclose(gaps, gaps[0], atol=1e-4)
    for rule in RULES:
        frames, metadata = decode_video_pyav(path, sample_indices_fn=sampler(rule))
        expected = sample_frame_indices(
            total, 1 / gaps[0] if constant else metadata.fps, frame_times=None if constant else times,
            video_duration=None if constant else metadata.duration, **rule,
        )
        assert metadata.total_num_frames == total, (name, rule)
        assert metadata.frames_indices == expected, (name, rule)
        assert metadata.timestamps == pytest.approx([times[i] for i in expected], abs=1e-6), (name, rule)
        if name == "non_square_pixels":
            assert frames.shape[1:] == (48, 64, 3)  # 32 coded columns shown twice as wide
            assert [frame_index_from_pixels(f) for f in frames] == expected, (name, rule)
            continue
        for frame, index in zip(frames, expected):
            np.testing.assert_array_equal(frame, as_displayed(oracle[index], rotation), err_msg=f"{name} {rule}")
            if not rotation:
                assert frame_index_from_pixels(frame) == index, (name, rule)
    if constant:  # frame i is shown during [i, i + 1) frame intervals; from the video stream, not the container
        assert metadata.duration == pytest.approx(total * gaps[0], abs=1e-6)
    else:  # the last frame lasts its packet's duration (the gaps here are 20 to 120 ms)
        assert times[-1] < metadata.duration <= times[-1] + 0.12 + 1e-6


@pytest.mark.parametrize("name", ["h264_long_gop", "mpegts", "mpegts_interlaced", "av1_mkv", "mpeg4_avi_bframes",
                                  "h264_open_gop", "vp9_webm", "hevc10_mkv"])
def test_explicit_indices_unsorted_with_repeats(corpus, name):
    oracle, _, _ = full_decode(corpus[name])
    total = len(oracle)
    indices = [total - 1, 0, total // 2, total // 2, 1, total // 3 + 1, total - 2, 0]
    frames, metadata = decode_video_pyav(corpus[name], indices)
    assert metadata.frames_indices == indices
    assert [frame_index_from_pixels(f) for f in frames] == indices
    for frame, index in zip(frames, indices):
        np.testing.assert_array_equal(frame, oracle[index])


@pytest.mark.parametrize("name", list(CORPUS))
def test_seeking_to_every_group_of_pictures(corpus, name, monkeypatch):
    """Seek before every wanted frame's group of pictures (not only across long stretches), backwards too."""
    import timeviper.video_processing_timeviper as ptv

    monkeypatch.setattr(ptv._IndexedDecode, "_SEEK_GOPS", 0)
    oracle, times, rotation = full_decode(corpus[name])
    total = len(oracle)
    indices = [total - 1, 1, total // 2 + 3, total // 2 + 3, 2]  # groups of pictures apart, unsorted, a repeat
    stats = {}
    frames, metadata = decode_video_pyav(corpus[name], indices, stats=stats)
    assert metadata.frames_indices == indices
    assert metadata.timestamps == pytest.approx([times[i] for i in indices], abs=1e-6)
    for frame, index in zip(frames, indices):
        np.testing.assert_array_equal(frame, as_displayed(oracle[index], rotation)
                                      if name != "non_square_pixels" else frame, err_msg=name)
    assert [frame_index_from_pixels(np.rot90(f, k=-rotation // 90)) for f in frames] == indices
    assert stats["seeks"] >= (1 if name == "h264_long_gop" else 2), stats  # one GOP: the seek to its start


def test_rotation_follows_the_display_matrix(corpus):
    frames, metadata = decode_video_pyav(corpus["rotated"], [9])
    # A 90 degree counter-clockwise display matrix (ffprobe: rotation=90): 64x48 pictures shown 48 wide, 64 high;
    # the left half of the coded picture ends up at the bottom, as FFmpeg's command line shows it.
    assert frames.shape == (1, 64, 48, 3) and (metadata.width, metadata.height) == (48, 64)
    assert metadata.rotation == 90
    coded = make_frame(9, SIZE)
    np.testing.assert_allclose(frames[0][48:, 24].mean(axis=0), coded[24, 16], atol=12)  # lossy: a few levels
    np.testing.assert_allclose(frames[0][:16, 24].mean(axis=0), coded[24, 48], atol=12)
    assert frame_index_from_pixels(np.rot90(frames[0], k=-1)) == 9


def test_duration_and_times_come_from_the_video_stream(corpus):
    """Audio from 0 to 4 s, video 50 frames from 0.48 s: duration 2 s, times from the first video frame."""
    _, metadata = decode_video_pyav(corpus["audio_first_and_longer"], [0, 49])
    assert metadata.duration == pytest.approx(2.0) and metadata.total_num_frames == 50
    assert metadata.timestamps == pytest.approx([0.0, 49 / 25])


# ----------------------------------------------------------------------------------------------------------------
# Damaged, truncated and non-video inputs
# ----------------------------------------------------------------------------------------------------------------


def packet_positions(path):
    """(byte offset, size, frame index) of each video packet, from the demuxer."""
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        packets = [(p.pos, p.size, p.pts) for p in container.demux(stream) if p.size]
    order = {pts: i for i, pts in enumerate(sorted(p[2] for p in packets))}
    return [(pos, size, order[pts]) for pos, size, pts in packets]


@pytest.fixture(scope="module")
def faststart(tmp_path_factory):
    """An MP4 with its index first (as streamed files are), 100 frames, a keyframe every 20."""
    root = tmp_path_factory.mktemp("cut")
    return encode(root / "faststart.mp4", "libx264", num_frames=100, options=x264(20, bframes=2),
                  container_options={"movflags": "faststart"})


def test_truncated_file_is_reported_and_only_its_frames_are_used(faststart, tmp_path):
    packets = packet_positions(faststart)
    cut = packets[60][0]  # the file ends where packet 60 (in file order) would start
    path = tmp_path / "truncated.mp4"
    path.write_bytes(faststart.read_bytes()[:cut])
    with pytest.warns(UserWarning, match=r"truncated\.mp4.*truncated: its header lists 100 frames, the file holds 60"):
        frames, metadata = decode_video_pyav(path, sample_indices_fn=lambda m: list(range(m.total_num_frames)))
    held = sorted(index for _, _, index in packets[:60])
    assert metadata.total_num_frames == 60
    assert [frame_index_from_pixels(f) for f in frames] == held  # frames in pts order, each the one named
    assert metadata.frames_indices == list(range(60))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="out of range"):
            decode_video_pyav(path, [60])


def test_damaged_middle_keeps_the_rest_and_names_lost_frames(faststart, tmp_path):
    packets = packet_positions(faststart)
    data = bytearray(faststart.read_bytes())
    # Zero the packets of frames 40..59 (one GOP): the frames of other GOPs still decode.
    damaged = [p for p in packets if 40 <= p[2] < 60]
    for pos, size, _ in damaged:
        data[pos:pos + size] = bytes(size)
    path = tmp_path / "damaged.mp4"
    path.write_bytes(bytes(data))
    good = [0, 10, 39, 60, 75, 99]
    frames, metadata = decode_video_pyav(path, good)
    assert [frame_index_from_pixels(f) for f in frames] == good and metadata.frames_indices == good
    with pytest.raises(VideoDecodeError, match=r"damaged\.mp4.*tolerant=True") as error:
        decode_video_pyav(path, [10, 45, 70])
    lost = [int(i) for i in str(error.value).split("frame(s) ")[1].split(" of video")[0].split(", ")]
    assert lost == [45]
    # Tolerant: the nearest decodable frame stands in, the warning and the metadata say which.
    with pytest.warns(UserWarning, match=r"damaged\.mp4.*45->39"):
        frames, metadata = decode_video_pyav(path, [10, 45, 39, 70], tolerant=True)
    assert metadata.frames_indices == [10, 39, 39, 70]
    assert [frame_index_from_pixels(f) for f in frames] == [10, 39, 39, 70]


@pytest.mark.parametrize("kind", ["text", "png", "jpeg", "directory"])
def test_non_video_inputs_are_rejected(tmp_path, kind):
    import PIL.Image

    if kind == "text":
        path = tmp_path / "notes.txt"
        path.write_text("".join(f"line {i} of a plain text file, not a video\n" for i in range(40)))
        message = r"notes\.txt' is not a video file: it is a text file"
    elif kind == "directory":
        path = tmp_path / "clips"
        path.mkdir()
        message = r"clips' is a directory"
    else:
        path = tmp_path / f"picture.{kind}"
        PIL.Image.fromarray(make_frame(3)).save(path)
        message = rf"picture\.{kind}' is not a video file: it is a still image"
    with pytest.raises(ValueError, match=message):
        decode_video_pyav(path, [0])
    if kind == "directory":
        with pytest.raises(IsADirectoryError):
            decode_video_pyav(path, [0])
