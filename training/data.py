"""Training data for TimeViper: the JSONL sample format (training/README.md, "Data format"), its validation
(`load_samples`: one `DataFormatError` listing every bad line as `file:line (id ...): problem`), a `Dataset` that
decodes and tokenises with the processor, and a padding collator."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from evaluation.tasks import build_grounding_prompt, format_seconds, is_number, problem_listing, read_json_lines
from timeviper.processing_timeviper import IGNORE_INDEX, expand_video_placeholder
from timeviper.video_processing_timeviper import decode_video_pyav, merge_sampling

VIDEO_PLACEHOLDER = "<video>"
IMAGE_PLACEHOLDER = "<image>"
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".flv", ".wmv", ".mpg", ".mpeg", ".ts", ".3gp", ".ogv"}
)
ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
SAMPLING_KEYS = ("fps", "num_frames", "max_frames", "min_frames")
KNOWN_KEYS = frozenset(
    {"id", "video", "image", "start", "end", "duration", "conversations", "messages", "query", "timestamps"}
    | set(SAMPLING_KEYS)
)


class DataFormatError(ValueError):
    """Training data that cannot be used; the message names each bad sample as ``file:line (id ...)``."""

    @classmethod
    def listing(cls, headline: str, problems: list[str]) -> "DataFormatError":
        return cls(problem_listing(headline, problems))


class SampleLoadError(RuntimeError):
    """A sample that passed validation failed while loading (unreadable video, too long, ...)."""


@dataclass(frozen=True)
class TrainingSample:
    """One validated JSONL line. `messages` are normalised chat turns (`role`, `content`), with the media
    placeholder written exactly once in the first user turn when the sample has media."""

    source: str  # "file:line"
    sample_id: str | None
    messages: tuple[dict, ...] = ()
    media_type: str | None = None  # "video", "image" or None
    media_path: str | None = None
    start: float | None = None
    end: float | None = None
    duration: float | None = None
    query: str | None = None
    timestamps: tuple[float, float] | None = None
    sampling: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.source} (id {self.sample_id!r})" if self.sample_id is not None else self.source

    @property
    def is_grounding(self) -> bool:
        return self.timestamps is not None


def _normalise_turns(turns, problems: list[str]) -> list[dict]:
    """Turns in either schema -> [{"role", "content"}]; appends a message to `problems` for each defect."""
    if not isinstance(turns, list):
        problems.append(f"'conversations' must be a list of turns, got {type(turns).__name__}")
        return []
    if not turns:
        problems.append("the conversation is empty (it needs a user turn and an assistant answer)")
        return []
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            problems.append(f"turn {index} must be an object, got {type(turn).__name__}")
            continue
        if "role" in turn or "content" in turn:
            role, content = turn.get("role"), turn.get("content")
        else:
            role, content = turn.get("from"), turn.get("value")
        if role not in ROLE_NAMES:
            problems.append(
                f"turn {index} has role {role!r}; use 'user'/'assistant'/'system' (or 'human'/'gpt' under 'from')"
            )
            continue
        if not isinstance(content, str):
            problems.append(f"turn {index} ({ROLE_NAMES[role]}) needs string content, got {type(content).__name__}")
            continue
        messages.append({"role": ROLE_NAMES[role], "content": content})
    return messages


def _check_turn_order(messages: list[dict], problems: list[str]) -> None:
    """[system], user, assistant, user, assistant, ...: the label builder supervises every second turn span, so
    any other order would supervise the wrong text."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        problems.append("a system turn may only come first")
        return
    if not body:
        problems.append("the conversation has no user or assistant turn")
        return
    if not any(m["role"] == "assistant" for m in body):
        problems.append("the conversation has no assistant turn, so nothing would be supervised")
        return
    for index, message in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            problems.append(
                f"turns must alternate user/assistant starting with user; turn {index} is {message['role']!r}"
            )
            return
    if body[-1]["role"] != "assistant":
        problems.append("the conversation must end with an assistant answer (the last turn is a user turn)")
    for index, message in enumerate(body):
        if message["role"] == "assistant" and not message["content"].strip():
            problems.append(f"assistant turn {index} is empty")


