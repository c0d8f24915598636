# Copyright 2026 The TimeViper authors. Licensed under the Apache License, Version 2.0.
"""Processors for TimeViper: video/image preprocessing, seek-based PyAV decoding, prompts and labels.

This is a Hub remote-code file. It imports numpy, torch, PIL, transformers and (for its transformers version guard)
configuration_timeviper at module level; PyAV is optional and imported inside ``try``. Importing it registers
nothing; ``TimeViperProcessor.save_pretrained`` registers the processors for their Auto classes, so that every saved
folder has their ``auto_map`` and this file.

Data flow::

    video file / bytes / frames --decode_video_pyav--> uint8 frames (T, H, W, 3) + VideoMetadata
        --TimeViperVideoProcessor--> pixel_values_videos (sum T, 3, 384, 384), float32 in [-1, 1]
    text with one "<video>" per video --TimeViperProcessor--> "<video>" * (T * tokens_per_frame) --> input_ids

Frame sampling rules (all pure functions of the video's frame count and frame rate, see `sample_frame_indices`):

* ``fps`` (default 1.0): one frame at the start of every ``1/fps`` second segment, counted from ``start``
  (default 0): frame ``round((start + k / fps) * video_fps)`` for ``k = 0, 1, ...`` while the time is before
  ``end``. With ``start=0`` this is the reference's ``round(arange(0, total, video_fps / fps))``. If more than
  ``max_frames`` (default 256) result, ``max_frames`` of them are kept by uniform subsampling; if fewer than
  ``min_frames`` (default: no minimum), ``min_frames`` uniform segment midpoints of the window are used instead.
* ``num_frames``: ``num_frames`` uniform segment midpoints of the window (the reference's ``uniform_indices``); all
  frames of the window when it holds fewer frames than that.
* ``sampling="reference_eval"``: the reference evaluation rule (REFERENCE.md section 4.3) exactly: indices
  ``round(arange(0, total, video_fps / fps))``, the first ``max_frames`` (256) kept, padded to a multiple of 4 by
  repeating the last index, replaced by 32 (``min_frames``) uniform segment midpoints if fewer remain.
* Variable frame rate (`decode_video_pyav` finds the real timestamps of every frame, ``metadata.frame_times``):
  ``fps``, ``start`` and ``end`` work on those times. The sample at time ``t = start + k / fps`` is the frame on
  screen at ``t`` (the last one with a presentation time ``<= t``), so a frame can repeat where the video is slower
  than ``fps``; the window holds the frames on screen during ``[start, end)``. ``num_frames`` (uniform over frame
  indices) and ``reference_eval`` (by index at the mean rate, as the reference) are unchanged.

Decoding (`decode_video_pyav`) seeks to the keyframe before each wanted frame instead of decoding the whole file;
``metadata.timestamps`` are the presentation times of the decoded frames.
"""

import bisect
import io
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch

# First: the configuration's transformers version guard, before the imports an unsupported release may lack.
from .configuration_timeviper import check_transformers_version  # noqa: F401  isort: skip

from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import load_image
from transformers.processing_utils import ImagesKwargs, ProcessorMixin, VideosKwargs
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata


try:
    import av
except ImportError:  # PyAV is only needed to decode video files; decoded frames work without it.
    av = None


__all__ = [
    "CHAT_TEMPLATES",
    "MCQ_ANSWER_PROMPT",
    "TimeViperImageProcessor",
    "TimeViperProcessor",
    "TimeViperVideoMetadata",
    "TimeViperVideoProcessor",
    "build_labels",
    "decode_video_pyav",
    "get_chat_template",
    "grounding_preamble",
    "mcq_prompt",
    "reference_eval_indices",
    "sample_frame_indices",
    "uniform_indices",
]

IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------------------------
# Prompts (REFERENCE.md sections 4.1 and 4.2)
# ----------------------------------------------------------------------------------------------------------------

MCQ_ANSWER_PROMPT = "Best Option: ("
MCQ_INSTRUCTION = "Please provide your answer by stating the letter followed by the full option."
GROUNDING_PREAMBLE = "The video lasts for {} seconds, and {} frames are uniformly sampled from it."

# Content items render in order with no separator: a video item is the single placeholder "<video>" (the processor
# expands it to frames x tokens_per_frame), an image item is "<image>", a text item is its text.
_RENDER_CONTENT_MACRO = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'video' -%}{{ '<video>' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- else -%}{{ raise_exception('Unsupported content type: ' ~ item['type']) }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

# Nemotron-Nano base (`nano_base`):
#   <SPECIAL_10>System\n{system}<SPECIAL_12>\n<SPECIAL_11>User\n{user}\n<SPECIAL_12>
#   <SPECIAL_11>Assistant\n{answer}\n<SPECIAL_12>          (no newlines between the lines shown here)
NEMOTRON_H_CHAT_TEMPLATE = (
    _RENDER_CONTENT_MACRO
    + "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = render_content(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system_text = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{ '<SPECIAL_10>System\\n' ~ system_text ~ '<SPECIAL_12>\\n' }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<SPECIAL_11>User\\n' ~ render_content(message['content']) ~ '\\n<SPECIAL_12>' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<SPECIAL_11>Assistant\\n' ~ render_content(message['content']) ~ '\\n<SPECIAL_12>' }}"
    "{%- else -%}{{ raise_exception('Unsupported role: ' ~ message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<SPECIAL_11>Assistant\\n' }}{%- endif -%}"
)

# Qwen2 (`qwen2`/`default`); turns are joined by "\n", and there is no newline after the last turn:
#   <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>
#   \n<|im_start|>assistant\n{answer}<|im_end|>          (no newlines between the lines shown here)
QWEN2_CHAT_TEMPLATE = (
    _RENDER_CONTENT_MACRO
    + "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = render_content(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system_text = 'You are a helpful assistant.' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{ '<|im_start|>system\\n' ~ system_text ~ '<|im_end|>' }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] in ['user', 'assistant'] -%}"
    "{{ '\\n<|im_start|>' ~ message['role'] ~ '\\n' ~ render_content(message['content']) ~ '<|im_end|>' }}"
    "{%- else -%}{{ raise_exception('Unsupported role: ' ~ message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n<|im_start|>assistant\\n' }}{%- endif -%}"
)

CHAT_TEMPLATES = {"nemotron_h": NEMOTRON_H_CHAT_TEMPLATE, "qwen2": QWEN2_CHAT_TEMPLATE}

# Token that closes every turn (REFERENCE.md section 4.5), and the text that starts a supervised assistant span.
_TURN_SEPARATORS = {"nemotron_h": "<SPECIAL_12>", "qwen2": "<|im_end|>"}
_ASSISTANT_HEADERS = {"<SPECIAL_12>": "<SPECIAL_11>Assistant\n", "<|im_end|>": "\n<|im_start|>assistant\n"}


def get_chat_template(backbone: str) -> str:
    """Return the chat template of a language backbone: ``"nemotron_h"`` (Nemotron-Nano base) or ``"qwen2"``."""
    if backbone not in CHAT_TEMPLATES:
        raise ValueError(f"Unknown backbone {backbone!r}; expected one of {sorted(CHAT_TEMPLATES)}.")
    return CHAT_TEMPLATES[backbone]


def mcq_prompt(question: str, options: list[str], add_letters: bool | None = None) -> str:
    """Build the reference multiple-choice question text (REFERENCE.md section 4.2).

    Returns ``question + "\\n" + "\\n".join(options) + "\\nPlease provide your answer by stating the letter followed
    by the full option."``. Options are prefixed with ``"A. "``, ``"B. "``, ... when ``add_letters`` is True; with
    the default ``None`` they are prefixed unless every option already starts with its letter and a dot (VideoMME
    style). Use it as the user text after the video, and start the answer with `MCQ_ANSWER_PROMPT`.
    """
    if not options:
        raise ValueError("mcq_prompt needs at least one option.")
    letters = [chr(ord("A") + i) for i in range(len(options))]
    if add_letters is None:
        add_letters = not all(opt.startswith(f"{letter}.") for letter, opt in zip(letters, options))
    if add_letters:
        options = [f"{letter}. {opt}" for letter, opt in zip(letters, options)]
    return "\n".join([question, "\n".join(options), MCQ_INSTRUCTION])


def grounding_preamble(duration: float, num_frames: int) -> str:
    """The reference's time sentence for grounding / dense-captioning prompts.

    ``"The video lasts for {duration} seconds, and {num_frames} frames are uniformly sampled from it."``, with
    ``duration`` formatted by ``str.format`` exactly as given (``12.5`` -> ``"12.5"``, ``12`` -> ``"12"``), as the
    reference formats the dataset's duration field. Round it yourself if you want fewer digits. Eval prompts follow it
    with a space and the instruction; the reference's training data concatenates without the space.
    """
    return GROUNDING_PREAMBLE.format(duration, num_frames)


# ----------------------------------------------------------------------------------------------------------------
# Frame sampling (pure functions)
# ----------------------------------------------------------------------------------------------------------------

_SAMPLING_KEYS = ("fps", "num_frames", "max_frames", "min_frames", "start", "end", "sampling")
_SAMPLING_MODES = ("auto", "reference_eval")


def uniform_indices(num_frames: int, total_frames: int) -> list[int]:
    """Midpoints of ``num_frames`` equal segments of ``range(total_frames)`` (the reference's ``uniform_indices``).

    Returns every frame when ``num_frames >= total_frames``. Example: ``uniform_indices(4, 10) == [1, 3, 6, 8]``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}.")
    if num_frames >= total_frames:
        return list(range(total_frames))
    splits = torch.linspace(0, total_frames, num_frames + 1, dtype=torch.int64)
    return ((splits[:-1] + splits[1:]) // 2).tolist()


def reference_eval_indices(
    total_frames: int, video_fps: float, fps: float = 1.0, max_frames: int = 256, min_frames: int = 32
) -> list[int]:
    """The reference evaluation sampling rule (REFERENCE.md section 4.3, ``fps_indices``), reproduced exactly.

    ``round(arange(0, total, video_fps / fps))`` (float32, round half to even) without indices >= total; the first
    ``max_frames`` kept (truncation, not subsampling); padded to a multiple of 4 by repeating the last index; replaced
    by ``uniform_indices(min_frames, total)`` when fewer than ``min_frames`` remain.
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}.")
    if not video_fps or video_fps <= 0:
        raise ValueError(f"reference_eval sampling needs the video's frame rate, got video_fps={video_fps}.")
    if fps is None or fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}.")
    delta = video_fps / fps
    indices = torch.arange(0, total_frames, delta, dtype=torch.float32).round().to(torch.int64).tolist()
    indices = [i for i in indices if i < total_frames]
    if max_frames is not None and 0 < max_frames < len(indices):
        indices = indices[:max_frames]
    if len(indices) % 4 != 0:
        indices = indices + [indices[-1]] * (4 - len(indices) % 4)
    if min_frames is not None and len(indices) < min_frames:
        indices = uniform_indices(min_frames, total_frames)
    return indices