def _place_media(messages: list[dict], media_type: str | None, problems: list[str]) -> list[dict]:
    """Ensure exactly one placeholder for the media, in the first user turn (and none anywhere without media)."""
    counts = [m["content"].count(VIDEO_PLACEHOLDER) + m["content"].count(IMAGE_PLACEHOLDER) for m in messages]
    if media_type is None:
        if sum(counts):
            problems.append(f"the text contains {VIDEO_PLACEHOLDER}/{IMAGE_PLACEHOLDER} but the sample has no media")
        return messages
    if sum(counts) > 1:
        problems.append(f"the text has {sum(counts)} media placeholders; one video or image takes exactly one")
        return messages
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    if sum(counts) == 1 and counts[first_user] != 1:
        problems.append("the media placeholder must be in the first user turn")
        return messages
    placeholder = VIDEO_PLACEHOLDER if media_type == "video" else IMAGE_PLACEHOLDER
    messages = [dict(m) for m in messages]
    content = messages[first_user]["content"]
    if counts[first_user] == 0:
        content = placeholder + content  # the reference: placeholders directly followed by the question
    else:
        content = content.replace(VIDEO_PLACEHOLDER, placeholder).replace(IMAGE_PLACEHOLDER, placeholder)
    messages[first_user]["content"] = content
    return messages


def parse_sample(
    raw: Any, source: str, root: str | os.PathLike | None = None, check_files: bool = True
) -> tuple[TrainingSample | None, str | None, list[str]]:
    """Validate one decoded JSON line. Returns ``(sample or None, id, problems)``."""
    if not isinstance(raw, dict):
        return None, None, [f"a sample must be a JSON object, got {type(raw).__name__}"]
    sample_id = raw.get("id")
    sample_id = None if sample_id is None else str(sample_id)
    problems: list[str] = []
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        problems.append(f"unknown keys {unknown}; known keys: {sorted(KNOWN_KEYS)}")
    media_type, media_path = _parse_media(raw, root, check_files, problems)
    sampling = _parse_window_and_sampling(raw, media_type, problems)
    messages, query, timestamps = _parse_text(raw, media_type, problems)
    if problems:
        return None, sample_id, problems
    start, end, duration = (None if raw.get(key) is None else float(raw[key]) for key in ("start", "end", "duration"))
    sample = TrainingSample(
        source=source, sample_id=sample_id, messages=tuple(messages), media_type=media_type, media_path=media_path,
        start=start, end=end, duration=duration, query=query.strip() if isinstance(query, str) else None,
        timestamps=timestamps, sampling=sampling,
    )
    return sample, sample_id, []


def _parse_media(raw: dict, root, check_files: bool, problems: list[str]) -> tuple[str | None, str | None]:
    """``(media type, resolved path)`` of a sample's "video" or "image" (both None for a text-only sample)."""
    if raw.get("video") is not None and raw.get("image") is not None:
        problems.append("give either 'video' or 'image', not both")
        return None, None
    if raw.get("video") is None and raw.get("image") is None:
        return None, None
    key = "video" if raw.get("video") is not None else "image"
    value = raw[key]
    if not isinstance(value, str) or not value.strip():
        problems.append(f"'{key}' must be a non-empty path string, got {value!r}")
        return None, None
    media_path = os.path.expanduser(value)
    if root is not None and not os.path.isabs(media_path):
        media_path = os.path.join(os.fspath(root), media_path)
    media_type = "video" if key == "video" or Path(value).suffix.lower() in VIDEO_EXTENSIONS else "image"
    if check_files and not os.path.isfile(media_path):
        problems.append(f"{media_type} file not found: {media_path}")
    return media_type, media_path