def sample_frame_indices(
    total_frames: int,
    video_fps: float | None = None,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
    max_frames: int | None = None,
    min_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    sampling: str | None = None,
    frame_times=None,
    video_duration: float | None = None,
) -> list[int]:
    """Choose the frame indices to decode for one video (see the module docstring for the rules).

    Args:
        total_frames: Number of frames in the video.
        video_fps: The video's frame rate. Needed for ``fps``, ``start``/``end`` and ``reference_eval``.
        fps: Frames per second to sample (segment starts, counted from ``start``). Excludes ``num_frames``.
        num_frames: Number of uniformly spaced frames (segment midpoints). Excludes ``fps``.
        max_frames: Cap for the fps rule (uniform subsampling of its frames); the reference_eval rule truncates.
        min_frames: Floor for the fps rule (falls back to uniform midpoints).
        start, end: Window in seconds (``end`` defaults to the video's duration). Not used by reference_eval.
        sampling: ``None``/``"auto"`` or ``"reference_eval"``.
        frame_times: For a variable frame rate: the presentation time in seconds of every frame (ascending,
            ``total_frames`` of them; `TimeViperVideoMetadata.frame_times`). ``fps``, ``start`` and ``end`` then
            work on these times: the sample at time ``t`` is the frame on screen at ``t`` (the last one with time
            ``<= t``), and the window holds the frames on screen during ``[start, end)``. ``video_fps`` is not
            needed. ``num_frames`` stays uniform over frame indices, and ``reference_eval`` (by index, as the
            reference) ignores the times.
        video_duration: With ``frame_times``: the video's duration in seconds (default: the last frame's time plus
            the mean frame interval).

    With neither ``fps`` nor ``num_frames``, every frame of the window is returned (then capped by ``max_frames``).
    """
    sampling = sampling or "auto"
    if sampling not in _SAMPLING_MODES:
        raise ValueError(f"Unknown sampling {sampling!r}; expected one of {_SAMPLING_MODES}.")
    if total_frames is None or total_frames < 1:
        raise ValueError(f"The video has no frames (total_frames={total_frames}).")
    if fps is not None and num_frames is not None:
        raise ValueError(
            f"`fps` ({fps}) and `num_frames` ({num_frames}) are mutually exclusive: pass `fps` to sample at a rate "
            "or `num_frames` for a fixed number of uniformly spaced frames, not both."
        )
    if num_frames is not None and (not isinstance(num_frames, (int, np.integer)) or num_frames < 1):
        raise ValueError(f"`num_frames` must be an integer >= 1, got {num_frames!r}.")
    if fps is not None and not fps > 0:
        raise ValueError(f"`fps` must be > 0, got {fps!r}.")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"`max_frames` must be >= 1, got {max_frames!r}.")
    if min_frames is not None and min_frames < 1:
        raise ValueError(f"`min_frames` must be >= 1, got {min_frames!r}.")
    if max_frames is not None and min_frames is not None and min_frames > max_frames:
        raise ValueError(f"`min_frames` ({min_frames}) must not exceed `max_frames` ({max_frames}).")

    if sampling == "reference_eval":
        if num_frames is not None:
            raise ValueError("sampling='reference_eval' samples at `fps`; it does not take `num_frames`.")
        if start is not None or end is not None:
            raise ValueError(
                "sampling='reference_eval' reproduces the reference, which always samples the whole video; "
                "it does not take `start`/`end`. Use the default sampling for a window."
            )
        return reference_eval_indices(
            total_frames,
            video_fps,
            fps=1.0 if fps is None else fps,
            max_frames=256 if max_frames is None else max_frames,
            min_frames=32 if min_frames is None else min_frames,
        )

    if frame_times is not None:
        return _sample_by_times(
            total_frames, frame_times, video_duration, video_fps, fps=fps, num_frames=num_frames,
            max_frames=max_frames, min_frames=min_frames, start=start, end=end,
        )

    has_rate = video_fps is not None and video_fps > 0
    if (start is not None or end is not None or fps is not None) and not has_rate:
        raise ValueError(
            "Sampling with `fps` or `start`/`end` needs the video's frame rate; for decoded frames pass "
            "`video_metadata={'fps': ...}`, or use `num_frames`."
        )
    first, stop = 0, total_frames  # window of frame indices [first, stop)
    if start is not None or end is not None:
        start_s, end_s = _window_seconds(start, end, total_frames / video_fps)
        # Frame i shows [i / video_fps, (i + 1) / video_fps); keep frames whose start time lies in [start, end).
        first = min(total_frames - 1, math.ceil(start_s * video_fps - 1e-6))
        stop = min(total_frames, max(first + 1, math.ceil(end_s * video_fps - 1e-6)))
    window = stop - first

    if num_frames is not None:
        return [first + i for i in uniform_indices(int(num_frames), window)]

    if fps is None:
        indices = list(range(first, stop))
    else:
        begin = 0.0 if start is None else float(start) * video_fps
        finish = float(total_frames) if end is None else min(float(end) * video_fps, float(total_frames))
        positions = np.rint(np.arange(begin, finish, video_fps / fps))  # round half to even, like torch.round
        indices = [int(p) for p in positions if first <= p < stop]
        if not indices:  # a window shorter than one frame
            indices = [first]
    if max_frames is not None and len(indices) > max_frames:
        indices = [indices[i] for i in uniform_indices(max_frames, len(indices))]
    if min_frames is not None and len(indices) < min_frames:
        indices = [first + i for i in uniform_indices(min_frames, window)]
    return indices


def _window_seconds(start, end, duration: float) -> tuple[float, float]:
    start_s = 0.0 if start is None else float(start)
    end_s = duration if end is None else float(end)
    if start_s < 0:
        raise ValueError(f"`start` must be >= 0 seconds, got {start_s}.")
    if start_s >= duration:
        raise ValueError(f"`start` ({start_s}s) is beyond the video's duration ({duration:.3f}s).")
    if end_s <= start_s:
        raise ValueError(f"`start` ({start_s}s) must be before `end` ({end_s}s).")
    return start_s, end_s


def _sample_by_times(
    total_frames, frame_times, video_duration, video_fps, *, fps, num_frames, max_frames, min_frames, start, end
) -> list[int]:
    """`sample_frame_indices` for a variable frame rate: the rules on the frames' real presentation times."""
    times = np.asarray(frame_times, dtype=np.float64)
    if times.ndim != 1 or len(times) != total_frames:
        raise ValueError(f"`frame_times` must hold one time per frame ({total_frames}), got {times.shape}.")
    if np.any(np.diff(times) < 0):
        raise ValueError("`frame_times` must be in presentation order (ascending).")
    if total_frames > 1:
        mean_gap = (times[-1] - times[0]) / (total_frames - 1)
    else:
        mean_gap = 1.0 / video_fps if video_fps else 1.0
    duration = float(times[-1] + mean_gap)
    if video_duration is not None and video_duration > times[-1]:
        duration = float(video_duration)
    eps = 1e-6  # seconds: timestamps are rationals printed as floats

    start_s, end_s = _window_seconds(start, end, duration) if (start is not None or end is not None) \
        else (0.0, duration)
    first = max(0, int(np.searchsorted(times, start_s + eps, side="right")) - 1)  # the frame on screen at `start`
    stop = min(total_frames, max(first + 1, int(np.searchsorted(times, end_s - eps, side="left"))))
    window = stop - first

    if num_frames is not None:
        return [first + i for i in uniform_indices(int(num_frames), window)]
    if fps is None:
        indices = list(range(first, stop))
    else:
        count = max(1, math.ceil((end_s - start_s) * fps - 1e-9))
        sample_times = start_s + np.arange(count, dtype=np.float64) / fps
        sample_times = sample_times[sample_times < end_s - eps] if count > 1 else sample_times
        positions = np.searchsorted(times, sample_times + eps, side="right") - 1
        indices = np.clip(positions, first, stop - 1).astype(int).tolist()
    if max_frames is not None and len(indices) > max_frames:
        indices = [indices[i] for i in uniform_indices(max_frames, len(indices))]
    if min_frames is not None and len(indices) < min_frames:
        indices = [first + i for i in uniform_indices(min_frames, window)]
    return indices


# ----------------------------------------------------------------------------------------------------------------
# Seek-based decoding with PyAV
# ----------------------------------------------------------------------------------------------------------------


class VideoFileNotFoundError(FileNotFoundError, ValueError):
    """A video path that does not exist (both a `FileNotFoundError` and a `ValueError`)."""