def _parse_window_and_sampling(raw: dict, media_type: str | None, problems: list[str]) -> dict:
    """Check "start"/"end"/"duration" and the per-sample sampling keys; returns the sampling keys given."""
    start, end, duration = raw.get("start"), raw.get("end"), raw.get("duration")
    for name, value in (("start", start), ("end", end), ("duration", duration)):
        if value is not None and (not is_number(value) or value < 0):
            problems.append(f"'{name}' must be a non-negative number of seconds, got {value!r}")
    if is_number(start) and is_number(end) and end <= start:
        problems.append(f"'start' ({start}) must be before 'end' ({end})")
    if (start is not None or end is not None) and media_type != "video":
        problems.append("'start'/'end' need a video")
    if duration is not None and is_number(duration) and duration <= 0:
        problems.append(f"'duration' must be positive, got {duration!r}")
    sampling = {key: raw[key] for key in SAMPLING_KEYS if raw.get(key) is not None}
    for key in ("num_frames", "max_frames", "min_frames"):
        value = sampling.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(f"'{key}' must be an integer >= 1, got {sampling[key]!r}")
    if "fps" in sampling and (not is_number(sampling["fps"]) or sampling["fps"] <= 0):
        problems.append(f"'fps' must be a positive number, got {sampling['fps']!r}")
    if "fps" in sampling and "num_frames" in sampling:
        problems.append("'fps' and 'num_frames' are mutually exclusive")
    if sampling and media_type != "video":
        problems.append(f"frame sampling keys {sorted(sampling)} need a video")
    return sampling


def _parse_text(raw: dict, media_type: str | None, problems: list[str]):
    """``(messages, query, timestamps)``: the conversation, or a grounding sample's query and timestamps."""
    turns = raw.get("conversations", raw.get("messages"))
    if "conversations" in raw and "messages" in raw:
        problems.append("give either 'conversations' or 'messages', not both")
    query, timestamps = raw.get("query"), raw.get("timestamps")
    if query is None and timestamps is None:
        if turns is None:
            problems.append("the sample has no 'conversations' (nor 'query' + 'timestamps' for grounding)")
            return [], query, timestamps
        turn_problems: list[str] = []
        messages = _normalise_turns(turns, turn_problems)
        if not turn_problems:
            _check_turn_order(messages, turn_problems)
        if not turn_problems:
            messages = _place_media(messages, media_type, turn_problems)
        problems += turn_problems
        return messages, query, timestamps
    if turns is not None:
        problems.append("a grounding sample ('query' + 'timestamps') has no 'conversations'")
    if media_type != "video":
        problems.append("a grounding sample needs a 'video'")
    if not isinstance(query, str) or not query.strip():
        problems.append(f"'query' must be a non-empty string, got {query!r}")
    if not (isinstance(timestamps, (list, tuple)) and len(timestamps) == 2
            and all(is_number(t) and t >= 0 for t in timestamps) and timestamps[0] <= timestamps[1]):
        problems.append(f"'timestamps' must be [start, end] in seconds with 0 <= start <= end, got {timestamps!r}")
    else:
        timestamps = (float(timestamps[0]), float(timestamps[1]))
    return [], query, timestamps