def _describe_source(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _open_container(source):
    if av is None:
        raise ImportError("Decoding video files needs PyAV: `pip install av`. Decoded frames work without it.")
    name = _describe_source(source)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if "://" not in source and not os.path.isfile(source):
            raise VideoFileNotFoundError(f"Video file not found: {name}.")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ValueError("Cannot decode an empty byte string as a video.")
        source = io.BytesIO(bytes(source))
    elif not hasattr(source, "read"):
        raise TypeError(f"Cannot open a video from {type(source).__name__}; pass a path, bytes or a file object.")
    elif hasattr(source, "seekable") and not source.seekable():
        source = io.BytesIO(source.read())  # seeking needs a seekable input: read a pipe/stream into memory
    offset = source.tell() if hasattr(source, "tell") else None
    try:
        container = av.open(source, mode="r")
    except Exception as err:  # PyAV raises several FFmpeg error classes; report them uniformly
        raise ValueError(f"Could not open video {name}: unreadable or corrupt ({err}).") from err
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        container.close()
        found = f"it has only {' and '.join(kinds)} stream(s)" if kinds else "it has no streams"
        raise ValueError(f"Video {name} has no video stream ({found}): not a video file, or corrupt.")

    def reopen():
        """The same input opened again from its start (for streams that cannot seek back by timestamp)."""
        if offset is not None:
            source.seek(offset)
        return av.open(source, mode="r")

    return container, name, reopen


@dataclass
class TimeViperVideoMetadata(VideoMetadata):
    """`VideoMetadata` with the real presentation times of the frames.

    Extra fields:
        frames_timestamps: Presentation time in seconds (from the start of the video stream) of each sampled frame,
            as decoded; ``timestamps`` returns it. Set by `decode_video_pyav`.
        frame_times: Presentation time in seconds of every frame of the video (presentation order) for a video with
            a variable frame rate; ``None`` for a constant one (frame ``i`` is at ``i / fps``). ``fps`` is then the
            mean frame rate. Sampling by ``fps`` / ``start`` / ``end`` uses these times.
    """

    frames_timestamps: list[float] | None = None
    frame_times: list[float] | None = field(default=None, repr=False)

    @property
    def timestamps(self) -> list[float]:
        "Presentation times of the sampled frames in seconds."
        if self.frames_timestamps is not None:
            return list(self.frames_timestamps)
        if self.frame_times is not None and self.frames_indices is not None:
            return [self.frame_times[i] for i in self.frames_indices]
        return super().timestamps


def _stream_metadata(container, stream) -> TimeViperVideoMetadata:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    video_fps = float(rate) if rate else None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    else:
        duration = None
    total = int(stream.frames or 0)
    if total <= 0 and duration and video_fps:
        total = int(round(duration * video_fps))
    if duration is None and total and video_fps:
        duration = total / video_fps
    return TimeViperVideoMetadata(
        total_num_frames=total,
        fps=video_fps,
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        duration=duration,
        video_backend="pyav",
    )


def _needs_frame_table(stream, metadata) -> bool:
    """Whether the container header does not vouch for a constant frame rate with a known frame count.

    True when the frame count is not stored (Matroska/WebM, MPEG-TS, ...), when the mean frame rate differs from the
    stream's base rate (FFmpeg's ``r_frame_rate``, the rate that represents its first timestamps), or when the frame
    count and the duration disagree by more than one frame at that rate (dropped or irregular frames).
    """
    if stream.time_base is None or not metadata.fps or not stream.frames or stream.frames <= 0:
        return True
    base = stream.base_rate or stream.guessed_rate
    if not base:
        return True
    base = float(base)
    if abs(base - metadata.fps) > 1e-3 * base:
        return True
    if metadata.duration is not None and abs(stream.frames - metadata.duration * base) > 1.0:
        return True
    return False


class _NotConstantRate(Exception):
    """Raised while decoding on the constant-frame-rate assumption when a frame's timestamp is off that grid."""


class _ConstantRate:
    """Frame index <-> pts for a constant frame rate: ``index = round((pts - origin) * time_base * fps)``.

    ``origin`` is the pts of frame 0 (default: the stream's start time). ``start_pts`` is time zero of the reported
    timestamps. Unless ``verified`` (the rate was checked on every frame's timestamp), `check` raises
    `_NotConstantRate` for a decoded frame off the rate's grid.
    """

    def __init__(self, stream, video_fps: float, origin: int | None = None, verified: bool = False):
        self.time_base = float(stream.time_base)
        self.start_pts = stream.start_time or 0
        self.origin = self.start_pts if origin is None else origin
        self.video_fps = video_fps
        self.verified = verified
        self._half_frame = 0.5 / video_fps / self.time_base

    def index_of(self, pts: int) -> int:
        return int(round((pts - self.origin) * self.time_base * self.video_fps))

    def target_of(self, index: int) -> float:  # lowest pts that still maps to `index`
        return self.origin + index / self.video_fps / self.time_base - self._half_frame

    def check(self, pts: int) -> None:
        if self.verified:
            return
        position = (pts - self.origin) * self.time_base * self.video_fps
        if abs(position - round(position)) > 0.25:
            raise _NotConstantRate(pts)


class _FrameTable:
    """Frame index <-> pts from the sorted presentation timestamps of all the stream's packets (demuxed, not
    decoded): frame ``i`` is the one with the ``i``-th smallest pts."""

    def __init__(self, stream, pts: list[int]):
        self.time_base = float(stream.time_base)
        self.pts = pts
        self.start_pts = stream.start_time if stream.start_time is not None else pts[0]

    def index_of(self, pts: int) -> int:  # the last frame at or before `pts` (-1 before the first frame)
        return bisect.bisect_right(self.pts, pts) - 1

    def target_of(self, index: int) -> float:
        return self.pts[index]

    def check(self, pts: int) -> None:
        pass

    def times(self) -> list[float]:
        return [(p - self.start_pts) * self.time_base for p in self.pts]


def _scan_frame_table(container, stream, stats: dict, rewind: bool = False) -> tuple[list[int] | None, int]:
    """``(sorted pts of every frame, number of frames)`` from one demux pass over the file (no decoding; the decoder
    drops the packets flagged discard, so they are skipped). The pts list is ``None`` when a packet has none."""
    if rewind:
        container.seek(0)
    pts, count = [], 0
    for packet in container.demux(stream):
        if packet.size == 0 or packet.is_discard:
            continue
        stats["scanned_packets"] += 1
        count += 1
        if pts is not None:
            if packet.pts is None:
                pts = None  # keep counting
            else:
                pts.append(int(packet.pts))
    if pts is not None:
        pts.sort()
    return pts, count


def _apply_frame_table(stream, metadata, pts: list[int]) -> _FrameTable | _ConstantRate:
    """Update `metadata` from the frame table; return the table, or a `_ConstantRate` when the timestamps turn out
    to lie on a constant-rate grid (then the reference sampling rule, by index, applies)."""
    table = _FrameTable(stream, pts)
    count = len(pts)
    seconds = np.asarray(table.times(), dtype=np.float64)
    metadata.total_num_frames = count
    span = float(seconds[-1] - seconds[0]) if count > 1 else 0.0
    candidates = [float(r) for r in (stream.base_rate, stream.average_rate, stream.guessed_rate) if r and r > 0]
    if span > 0:
        candidates.append((count - 1) / span)
    if count == 1 and not candidates:
        candidates = [metadata.fps or 1.0]
    for rate in candidates:
        positions = (seconds - seconds[0]) * rate
        if count == 1 or np.all(np.abs(positions - np.arange(count)) < 0.25):
            constant = _ConstantRate(stream, rate, origin=pts[0], verified=True)
            constant.start_pts = table.start_pts
            metadata.fps = rate
            metadata.frame_times = None
            if metadata.duration is None:
                metadata.duration = float(seconds[-1]) + 1.0 / rate
            return constant
    # Variable frame rate. Keep the stream's duration if the last frame can last that long (a container duration
    # may include a longer audio stream); else end one mean frame interval after the last frame.
    gaps = np.diff(seconds)
    last = float(seconds[-1])
    if metadata.duration is None or not last < metadata.duration <= last + float(gaps.max()):
        metadata.duration = last + span / (count - 1)
    metadata.fps = count / metadata.duration
    metadata.frame_times = seconds.tolist()
    return table


def _frame_to_rgb(frame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def _decode_sequential(
    container, stream, wanted: list[int], rewind: bool = True, out: dict | None = None
) -> dict[int, tuple[np.ndarray, float | None]]:
    """Decode from the start, numbering frames in presentation order (for streams without timestamps).

    Returns ``{index: (rgb frame, time in seconds or None)}``. ``rewind=False`` for a container just opened.
    """
    if rewind:
        try:
            container.seek(0)
        except Exception:  # a non-seekable input that has not been read yet
            pass
    stream.codec_context.flush_buffers()
    stream.codec_context.skip_frame = "DEFAULT"
    out, wanted_set, last = ({} if out is None else out), set(wanted), None
    start_pts = stream.start_time or 0
    time_base = float(stream.time_base) if stream.time_base is not None else None

    def when(frame):
        return None if frame.pts is None or time_base is None else (frame.pts - start_pts) * time_base

    for idx, frame in enumerate(container.decode(stream)):
        if idx in wanted_set:
            out[idx] = (_frame_to_rgb(frame), when(frame))
        last = frame
        if len(out) == len(wanted_set):
            break
    if last is not None:
        fallback = (_frame_to_rgb(last), when(last))
        for idx in wanted_set - set(out):
            out[idx] = fallback
    return out


def _decode_seeking(
    container, stream, wanted: list[int], timeline, stats: dict, skip_nonref: bool = True, out: dict | None = None
) -> dict[int, tuple[np.ndarray, int]]:
    """Decode the frames `wanted` (sorted, unique indices), decoding as few frames as possible.

    Returns ``{index: (rgb frame, pts)}``. Packets are demuxed forward. Decoding starts at the keyframe that
    precedes a wanted frame and pauses once that frame is out; packets read while paused are kept, and sent to the
    decoder (in order, so its state stays valid) only if a later packet shows that the next wanted frame lies in the
    same GOP. At the next keyframe before the next wanted frame they are dropped and the decoder is flushed, so GOPs
    without a wanted frame are read but never decoded. Within a decoded stretch, non-reference frames that are not
    wanted are skipped by the decoder (``skip_frame="NONREF"``). When the next wanted frame lies further ahead than
    ``max(4 s, 2 * longest GOP seen)``, the demuxer seeks (backward, to the keyframe at or before it) instead of
    reading everything between. Frame index <-> pts comes from `timeline`: a constant frame rate (`_ConstantRate`,
    which raises `_NotConstantRate` on a frame off its grid) or the stream's frame table (`_FrameTable`).
    """
    time_base = float(stream.time_base)
    start_pts = timeline.start_pts
    codec = stream.codec_context
    seek_gap = 4.0 / time_base
    index_of, target_of = timeline.index_of, timeline.target_of

    out: dict[int, tuple[np.ndarray, int]] = {} if out is None else out
    cursor = 0  # position in `wanted` of the next frame to produce
    state = {"last_frame": None, "progress": False}

    wanted_set = set(wanted)
    skip_mode = {"value": None}

    def decode(packet):
        if packet is not None:
            stats["decoded_packets"] += 1
            # Frames that are neither wanted nor referenced by later frames need not be decoded at all: let the
            # decoder drop non-reference frames except the wanted ones (the setting is read per packet, also with
            # frame threading).
            index = None if packet.pts is None else index_of(packet.pts)
            # At or after the next wanted index, decode everything (the frame that stands for a wanted index may be
            # a later one when the container over-reports its frames).
            wanted_here = index is None or index in wanted_set or (cursor < len(wanted) and index >= wanted[cursor])
            mode = "DEFAULT" if wanted_here or not skip_nonref else "NONREF"
            if mode != skip_mode["value"]:
                codec.skip_frame = mode
                skip_mode["value"] = mode
        return codec.decode(packet)

    def consume(frames) -> None:
        nonlocal cursor
        for frame in frames:
            if frame.pts is None:
                continue
            timeline.check(frame.pts)
            state["last_frame"] = frame
            idx = index_of(frame.pts)
            rgb = None
            while cursor < len(wanted) and idx >= wanted[cursor]:
                rgb = _frame_to_rgb(frame) if rgb is None else rgb
                out[wanted[cursor]] = (rgb, frame.pts)
                cursor += 1
                state["progress"] = True

    max_gop = 0.0
    overshoot_retries = 0
    seek_pts = target_of(wanted[0])
    seeked_for = 0  # the wanted frame the latest seek was for: never seek twice for one frame (its GOP may be long)
    while cursor < len(wanted):
        container.seek(max(int(seek_pts), start_pts), backward=True, any_frame=False, stream=stream)
        codec.flush_buffers()
        stats["seeks"] += 1
        decoding = False  # every packet since the last keyframe has gone to the decoder
        buffer: list = []  # packets read but not yet sent to the decoder
        last_key_pts = None
        seek_pts = None
        for packet in container.demux(stream):
            if packet.size == 0 or (packet.pts is None and packet.dts is None):
                continue  # the demuxer's final empty packet; the decoder is drained after the loop
            stats["demuxed_packets"] += 1
            pts = packet.pts if packet.pts is not None else packet.dts
            index = index_of(pts)
            want = wanted[cursor]
            if packet.is_keyframe:
                if last_key_pts is None and index > want and overshoot_retries < 6:
                    # The seek landed after the wanted frame (inexact index): seek further back.
                    overshoot_retries += 1
                    seek_pts = target_of(want) - (4**overshoot_retries) / time_base
                    break
                if last_key_pts is not None:
                    max_gop = max(max_gop, pts - last_key_pts)
                last_key_pts = pts
                if index <= want:  # the wanted frame is at/after this keyframe: drop the rest
                    if decoding or buffer:
                        codec.flush_buffers()
                    decoding, buffer = False, []
            elif last_key_pts is None:
                continue  # start decoding only at a keyframe
            if decoding:
                consume(decode(packet))
            else:
                buffer.append(packet)
                if index >= want:
                    decoding = True
                    for buffered in buffer:
                        consume(decode(buffered))
                    buffer = []
            if cursor >= len(wanted):
                break
            if state["progress"]:
                decoding, state["progress"] = False, False  # pause until the next wanted frame is near
            next_target = target_of(wanted[cursor])
            if not decoding and cursor != seeked_for and next_target - pts > max(seek_gap, 2 * max_gop):
                seek_pts, seeked_for = next_target, cursor
                break
        if cursor >= len(wanted) or seek_pts is not None:
            continue
        # End of stream: decode what is buffered, drain the decoder, and give wanted frames past the end the last
        # frame (the container over-reported its frame count).
        for buffered in buffer:
            consume(decode(buffered))
        consume(decode(None))
        if state["last_frame"] is None:
            break
        last = state["last_frame"]
        fallback = (_frame_to_rgb(last), last.pts)
        while cursor < len(wanted):
            out[wanted[cursor]] = fallback
            cursor += 1
    return out


class _FrameStore(dict):
    """The decoded frames by index; with a `label`, a progress bar counts them as they arrive."""

    def __init__(self, total: int, label: str | None = None):
        super().__init__()
        self.bar = None
        if label is not None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"decoding {label}", unit="frame", leave=False)

    def __setitem__(self, index, frame):
        if self.bar is not None and index not in self:
            self.bar.update(1)
        super().__setitem__(index, frame)

    def restart(self) -> "_FrameStore":
        """Forget what was decoded (a second decoding pass starts over)."""
        self.clear()
        if self.bar is not None:
            self.bar.reset()
        return self

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def decode_video_pyav(
    source, indices: list[int] | None = None, sample_indices_fn=None, stats: dict | None = None, progress: bool = False
) -> tuple[np.ndarray, TimeViperVideoMetadata]:
    """Decode selected frames of a video with PyAV, seeking instead of decoding the whole file.

    Frame ``i`` is the ``i``-th frame in presentation order. When the container header vouches for a constant frame
    rate (stored frame count = duration x rate, mean rate = base rate; e.g. MP4/MOV, AVI), indices map to
    timestamps by that rate, with no pass over the file. Otherwise (variable frame rate, or containers that do not
    store a frame count: Matroska/WebM, MPEG-TS, ...) the packets are demuxed once (no decoding) to build the table
    of frame timestamps; a variable-rate video then gets ``metadata.frame_times`` and a mean ``fps``, and sampling by
    time uses the real timestamps. A constant-rate decode that meets a frame off the rate's grid switches to the
    table. Streams without timestamps are decoded sequentially. Non-seekable file objects are read into memory.

    Args:
        source: A path (str or `os.PathLike`), raw bytes, or a binary file object.
        indices: Frame indices to return (any order, repeats allowed).
        sample_indices_fn: Alternatively, a function ``TimeViperVideoMetadata -> list[int]`` called once the video's
            frame count and frame rate (and, for a variable frame rate, ``frame_times``) are known.
        progress: Show a progress bar over the frames to decode (for long videos).
        stats: Optional dict that receives counts: ``decoded_packets`` (packets sent to the decoder; it drops the
            unwanted non-reference ones among them), ``demuxed_packets``, ``seeks`` and ``scanned_packets``
            (packets read to build the frame table; 0 when it was not needed).

    Returns:
        ``(frames, metadata)``: uint8 RGB frames of shape ``(len(indices), height, width, 3)`` and a
        `TimeViperVideoMetadata` with ``frames_indices`` and ``frames_timestamps`` (the decoded frames' presentation
        times in seconds from the stream start) set.

    Raises:
        ValueError: the file is missing (`VideoFileNotFoundError`), unreadable, has no video stream or no frames, or
            an index is out of range.
    """
    if indices is None and sample_indices_fn is None:
        raise ValueError("Pass `indices` or `sample_indices_fn`.")
    container, name, reopen = _open_container(source)
    counts = {"decoded_packets": 0, "demuxed_packets": 0, "seeks": 0, "scanned_packets": 0}

    def choose(metadata) -> list[int]:
        chosen = [int(i) for i in (indices if indices is not None else sample_indices_fn(metadata))]
        if not chosen:
            raise ValueError(f"No frames were selected from video {name}.")
        if metadata.total_num_frames and max(chosen) >= metadata.total_num_frames:
            raise ValueError(f"Frame index {max(chosen)} is out of range for video {name} "
                             f"({metadata.total_num_frames} frames).")
        if min(chosen) < 0:
            raise ValueError(f"Frame indices must be >= 0, got {min(chosen)}.")
        return chosen

    def frame_table(metadata, rewind=False):
        pts, count = _scan_frame_table(container, stream, counts, rewind=rewind)
        if count == 0:
            raise ValueError(f"Video {name} has no frames: its video stream holds no packets (empty or truncated).")
        if pts is None:  # no timestamps: the frames will be counted while decoding from the start
            metadata.total_num_frames = count
            if metadata.fps and not metadata.duration:
                metadata.duration = count / metadata.fps
            return None
        return _apply_frame_table(stream, metadata, pts)

    decoded = None
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        metadata = _stream_metadata(container, stream)
        try:
            timeline = None
            if _needs_frame_table(stream, metadata):
                timeline = frame_table(metadata)
            elif metadata.fps and stream.time_base is not None:
                timeline = _ConstantRate(stream, metadata.fps)
            if timeline is None and not metadata.total_num_frames:
                raise ValueError(f"Video {name} has no frames (or its frame count is unknown and it has no "
                                 "timestamps).")
            chosen = choose(metadata)
            decoded = _FrameStore(len(set(chosen)), name if progress else None)
            if timeline is not None:
                try:
                    decoded = _decode_seeking(container, stream, sorted(set(chosen)), timeline, counts, out=decoded)
                except _NotConstantRate:  # the header's constant rate was wrong: use the real timestamps
                    timeline = frame_table(metadata, rewind=True)
                    chosen = choose(metadata)
                    if timeline is not None:
                        decoded = _decode_seeking(
                            container, stream, sorted(set(chosen)), timeline, counts, out=decoded.restart()
                        )
            if len(decoded) < len(set(chosen)):  # no timestamps: count frames from the start
                rewind = True
                if counts["scanned_packets"]:  # the scan read the input to its end; seeking back needs timestamps
                    fresh = reopen()
                    container.close()
                    container, stream, rewind = fresh, fresh.streams.video[0], False
                    stream.thread_type = "AUTO"
                decoded = _decode_sequential(container, stream, sorted(set(chosen)), rewind=rewind, out=decoded.restart())
                timeline = None  # `decoded` now holds times in seconds (or None), not pts
        except av.error.FFmpegError as err:
            raise ValueError(f"Could not decode video {name}: corrupt or unsupported ({err}).") from err
        if not decoded:
            raise ValueError(f"Could not decode any frame from video {name}: corrupt or empty.")
        frames = np.stack([decoded[i][0] for i in chosen])
        if timeline is not None and stream.time_base is not None:
            time_base = float(stream.time_base)
            metadata.frames_timestamps = [float((decoded[i][1] - timeline.start_pts) * time_base) for i in chosen]
        elif all(decoded[i][1] is not None for i in chosen):
            metadata.frames_timestamps = [float(decoded[i][1]) for i in chosen]
        if stats is not None:
            stats.update(counts)
    finally:
        if decoded is not None:
            decoded.close()
        container.close()
    metadata.frames_indices = chosen
    if metadata.width is None or metadata.width == 0:
        metadata.height, metadata.width = frames.shape[1:3]
    return frames, metadata


# ----------------------------------------------------------------------------------------------------------------
# Frame transform (shared by the image and video processors)
# ----------------------------------------------------------------------------------------------------------------


def _size_hw(size) -> tuple[int, int]:
    if size is None:
        raise ValueError("`size` must be set, e.g. {'height': 384, 'width': 384}.")
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    height = size.get("height") if hasattr(size, "get") else getattr(size, "height", None)
    width = size.get("width") if hasattr(size, "get") else getattr(size, "width", None)
    if height is None or width is None:
        raise ValueError(f"`size` must give 'height' and 'width' (a squash resize), got {size!r}.")
    return int(height), int(width)


def _to_pil(frame) -> PIL.Image.Image:
    """One frame (PIL image, HWC/CHW uint8 array or tensor) -> PIL image in RGB."""
    if isinstance(frame, PIL.Image.Image):
        image = frame
    else:
        array = frame.detach().cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
        if array.dtype != np.uint8:
            raise ValueError(
                f"Frames must be uint8 in [0, 255], got dtype {array.dtype}; convert with "
                "`(x * 255).round().clip(0, 255).astype(np.uint8)` if they are scaled to [0, 1]."
            )
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3:
            raise ValueError(f"A frame must be (H, W, C) or (C, H, W), got shape {tuple(array.shape)}.")
        if array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
            array = np.transpose(array, (1, 2, 0))
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        if array.shape[-1] not in (3, 4):
            raise ValueError(f"A frame must have 1, 3 or 4 channels, got shape {tuple(array.shape)}.")
        image = PIL.Image.fromarray(np.ascontiguousarray(array))
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def transform_frames(
    frames,
    size,
    resample=PIL.Image.Resampling.BICUBIC,
    do_resize: bool = True,
    do_rescale: bool = True,
    rescale_factor: float = 1 / 255,
    do_normalize: bool = True,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
) -> torch.Tensor:
    """RGB -> squash resize to ``size`` with PIL (bicubic by default) -> rescale -> normalize.

    This matches the reference transform ``Resize((384, 384), bicubic)`` on PIL images, ``ToTensor()``,
    ``Normalize(0.5, 0.5)``. Returns float32 ``(num_frames, 3, height, width)``.
    """
    height, width = _size_hw(size)
    resample = PIL.Image.Resampling(int(resample if resample is not None else PIL.Image.Resampling.BICUBIC))
    tensors = []
    for frame in frames:
        image = _to_pil(frame)
        if do_resize and image.size != (width, height):
            image = image.resize((width, height), resample=resample)
        tensors.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1))
    if not tensors:
        raise ValueError("Got an empty list of frames.")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"Frames have different sizes {sorted(shapes)}; set do_resize=True to batch them.")
    pixels = torch.stack(tensors).to(torch.float32)
    if do_rescale:
        # Divide rather than multiply for the default factor, as ToTensor does (bit-exact).
        pixels = pixels / 255.0 if math.isclose(rescale_factor, 1 / 255) else pixels * rescale_factor
    if do_normalize:
        mean = torch.tensor(image_mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.tensor(image_std, dtype=torch.float32).reshape(-1, 1, 1)
        pixels = (pixels - mean) / std
    return pixels


def _is_frame(x) -> bool:
    if isinstance(x, PIL.Image.Image):
        return True
    return isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 3


def _is_video_source(x) -> bool:
    return isinstance(x, (str, os.PathLike, bytes, bytearray, memoryview, dict)) or hasattr(x, "read")


def _flatten_videos(videos) -> list:
    """Flatten a video, a batch of videos, or nested per-sample lists of videos into a list of single videos."""
    if _is_video_source(videos):
        return [videos]
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim == 4:
            return [videos]
        if videos.ndim == 5:
            return list(videos)
        raise ValueError(
            "A video array must be (T, H, W, C) or (T, C, H, W) (or 5-D for a batch), got shape "
            f"{tuple(videos.shape)}."
        )
    if isinstance(videos, (list, tuple)):
        if len(videos) == 0:
            raise ValueError("Got an empty list of frames/videos.")
        if all(_is_frame(x) for x in videos):
            return [list(videos)]  # one video given as a list of frames
        flat = []
        for item in videos:
            if _is_frame(item):
                raise ValueError("A list mixes single frames with whole videos; pass one list of frames per video.")
            if isinstance(item, (list, tuple)) and len(item) == 0:
                continue  # a sample without videos (e.g. from apply_chat_template)
            flat.extend(_flatten_videos(item))
        return flat
    raise TypeError(
        f"Unsupported video input {type(videos).__name__}: pass a path, bytes, a file object, a uint8 array/tensor "
        "(T, H, W, 3) or (T, 3, H, W), a list of PIL images, or a list of those."
    )


def _load_image(source) -> PIL.Image.Image:
    """A path, URL or base64 string -> PIL image (base64 has no '.', so a string with one is a path or URL)."""
    source = os.fspath(source)
    if "://" not in source and not source.startswith("data:") and "." in source and not os.path.isfile(source):
        raise VideoFileNotFoundError(f"Image file not found: '{source}'.")
    return load_image(source)


def _flatten_images(images) -> list:
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(_flatten_images(item))
        return flat
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


# ----------------------------------------------------------------------------------------------------------------
# Image and video processors
# ----------------------------------------------------------------------------------------------------------------


def _indices_for(metadata, options: dict) -> list[int]:
    """`sample_frame_indices` for a video's metadata (with its frame times when the frame rate is variable)."""
    def get(key):
        if isinstance(metadata, dict):
            return metadata.get(key)
        return getattr(metadata, key, None)

    frame_times = get("frame_times")
    return sample_frame_indices(
        get("total_num_frames"), get("fps"), frame_times=frame_times,
        video_duration=get("duration") if frame_times is not None else None, **options,
    )


class TimeViperVideoProcessorKwargs(VideosKwargs, total=False):
    """Video kwargs of `TimeViperVideoProcessor` (on top of transformers' `VideosKwargs`).

    fps (`float`): frames per second to sample (default 1.0), one frame at the start of each segment.
    num_frames (`int`): sample this many uniformly spaced frames instead (segment midpoints).
    max_frames (`int`): cap for the fps rule (default 256, uniform subsampling; reference_eval truncates).
    min_frames (`int`): floor for the fps rule (default none; reference_eval uses 32).
    start, end (`float`): window in seconds.
    sampling (`str`): "auto" (default) or "reference_eval" (REFERENCE.md section 4.3).
    progress (`bool`): show a progress bar while decoding each video (default False).
    """

    max_frames: int | None
    min_frames: int | None
    start: float | None
    end: float | None
    sampling: str | None
    progress: bool


class TimeViperVideoProcessor(BaseVideoProcessor):
    r"""Decode, sample and normalise videos for TimeViper.

    Accepts, per video: a path, raw bytes or a binary file object (decoded with PyAV, seeking to the sampled frames);
    a uint8 array/tensor ``(T, H, W, 3)`` or ``(T, 3, H, W)``; a list of PIL images or HWC arrays; or a dict
    ``{"video"|"path"|"url": source, "fps"|"num_frames"|"max_frames"|"min_frames"|"start"|"end"|"sampling": ...}``
    whose keys override the call's sampling kwargs for that video. A list of these is a batch.

    Decoded frames (arrays, PIL lists) are sampled only when ``num_frames`` is given, or when their frame rate is
    known from ``video_metadata={"fps": ...}``; otherwise all of them are used as they are.

    Returns a `BatchFeature` with ``pixel_values_videos`` (float32 ``(total frames of all videos, 3, H, W)``, videos
    concatenated in order), ``video_num_frames`` (int64 ``(num_videos,)``) and ``video_metadata`` (a list of
    `VideoMetadata` with the sampled ``frames_indices``; ``timestamps`` gives their times in seconds: for decoded
    files, `TimeViperVideoMetadata` with the frames' real presentation times, also for a variable frame rate).
    """

    resample = PIL.Image.Resampling.BICUBIC
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 384, "width": 384}
    do_resize = True
    do_center_crop = False
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    do_sample_frames = True
    fps = 1.0
    num_frames = None
    max_frames = 256
    min_frames = None
    start = None
    end = None
    sampling = "auto"
    progress = False  # a progress bar while decoding each video
    valid_kwargs = TimeViperVideoProcessorKwargs
    model_input_names = ["pixel_values_videos"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    def _sampling_options(self, call_kwargs: dict, item: dict) -> tuple[dict, bool]:
        """Merge sampling options: instance defaults < call kwargs < per-video dict. Returns (options, fps_given).

        A level that sets ``num_frames`` drops the ``fps`` of lower levels and vice versa; one level setting both
        is an error.
        """
        options = {key: getattr(self, key, None) for key in _SAMPLING_KEYS}
        if options["num_frames"] is not None:
            options["fps"] = None
        fps_given = False
        for level_name, level in (("call", call_kwargs), ("video", item)):
            level = {k: v for k, v in level.items() if k in _SAMPLING_KEYS and v is not None}
            if "fps" in level and "num_frames" in level:
                where = "in the call" if level_name == "call" else "for one video"
                raise ValueError(
                    f"`fps` ({level['fps']}) and `num_frames` ({level['num_frames']}) were both given {where}; "
                    "they are mutually exclusive."
                )
            if "num_frames" in level:
                options["fps"] = None
            if "fps" in level:
                options["num_frames"] = None
                fps_given = True
            options.update(level)
        return options, fps_given

    def _load_one(self, video, call_kwargs: dict, metadata_hint, do_sample_frames: bool):
        item = {}
        if isinstance(video, dict):
            item = video
            sources = [video[key] for key in ("video", "path", "url") if video.get(key) is not None]
            if not sources:
                raise ValueError(f"A video dict needs a 'video', 'path' or 'url' entry, got keys {sorted(video)}.")
            video = sources[0]
        options, fps_given = self._sampling_options(call_kwargs, item)
        if options["num_frames"] is not None and (
            not isinstance(options["num_frames"], (int, np.integer)) or options["num_frames"] < 1
        ):
            raise ValueError(f"`num_frames` must be an integer >= 1, got {options['num_frames']!r}.")

        if isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(video, "read"):
            progress = bool(call_kwargs.get("progress", self.progress))
            if do_sample_frames:
                return decode_video_pyav(video, sample_indices_fn=lambda meta: _indices_for(meta, options), progress=progress)
            return decode_video_pyav(
                video, sample_indices_fn=lambda meta: list(range(meta.total_num_frames)), progress=progress
            )

        # Decoded frames.
        if isinstance(video, (list, tuple)):
            if len(video) == 0:
                raise ValueError("Got an empty list of frames.")
            frames = list(video)
            total = len(frames)
        else:
            if video.ndim != 4:
                raise ValueError(f"A video array must be 4-D (T, H, W, C) or (T, C, H, W), got {tuple(video.shape)}.")
            frames = video
            total = int(video.shape[0])
        if total == 0:
            raise ValueError("Got a video with no frames.")
        hint = dict(metadata_hint or {})
        video_fps = hint.get("fps")
        if not do_sample_frames:
            indices = list(range(total))
        elif options["num_frames"] is not None or video_fps or options["sampling"] == "reference_eval":
            indices = sample_frame_indices(total, video_fps, **options)
        elif fps_given or options["start"] is not None or options["end"] is not None:
            raise ValueError(
                "Sampling decoded frames with `fps` or `start`/`end` needs their frame rate: pass "
                "`video_metadata={'fps': ...}`, or use `num_frames`."
            )
        else:
            indices = list(range(total))  # already-sampled frames
        selected = [frames[i] for i in indices]
        first = _to_pil(selected[0])
        metadata = VideoMetadata(
            total_num_frames=total,
            fps=video_fps,
            width=first.width,
            height=first.height,
            duration=total / video_fps if video_fps else None,
            video_backend=None,
            frames_indices=indices,
        )
        return selected, metadata

    def preprocess(self, videos, **kwargs) -> BatchFeature:
        """Decode/sample each video, then resize, rescale and normalise its frames (see the class docstring)."""
        unknown = set(kwargs) - set(self.valid_kwargs.__annotations__) - {"return_tensors"}
        if unknown:
            raise TypeError(
                f"Unexpected video processor kwargs {sorted(unknown)}; valid: "
                f"{sorted(self.valid_kwargs.__annotations__)}."
            )
        option = {key: (kwargs[key] if kwargs.get(key) is not None else getattr(self, key, None))
                  for key in ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
                              "image_mean", "image_std", "do_sample_frames")}
        call_sampling = {key: kwargs[key] for key in (*_SAMPLING_KEYS, "progress") if kwargs.get(key) is not None}
        if call_sampling.get("fps") is not None and call_sampling.get("num_frames") is not None:
            raise ValueError(
                f"`fps` ({call_sampling['fps']}) and `num_frames` ({call_sampling['num_frames']}) are mutually "
                "exclusive: pass one of them."
            )
        video_list = _flatten_videos(videos)
        hints = kwargs.get("video_metadata")
        if hints is None or isinstance(hints, (dict, VideoMetadata)):
            hints = [hints] * len(video_list)
        elif len(hints) != len(video_list):
            raise ValueError(f"Got {len(hints)} `video_metadata` entries for {len(video_list)} videos.")

        pixel_values, counts, metadata = [], [], []
        for video, hint in zip(video_list, hints):
            frames, meta = self._load_one(video, call_sampling, hint, bool(option["do_sample_frames"]))
            pixel_values.append(
                transform_frames(
                    frames,
                    size=option["size"],
                    resample=option["resample"],
                    do_resize=option["do_resize"],
                    do_rescale=option["do_rescale"],
                    rescale_factor=option["rescale_factor"],
                    do_normalize=option["do_normalize"],
                    image_mean=option["image_mean"],
                    image_std=option["image_std"],
                )
            )
            counts.append(len(meta.frames_indices))
            metadata.append(meta)
        shapes = {tuple(p.shape[1:]) for p in pixel_values}
        if len(shapes) > 1:
            raise ValueError(f"Videos have different frame sizes {sorted(shapes)}; set do_resize=True.")
        data = {
            "pixel_values_videos": torch.cat(pixel_values),
            "video_num_frames": torch.tensor(counts, dtype=torch.int64),
            "video_metadata": metadata,
        }
        return BatchFeature(data=data, skip_tensor_conversion=["video_metadata"])

    def sample_frames(self, metadata: VideoMetadata, num_frames: int | None = None, fps: float | None = None,
                      **kwargs) -> list[int]:
        """`BaseVideoProcessor` hook: frame indices for `metadata` under this processor's sampling rules."""
        options, _ = self._sampling_options({"fps": fps, "num_frames": num_frames, **kwargs}, {})
        return _indices_for(metadata, options)


class TimeViperImageProcessor(BaseImageProcessor):
    """Images for TimeViper: the frame transform of `TimeViperVideoProcessor` applied to single images.

    Accepts PIL images, uint8 HWC/CHW arrays or tensors, paths/URLs, or (nested) lists of them. Returns
    ``pixel_values`` float32 ``(num_images, 3, H, W)``.
    """

    resample = PIL.Image.Resampling.BICUBIC
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 384, "width": 384}
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    valid_kwargs = ImagesKwargs
    model_input_names = ["pixel_values"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._set_attributes(**kwargs)

    def preprocess(self, images, **kwargs) -> BatchFeature:
        unknown = set(kwargs) - set(self.valid_kwargs.__annotations__) - {"return_tensors"}
        if unknown:
            raise TypeError(f"Unexpected image processor kwargs {sorted(unknown)}.")
        option = {key: (kwargs[key] if kwargs.get(key) is not None else getattr(self, key, None))
                  for key in ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
                              "image_mean", "image_std")}
        flat = _flatten_images(images)
        if not flat:
            raise ValueError("Got an empty list of images.")
        loaded = [_load_image(x) if isinstance(x, (str, os.PathLike)) else x for x in flat]
        pixel_values = transform_frames(loaded, **option)
        return BatchFeature(data={"pixel_values": pixel_values})