def load_samples(paths: str | os.PathLike | Sequence[str | os.PathLike], video_root: str | os.PathLike | None = None,
                 check_files: bool = True) -> list[TrainingSample]:
    """Read and validate JSONL files. Raises `DataFormatError` listing every bad line (up to 50 of them)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataFormatError("no training data files were given")
    samples: list[TrainingSample] = []
    problems: list[str] = []
    for path in paths:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataFormatError(f"training data file not found: {path}")
        for line_number, raw, unreadable in read_json_lines(path):
            source = f"{path}:{line_number}"
            if unreadable:
                problems.append(f"{source}: {unreadable}")
                continue
            sample, sample_id, sample_problems = parse_sample(raw, source, video_root, check_files)
            where = f"{source} (id {sample_id!r})" if sample_id is not None else source
            problems += [f"{where}: {problem}" for problem in sample_problems]
            if sample is not None:
                samples.append(sample)
    if problems:
        raise DataFormatError.listing(f"{len(problems)} problem(s) in the training data", problems)
    if not samples:
        raise DataFormatError(f"the training data {[os.fspath(p) for p in paths]} holds no samples")
    return samples


def grounding_messages(query: str, timestamps: tuple[float, float], duration: float, num_frames: int) -> list[dict]:
    """The user prompt of the evaluation harness and a ``"{start} to {end} seconds"`` answer."""
    prompt = build_grounding_prompt(query, duration, num_frames)
    answer = f"{format_seconds(timestamps[0])} to {format_seconds(timestamps[1])} seconds"
    return [{"role": "user", "content": VIDEO_PLACEHOLDER + prompt}, {"role": "assistant", "content": answer}]


class TimeViperSFTDataset(torch.utils.data.Dataset):
    """Supervised fine-tuning samples processed by a `TimeViperProcessor`.

    Args:
        data_files: One or more JSONL files (training/README.md, "Data format").
        processor: A `TimeViperProcessor` with a TimeViper chat template (it supplies the decoder, the sampling rule,
            the frame transform, the placeholder expansion and the labels).
        video_root: Folder that relative media paths are resolved against.
        fps, num_frames, max_frames, min_frames: Frame sampling (the video processor's rule; per-sample keys
            override them). Default: 1 fps, at most 256 frames (uniformly subsampled), as in the paper.
        max_length: Reject (raise on) a sample longer than this many tokens, vision placeholders included.
        check_files: Check that every media file exists while validating.

    Each item is a dict with `input_ids`, `labels` (1-D int64), and `pixel_values_videos` (frames, 3, H, W) or
    `pixel_values` (1, 3, H, W) when the sample has media.
    """

    def __init__(
        self,
        data_files,
        processor,
        video_root: str | os.PathLike | None = None,
        fps: float | None = 1.0,
        num_frames: int | None = None,
        max_frames: int | None = 256,
        min_frames: int | None = None,
        max_length: int | None = None,
        check_files: bool = True,
    ):
        if getattr(processor, "turn_separator", None) is None:
            raise ValueError("the processor needs a TimeViper chat template (its turn separator builds the labels)")
        self.processor = processor
        self.samples = load_samples(data_files, video_root, check_files)
        self.sampling = {"fps": None if num_frames is not None else fps, "num_frames": num_frames,
                         "max_frames": max_frames, "min_frames": min_frames}
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.samples)

    def load_video(self, sample: TrainingSample, first_frame_only: bool = False):
        """`(frames, metadata, sampled indices)` of a sample's video: uint8 (frames, H, W, 3) and `VideoMetadata`.
        `first_frame_only` decodes just the first sampled frame, which proves the file a readable, non-empty video and
        gives the frame count without decoding the frames."""
        window = {"start": sample.start, "end": sample.end}
        options = {k: v for k, v in merge_sampling(self.sampling, sample.sampling, window).items() if v is not None}
        sampled: list[int] = []

        def sample_indices(metadata):
            sampled[:] = self.processor.video_processor.sample_frames(metadata, **options)
            return sampled[:1] if first_frame_only else sampled

        frames, metadata = decode_video_pyav(sample.media_path, sample_indices_fn=sample_indices)
        return frames, metadata, list(sampled)

    def probe_media(self, sample: TrainingSample) -> tuple[int, float | None]:
        """`(frames, video duration)` of a sample's media, opened as `__getitem__` would but without decoding the
        frames (an image is opened and verified). Raises `SampleLoadError` naming the sample."""
        try:
            if sample.media_type == "video":
                _, metadata, sampled = self.load_video(sample, first_frame_only=True)
                return len(sampled), metadata.duration
            if sample.media_type == "image":
                from PIL import Image

                with Image.open(sample.media_path) as image:
                    image.verify()
            return 0, None
        except Exception as err:
            raise SampleLoadError(f"{sample.where}: {type(err).__name__}: {err}") from err

    def measure(self, sample: TrainingSample, num_frames: int, video_duration: float | None) -> int:
        """The sample's length in tokens (vision placeholders included), as `__getitem__` would tokenize it."""
        text = self.render(sample, num_frames, video_duration)
        processor = self.processor
        if sample.media_type == "video":
            text = expand_video_placeholder(processor, text, num_frames)
        elif sample.media_type == "image":
            text = text.replace(processor.image_token, processor.replace_image_token({}, 0))
        return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_length(self, sample: TrainingSample, length: int, num_frames: int) -> None:
        if self.max_length is not None and length > self.max_length:
            raise SampleLoadError(
                f"{sample.where}: {length} tokens ({num_frames} frames) exceed max_length={self.max_length}; "
                "sample fewer frames (fps / max_frames) or raise max_length"
            )

    def preflight(self, skip_bad_samples: bool = False) -> list[str]:
        """Check every sample before training, so that a bad one stops the run before step 1 rather than at its step:
        each video is opened and its first sampled frame decoded (an unreadable, non-video or zero-frame file fails),
        each image opened, and each sample's length measured against `max_length`. Every bad sample is listed as
        ``file:line (id ...): problem``. By default they raise one `DataFormatError`; with `skip_bad_samples` they are
        dropped from the dataset (and returned, for the caller to report). Media are probed on up to 8 threads."""
        from concurrent.futures import ThreadPoolExecutor

        def probe(sample):
            try:
                return self.probe_media(sample)
            except SampleLoadError as err:
                return str(err)

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            probed = list(pool.map(probe, self.samples))
        problems, kept = [], []
        for sample, media in zip(self.samples, probed):
            try:
                if isinstance(media, str):
                    raise SampleLoadError(media)
                self.check_length(sample, self.measure(sample, *media), media[0])  # tokenizers: one thread
                kept.append(sample)
            except SampleLoadError as err:
                problems.append(str(err))
            except Exception as err:
                problems.append(f"{sample.where}: {type(err).__name__}: {err}")
        if problems and not skip_bad_samples:
            raise DataFormatError.listing(f"{len(problems)} sample(s) cannot be trained on", problems)
        if not kept:
            raise DataFormatError.listing("no sample of the training data can be trained on", problems)
        self.samples = kept
        return problems

    def render(self, sample: TrainingSample, num_frames: int = 0, video_duration: float | None = None) -> str:
        """The chat-template text of a sample, with one placeholder for its media."""
        messages = list(sample.messages)
        if sample.is_grounding:
            duration = sample.duration
            if duration is None:
                ends = [t for t in (sample.end, video_duration) if t is not None]
                if not ends:
                    raise SampleLoadError(f"{sample.where}: the video's duration is unknown; add 'duration'")
                duration = min(ends) - (sample.start or 0.0)
            messages = grounding_messages(sample.query, sample.timestamps, duration, num_frames)
        return self.processor.apply_chat_template(messages, tokenize=False)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        try:
            videos = images = None
            num_frames, video_duration = 0, None
            if sample.media_type == "video":
                frames, metadata, _ = self.load_video(sample)
                videos, num_frames, video_duration = [frames], len(frames), metadata.duration
            elif sample.media_type == "image":
                images = [sample.media_path]
            text = self.render(sample, num_frames, video_duration)
            kwargs = {"do_sample_frames": False} if videos is not None else {}
            encoded = self.processor(
                text=[text], videos=videos, images=images, return_labels=True, return_tensors="pt", **kwargs
            )
        except SampleLoadError:
            raise
        except Exception as err:
            raise SampleLoadError(f"{sample.where}: {type(err).__name__}: {err}") from err
        self.check_length(sample, encoded["input_ids"].shape[1], num_frames)
        pixels = {key: encoded[key] for key in ("pixel_values_videos", "pixel_values") if key in encoded}
        return {"input_ids": encoded["input_ids"][0], "labels": encoded["labels"][0], **pixels}


@dataclass
class TimeViperDataCollator:
    """Right-pads `input_ids` (pad id) and `labels` (-100), builds `attention_mask`, and concatenates the frames of
    all samples in batch order (`pixel_values_videos`, `pixel_values`), matching the placeholders' row-major order."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_processor(cls, processor, pad_to_multiple_of: int | None = None) -> "TimeViperDataCollator":
        pad_token_id = processor.tokenizer.pad_token_id
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set `tokenizer.pad_token` (never to the eos token)")
        return cls(pad_token_id, pad_to_multiple_of)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(features)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"])
            labels[row, :n] = torch.as_tensor(feature["labels"])
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key in ("pixel_values_videos", "pixel_values"):
            tensors = [f[key] for f in features if f.get(key) is not None]
            if tensors:
                batch[key] = torch.cat(tensors)
        return batch