# ----------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------


def build_labels(
    input_ids,
    separator_id: int,
    attention_mask=None,
    ignore_ids=(),
    ignore_index: int = IGNORE_INDEX,
):
    """Labels that supervise only assistant turns (REFERENCE.md section 4.5, ``_create_labels``).

    The sequence is expected to be a chat-template render: a system turn, then alternating user and assistant turns,
    each closed by the separator token (``<SPECIAL_12>`` for Nemotron-H, ``<|im_end|>`` for Qwen2). With separator
    positions ``s_0, s_1, ...`` the tokens ``(s_i, s_{i+1}]`` for odd ``i`` are supervised: for Nemotron-H that is
    ``<SPECIAL_11>Assistant\\n{answer}\\n<SPECIAL_12>``, for Qwen2 ``\\n<|im_start|>assistant\\n{answer}<|im_end|>``.
    Everything else is ``ignore_index``, as are padding (``attention_mask == 0``) and any token in ``ignore_ids``
    (placeholders). An unfinished assistant turn (a generation prompt) is not supervised.

    Args:
        input_ids: One sequence (list or 1-D tensor) or a batch (list of lists or 2-D tensor).
        separator_id: Id of the turn separator token.
        attention_mask: Same shape as ``input_ids``; positions with 0 are ignored (padding).
        ignore_ids: Token ids never supervised (e.g. the ``<video>``/``<image>`` placeholder ids).
        ignore_index: Label of unsupervised positions.

    Returns:
        Labels with the type and shape of ``input_ids`` (a tensor for tensor input, else lists).
    """
    as_tensor = isinstance(input_ids, torch.Tensor)
    ids = input_ids.tolist() if as_tensor else input_ids
    mask = attention_mask.tolist() if isinstance(attention_mask, torch.Tensor) else attention_mask
    single = len(ids) == 0 or not isinstance(ids[0], (list, tuple))
    rows = [list(ids)] if single else [list(r) for r in ids]
    masks = [None] * len(rows) if mask is None else ([list(mask)] if single else [list(m) for m in mask])
    ignore = set(int(i) for i in ignore_ids if i is not None)
    labels = []
    for row, row_mask in zip(rows, masks):
        valid = [True] * len(row) if row_mask is None else [bool(m) for m in row_mask]
        seps = [p for p, (tok, ok) in enumerate(zip(row, valid)) if ok and tok == separator_id]
        row_labels = [ignore_index] * len(row)
        for i in range(1, len(seps) - 1, 2):
            for p in range(seps[i] + 1, seps[i + 1] + 1):
                if valid[p] and row[p] not in ignore:
                    row_labels[p] = row[p]
        labels.append(row_labels)
    labels = labels[0] if single else labels
    return torch.tensor(labels, dtype=torch.long) if as_tensor else labels


# ----------------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------------

_TEXT_KWARGS = {
    "padding", "padding_side", "truncation", "max_length", "pad_to_multiple_of", "return_attention_mask",
    "add_special_tokens", "return_tensors", "return_token_type_ids", "return_length", "verbose", "stride",
    "is_split_into_words", "return_overflowing_tokens", "return_special_tokens_mask", "return_offsets_mapping",
}
_PROCESSOR_KWARGS = {"return_labels", "return_metadata", "text_kwargs", "videos_kwargs", "images_kwargs"}


class TimeViperProcessor(ProcessorMixin):
    r"""TimeViper processor: tokenizer + `TimeViperVideoProcessor` + `TimeViperImageProcessor` + chat template.

    Each ``<video>`` in the text stands for one video and is expanded to ``num_frames * tokens_per_frame`` copies of
    ``<video>``; each ``<image>`` to ``tokens_per_frame`` copies of ``<image>``. The model replaces every placeholder
    token with one vision embedding (``tokens_per_frame`` per frame after token merging).

    Args:
        image_processor: Defaults to a `TimeViperImageProcessor` with the video processor's size.
        video_processor: Defaults to `TimeViperVideoProcessor()` (384x384, 1 fps, at most 256 frames).
        tokenizer: Must know ``video_token`` and ``image_token`` as tokens.
        chat_template: `NEMOTRON_H_CHAT_TEMPLATE` or `QWEN2_CHAT_TEMPLATE` (see `get_chat_template`).
        tokens_per_frame: Vision embeddings per frame (16 for TimeViper's ToMe projector).
        video_token, image_token: Placeholder strings.
        turn_separator: Token closing each turn, for labels; inferred from the chat template when None.
    """

    def __init__(
        self,
        image_processor=None,
        video_processor=None,
        tokenizer=None,
        chat_template=None,
        tokens_per_frame: int = 16,
        video_token: str = "<video>",
        image_token: str = "<image>",
        turn_separator: str | None = None,
        **kwargs,
    ):
        if video_processor is None:
            video_processor = TimeViperVideoProcessor()
        if image_processor is None:
            size = _size_hw(video_processor.size)
            image_processor = TimeViperImageProcessor(size={"height": size[0], "width": size[1]})
        if not isinstance(tokens_per_frame, int) or tokens_per_frame < 1:
            raise ValueError(f"tokens_per_frame must be a positive integer, got {tokens_per_frame!r}.")
        self.tokens_per_frame = tokens_per_frame
        self.video_token = video_token
        self.image_token = image_token
        if turn_separator is None and isinstance(chat_template, str):
            turn_separator = next((sep for sep in _ASSISTANT_HEADERS if sep in chat_template), None)
        self.turn_separator = turn_separator
        super().__init__(image_processor, video_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.video_token_id = self._token_id(video_token)
        self.image_token_id = self._token_id(image_token)

    def check_argument_for_proper_class(self, argument_name, argument):
        # Without torchvision, `transformers.BaseVideoProcessor` is a dummy placeholder class, so the base check would
        # reject every video processor; check against the real base class instead.
        if argument_name == "video_processor":
            if not isinstance(argument, BaseVideoProcessor):
                raise TypeError(f"video_processor must be a BaseVideoProcessor, got {type(argument).__name__}.")
            return BaseVideoProcessor
        return super().check_argument_for_proper_class(argument_name, argument)

    def _token_id(self, token: str) -> int | None:
        if self.tokenizer is None:
            return None
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            raise ValueError(
                f"The tokenizer has no token {token!r}; add it with "
                f"`tokenizer.add_special_tokens({{'additional_special_tokens': [{token!r}]}})` before building the "
                "processor (and size the model's embeddings accordingly)."
            )
        return token_id

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        # Every saved processor names its Auto classes and carries this file (transformers writes both only for
        # registered classes), as every saved TimeViper model does.
        type(self).register_for_auto_class()
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        """Register for `AutoProcessor`, and the image/video processors for their auto classes (save_pretrained)."""
        super().register_for_auto_class(auto_class)
        TimeViperVideoProcessor.register_for_auto_class()
        TimeViperImageProcessor.register_for_auto_class()

    # -- placeholder expansion (transformers' ProcessorMixin hooks) --------------------------------------------------

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        num_frames = int(video_inputs["video_num_frames"][video_idx])
        return self.video_token * (num_frames * self.tokens_per_frame)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.tokens_per_frame

    def _expand_placeholders(self, texts: list[str], video_inputs, image_inputs) -> list[str]:
        num_videos = 0 if video_inputs is None else len(video_inputs["video_num_frames"])
        num_images = 0 if image_inputs is None else len(image_inputs["pixel_values"])
        counts = {
            "video": sum(t.count(self.video_token) for t in texts),
            "image": sum(t.count(self.image_token) for t in texts),
        }
        for kind, given in (("video", num_videos), ("image", num_images)):
            token = self.video_token if kind == "video" else self.image_token
            if counts[kind] != given:
                raise ValueError(
                    f"The text has {counts[kind]} {token} placeholder(s) but {given} {kind}(s) were given; put "
                    f"exactly one {token} in the text per {kind} (they are matched in order across the batch)."
                )
        if num_videos == 0 and num_images == 0:
            return texts
        pattern = re.compile("|".join(re.escape(t) for t in (self.video_token, self.image_token)))
        counter = {"video": 0, "image": 0}

        def expand(match):
            if match.group(0) == self.video_token:
                counter["video"] += 1
                return self.replace_video_token(video_inputs, counter["video"] - 1)
            counter["image"] += 1
            return self.replace_image_token(image_inputs, counter["image"] - 1)

        return [pattern.sub(expand, text) for text in texts]

    # -- main entry --------------------------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, videos=None, **kwargs) -> BatchFeature:
        r"""Process text with ``<video>``/``<image>`` placeholders together with the videos and images they stand for.

        Args:
            images: Images (see `TimeViperImageProcessor`), one per ``<image>`` in the text, in order.
            text: A string or a list of strings (a batch).
            videos: Videos (see `TimeViperVideoProcessor`), one per ``<video>`` in the text, in order across the
                batch; nested per-sample lists (as from `apply_chat_template`) are flattened.
            **kwargs:
                Video kwargs (``fps``, ``num_frames``, ``max_frames``, ``min_frames``, ``start``, ``end``,
                ``sampling``, ``size``, ``video_metadata``, ...) go to the video processor, ``size``/``resample``/...
                also to the image processor; tokenizer kwargs (``padding``, ``padding_side`` ("left" for generation),
                ``truncation``, ``max_length``, ``pad_to_multiple_of``, ``return_tensors``, ``add_special_tokens``
                (default False: no BOS, as the reference)); or pass them grouped as ``text_kwargs``,
                ``videos_kwargs``, ``images_kwargs`` dicts.
                ``return_labels=True`` adds ``labels`` (see `build_labels`; padding and placeholders are -100).
                ``return_metadata=True`` adds ``video_metadata`` (list of `VideoMetadata`) and ``video_num_frames``.

        Returns:
            `BatchFeature` with ``input_ids``, ``attention_mask`` (when text is given), ``pixel_values_videos``
            float32 (total frames, 3, H, W) when videos are given, ``pixel_values`` (num images, 3, H, W) when
            images are given, and ``labels`` / ``video_metadata`` / ``video_num_frames`` on request.
        """
        if text is None and isinstance(images, str) and "://" not in images and not os.path.isfile(images):
            images, text = None, images  # processor("some text"): a positional string is text, not an image
        if images is None and text is None and videos is None:
            raise ValueError("Pass at least one of `text`, `videos` or `images`.")

        text_kwargs = dict(kwargs.pop("text_kwargs", None) or {})
        videos_kwargs = dict(kwargs.pop("videos_kwargs", None) or {})
        images_kwargs = dict(kwargs.pop("images_kwargs", None) or {})
        return_labels = bool(kwargs.pop("return_labels", False))
        return_metadata = bool(kwargs.pop("return_metadata", False))
        video_keys = set(self.video_processor.valid_kwargs.__annotations__)
        image_keys = set(self.image_processor.valid_kwargs.__annotations__)
        unknown = []
        for key, value in kwargs.items():
            routed = False
            if key in _TEXT_KWARGS:
                text_kwargs.setdefault(key, value)
                routed = True
            if key in video_keys and key not in ("return_tensors", "return_metadata"):
                videos_kwargs.setdefault(key, value)
                routed = True
            if key in image_keys and key not in ("return_tensors",):
                images_kwargs.setdefault(key, value)
                routed = True
            if not routed:
                unknown.append(key)
        if unknown:
            raise TypeError(
                f"Unexpected keyword argument(s) {sorted(unknown)} for {type(self).__name__}.__call__; see its "
                "docstring for the video, image and tokenizer kwargs."
            )
        return_tensors = text_kwargs.pop("return_tensors", None)
        videos_kwargs.pop("return_metadata", None)
        videos_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)

        data: dict[str, Any] = {}
        video_inputs = image_inputs = None
        if videos is not None:
            video_inputs = self.video_processor(videos, **videos_kwargs)
            data["pixel_values_videos"] = video_inputs["pixel_values_videos"]
            if return_metadata:
                data["video_num_frames"] = video_inputs["video_num_frames"]
                data["video_metadata"] = video_inputs["video_metadata"]
        if images is not None:
            image_inputs = self.image_processor(images, **images_kwargs)
            data["pixel_values"] = image_inputs["pixel_values"]

        if text is None:
            if return_labels:
                raise ValueError("`return_labels=True` needs `text`.")
            return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["video_metadata"])
        if self.tokenizer is None:
            raise ValueError("This processor has no tokenizer; it cannot process `text`.")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("`text` must be a string or a list of strings.")
        texts = self._expand_placeholders(texts, video_inputs, image_inputs)
        data.update(self._tokenize(texts, text_kwargs, return_labels, video_inputs, image_inputs))
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["video_metadata"])

    def _tokenize(self, texts, text_kwargs, return_labels, video_inputs, image_inputs) -> dict:
        padding = text_kwargs.pop("padding", False)
        padding_side = text_kwargs.pop("padding_side", None) or self.tokenizer.padding_side
        max_length = text_kwargs.get("max_length")
        pad_to_multiple_of = text_kwargs.pop("pad_to_multiple_of", None)
        return_attention_mask = text_kwargs.pop("return_attention_mask", True)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        text_kwargs.setdefault("add_special_tokens", False)
        text_kwargs.setdefault("return_token_type_ids", False)
        encoded = self.tokenizer(texts, padding=False, **text_kwargs)
        rows = [list(r) for r in encoded["input_ids"]]

        # The placeholders must survive tokenisation (truncation would silently drop vision positions).
        for kind, token_id, inputs in (("video", self.video_token_id, video_inputs),
                                       ("image", self.image_token_id, image_inputs)):
            if inputs is None or token_id is None:
                continue
            expected = (int(inputs["video_num_frames"].sum()) if kind == "video" else len(inputs["pixel_values"])) \
                * self.tokens_per_frame
            found = sum(r.count(token_id) for r in rows)
            if found != expected:
                raise ValueError(
                    f"Expected {expected} {kind} placeholder tokens after tokenisation, found {found}; truncation "
                    "(`max_length`) probably cut them. Raise `max_length` or sample fewer frames."
                )

        labels = None
        if return_labels:
            labels = [self.build_labels(r) for r in rows]
            for i, row_labels in enumerate(labels):
                if all(label == IGNORE_INDEX for label in row_labels):
                    raise ValueError(
                        f"Sample {i} has no complete assistant turn to supervise (labels requested). Add the "
                        "assistant answer to the conversation, render without add_generation_prompt, and check that "
                        "truncation did not cut it."
                    )

        # Padding (done here so that labels stay aligned with input_ids).
        lengths = [len(r) for r in rows]
        if padding in (True, "longest"):
            target = max(lengths)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs `max_length`.")
            target = max(max_length, max(lengths))
        elif padding in (False, None, "do_not_pad"):
            target = None
        else:
            raise ValueError(f"Unsupported padding {padding!r}; use True/'longest', 'max_length' or False.")
        if target is not None and pad_to_multiple_of:
            target = int(math.ceil(target / pad_to_multiple_of) * pad_to_multiple_of)
        masks = [[1] * n for n in lengths]
        if target is not None and any(n != target for n in lengths):
            pad_id = self.tokenizer.pad_token_id
            if pad_id is None:
                raise ValueError("Padding needs a tokenizer pad token; set `tokenizer.pad_token`.")

            def pad(seq, value):
                filler = [value] * (target - len(seq))
                return filler + seq if padding_side == "left" else seq + filler

            rows = [pad(r, pad_id) for r in rows]
            masks = [pad(m, 0) for m in masks]
            if labels is not None:
                labels = [pad(l, IGNORE_INDEX) for l in labels]
        out = {"input_ids": rows}
        if return_attention_mask:
            out["attention_mask"] = masks
        if labels is not None:
            out["labels"] = labels
        for key in encoded.keys():  # extra tokenizer outputs asked for (lengths, offsets, ...), unpadded
            if key not in ("input_ids", "attention_mask"):
                out[key] = encoded[key]
        return out

    # -- labels ------------------------------------------------------------------------------------------------------

    def build_labels(self, input_ids, attention_mask=None):
        """Labels supervising only the assistant turns of chat-template renders (see module-level `build_labels`).

        Uses this processor's ``turn_separator`` and ignores the ``<video>``/``<image>`` placeholders. Also checks
        that every supervised span starts with the assistant header (``<SPECIAL_11>Assistant\\n`` or
        ``\\n<|im_start|>assistant\\n``) and raises ``ValueError`` otherwise (e.g. text rendered without the system
        turn). Accepts one sequence or a batch, as lists or tensors.
        """
        if self.turn_separator is None:
            raise ValueError(
                "Labels need the turn separator; build the processor with a TimeViper chat template or pass "
                "`turn_separator` ('<SPECIAL_12>' for Nemotron-H, '<|im_end|>' for Qwen2)."
            )
        separator_id = self._token_id(self.turn_separator)
        labels = build_labels(
            input_ids, separator_id, attention_mask=attention_mask,
            ignore_ids=(self.video_token_id, self.image_token_id),
        )
        header = _ASSISTANT_HEADERS.get(self.turn_separator)
        if header is not None:
            label_rows = labels.tolist() if isinstance(labels, torch.Tensor) else labels
            id_rows = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids
            if label_rows and not isinstance(label_rows[0], list):
                label_rows, id_rows = [label_rows], [id_rows]
            for row_ids, row_labels in zip(id_rows, label_rows):
                spans, current = [], []
                for token, label in zip(row_ids, row_labels):
                    if label != IGNORE_INDEX or (current and token in (self.video_token_id, self.image_token_id)):
                        current.append(token)
                    elif current:
                        spans.append(current)
                        current = []
                if current:
                    spans.append(current)
                for span in spans:
                    span_text = self.tokenizer.decode(span, skip_special_tokens=False)
                    if not span_text.startswith(header):
                        raise ValueError(
                            f"A supervised span starts with {span_text[:40]!r} instead of the assistant header "
                            f"{header!r}: labels expect the chat-template layout (system turn, then alternating "
                            "user/assistant turns)."
                        )
        return labels

    # -- chat template ----------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors=None,
        processor_kwargs: dict | None = None,
        return_labels: bool = False,
        **kwargs,
    ):
        """Render conversations with the chat template and, with ``tokenize=True``, process them.

        Content items: ``{"type": "text", "text": ...}``, ``{"type": "video", "video"|"path"|"url": ...}`` (a path,
        bytes, frames, ...; per-item ``fps``, ``num_frames``, ``max_frames``, ``min_frames``, ``start``, ``end``,
        ``sampling`` override the call's), ``{"type": "image", "image"|"path"|"url": ...}``. Videos are decoded with
        this file's PyAV decoder. Processor kwargs go in ``processor_kwargs`` or directly as keyword arguments
        (``fps=2``, ``padding=True``, ...); other keyword arguments are passed to the template.
        ``return_labels=True`` adds ``labels`` for training (the conversation must end with an assistant answer).
        Returns the rendered text (``tokenize=False``), ``input_ids`` (``tokenize=True``), or the whole
        `BatchFeature` (``return_dict=True``).
        """
        if kwargs.get("return_assistant_tokens_mask"):
            raise ValueError("Use `return_labels=True` for assistant-only labels with TimeViper templates.")
        processor_kwargs = dict(processor_kwargs or {})
        processor_keys = (_TEXT_KWARGS | _PROCESSOR_KWARGS | set(self.video_processor.valid_kwargs.__annotations__)
                          | set(self.image_processor.valid_kwargs.__annotations__))
        for key in list(kwargs):
            if key in processor_keys:
                processor_kwargs[key] = kwargs.pop(key)
        if return_labels:
            processor_kwargs["return_labels"] = True
        if return_tensors is not None:
            processor_kwargs["return_tensors"] = return_tensors

        # Same batching rule as ProcessorMixin.apply_chat_template.
        is_batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0 and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "content")
        )
        conversations = conversation if is_batched else [conversation]
        prompt = super().apply_chat_template(
            conversation,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **kwargs,
        )
        if not tokenize:
            return prompt

        videos, images = [], []
        for conv in conversations:
            messages = conv.messages if hasattr(conv, "messages") else conv
            for message in messages:
                content = message.get("content")
                if not isinstance(content, (list, tuple)):
                    continue
                for item in content:
                    if not isinstance(item, dict):
                        continue
                    if item.get("type") == "video":
                        if not any(item.get(k) is not None for k in ("video", "path", "url")):
                            raise ValueError("A video item needs a 'video', 'path' or 'url' entry to be tokenized.")
                        videos.append(item)
                    elif item.get("type") == "image":
                        source = next((item[k] for k in ("image", "path", "url", "base64") if item.get(k) is not None),
                                      None)
                        if source is None:
                            raise ValueError("An image item needs an 'image', 'path' or 'url' entry to be tokenized.")
                        images.append(source)
        out = self(
            text=prompt if is_batched else [prompt],
            videos=videos or None,
            images=images or None,
            **processor_kwargs,
        )
        return out if return_dict else out["input_ids"]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values_videos", "pixel_values"]


__all__ += ["NEMOTRON_H_CHAT_TEMPLATE", "QWEN2_CHAT_TEMPLATE", "TimeViperVideoProcessorKwargs", "transform_frames"]
