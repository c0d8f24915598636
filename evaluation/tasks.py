"""Benchmark logic for TimeViper evaluation, with no model inside: the reference's prompts for multiple-choice video QA
(``mcq``) and temporal grounding (``grounding``), answer parsing, metrics (percentages in [0, 100]), resumable JSONL
predictions and the reference's zigzag sharding (formats: evaluation/README.md). The model enters only through
``answer_fn(record, prompt_text, answer_prompt) -> str``, so everything here runs without weights.
"""

from __future__ import annotations

import fcntl
import glob
import json
import math
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

# The prompts and the frame sampler come from timeviper.processing_timeviper, imported where they are used: it loads
# torch and transformers, which scoring predictions (`run_eval score`) and reading annotations never need.

TASKS = ("mcq", "grounding")

# temporal_video_grounding_templates["user"][9] of the reference (the one its TVG evaluation uses).
GROUNDING_INSTRUCTION = (
    "Investigate the video to identify the segment that matches the textual query '{query}', and output the start "
    "and end timestamps in seconds. The output format of the predicted timestamp should be like: 'start to end' seconds"
)
RECALL_THRESHOLDS = (0.3, 0.5, 0.7)
MAX_OPTIONS = 26

# answer_fn(record, prompt_text, answer_prompt) -> generated text. answer_prompt is None for grounding.
AnswerFn = Callable[[dict, str, "str | None"], str]


class AnnotationError(ValueError):
    """One or more annotation lines are unusable; the message lists each as ``file:line: problem``."""


class PredictionFileError(ValueError):
    """A predictions JSONL file is corrupt somewhere other than its last line."""


# Prompts


def option_letters(num_options: int) -> list[str]:
    """``["A", "B", ...]`` for ``num_options`` options."""
    return [chr(ord("A") + i) for i in range(num_options)]


def _option_prefix_length(option: str, letter: str) -> int:
    """Length of a leading ``"B. "``, ``"B) "`` or ``"(B) "`` label for ``letter``, or 0 when there is none."""
    m = re.match(rf"^\s*(?:{letter}[.)]|\({letter}\))(?:\s+|$)", option)
    return m.end() if m else 0


def options_are_lettered(options: Sequence[str]) -> bool:
    """True when option i already starts with its own letter (``"A. ..."``, ``"A) ..."`` or ``"(A) ..."``)."""
    return all(_option_prefix_length(opt, letter) for opt, letter in zip(options, option_letters(len(options))))


def option_texts(options: Sequence[str]) -> list[str]:
    """Options without their letter labels (the text a model might repeat instead of a letter)."""
    if not options_are_lettered(options):
        return [opt.strip() for opt in options]
    letters = option_letters(len(options))
    return [opt[_option_prefix_length(opt, letter) :].strip() for opt, letter in zip(options, letters)]


def build_mcq_prompt(question: str, options: Sequence[str]) -> str:
    """The reference MCQ user prompt: question, one option per line (kept as given when all are lettered in order,
    else prefixed ``"A. "`` etc.), then the answer instruction."""
    from timeviper.processing_timeviper import mcq_prompt

    return mcq_prompt(question, [opt.strip() for opt in options], add_letters=not options_are_lettered(options))


def format_seconds(seconds: float) -> str:
    """A duration as the prompt shows it: at most two decimals, trailing zeros dropped (``30.0`` -> ``"30"``)."""
    text = f"{float(seconds):.2f}".rstrip("0").rstrip(".")
    return text or "0"


def build_grounding_prompt(query: str, duration: float, num_frames: int) -> str:
    """The reference TVG user prompt: the time sentence, a space, then the grounding instruction with the query."""
    from timeviper.processing_timeviper import grounding_preamble

    time_sentence = grounding_preamble(format_seconds(duration), num_frames)
    return f"{time_sentence} {GROUNDING_INSTRUCTION.format(query=query.strip())}"


SAMPLING_RULES = ("reference_eval", "auto")


def eval_num_frames(
    duration: float, fps: float = 1.0, max_frames: int = 256, min_frames: int = 32, rule: str = "reference_eval"
) -> int:
    """How many frames the video processor samples from a video of ``duration`` seconds under ``rule`` (the number
    the grounding prompt states). It runs the processor's own sampler on a constant-rate video of that duration whose
    rate is a whole multiple of ``fps`` (each sample lands on a frame) and which has at least ``min_frames`` frames; a
    real video's count differs only where its true duration or rate does."""
    if not duration or duration <= 0 or fps <= 0:
        raise ValueError(f"duration and fps must be positive, got duration={duration}, fps={fps}")
    if rule not in SAMPLING_RULES:
        raise ValueError(f"unknown sampling rule {rule!r}; expected one of {SAMPLING_RULES}")
    from timeviper.processing_timeviper import sample_frame_indices

    frames_per_sample = max(1, math.ceil(min_frames / (duration * fps)))
    video_fps = fps * frames_per_sample
    total_frames = math.ceil(duration * video_fps - 1e-9)
    indices = sample_frame_indices(total_frames, video_fps, fps=fps, max_frames=max_frames, min_frames=min_frames,
                                   sampling=rule)
    return len(indices)


@dataclass(frozen=True)
class FrameSampling:
    """Evaluation frame sampling, shared by the prompt (frame count) and the video processor (its kwargs)."""

    fps: float = 1.0
    max_frames: int = 256
    min_frames: int = 32
    rule: str = "reference_eval"

    def __post_init__(self):
        if self.rule not in SAMPLING_RULES:
            raise ValueError(f"unknown sampling rule {self.rule!r}; expected one of {SAMPLING_RULES}")
        if not self.fps > 0 or self.max_frames < 1 or not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"need fps > 0 and 1 <= min_frames <= max_frames, got fps={self.fps}, "
                             f"min_frames={self.min_frames}, max_frames={self.max_frames}")

    def num_frames(self, duration: float) -> int:
        return eval_num_frames(duration, self.fps, self.max_frames, self.min_frames, self.rule)

    def processor_kwargs(self) -> dict:
        """Video kwargs for `TimeViperProcessor` (``TimeViperVideoProcessorKwargs``)."""
        return {"fps": self.fps, "max_frames": self.max_frames, "min_frames": self.min_frames, "sampling": self.rule}


def build_prompt(task: str, record: dict, sampling: FrameSampling = FrameSampling()) -> tuple[str, str | None]:
    """``(prompt_text, answer_prompt)`` for one validated record; ``answer_prompt`` is None for grounding."""
    from timeviper.processing_timeviper import MCQ_ANSWER_PROMPT

    if task == "mcq":
        return build_mcq_prompt(record["question"], record["options"]), MCQ_ANSWER_PROMPT
    if task == "grounding":
        num_frames = sampling.num_frames(record["duration"])
        return build_grounding_prompt(record["query"], record["duration"], num_frames), None
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# Parsing model outputs

# A letter that opens the output: "B", "(B)", "B)", "B.", "b", "[B]", "B: text", "B, text".
_LEADING_LETTER = re.compile(r"^[(\[]?\s*([A-Za-z])\s*(?:[)\].:,]|$)")
# "The answer is C", "Answer: (b)", "Best Option: (D", "option B", "choice is A."
_ANSWER_PHRASE = re.compile(
    r"\b(?i:answer|option|choice)\s*(?:(?i:is|would be|should be)\s*)?:?\s*[(\[]?\s*"
    r"([A-Z](?![A-Za-z])|[a-z](?=\s*(?:[)\].:,]|$)))"
)
# A letter in brackets anywhere: "... so (C) ...".
_BRACKETED_LETTER = re.compile(r"[(\[]([A-Z])[)\]]")
# A lone capital letter anywhere; "A" and "I" followed by a lower-case word are English words, not answers.
_LONE_CAPITAL = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")
_LOWER_CASE_WORD = re.compile(r"\s+[a-z]")


def _normalise_text(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _match_option_text(text: str, options: Sequence[str]) -> str | None:
    """The letter of the one option whose text appears in ``text`` (the longest when one contains the others)."""
    haystack = f" {_normalise_text(text)} "
    hits = []
    for letter, option in zip(option_letters(len(options)), option_texts(options)):
        needle = _normalise_text(option)
        if needle and f" {needle} " in haystack:
            hits.append((len(needle), letter, needle))
    if not hits:
        return None
    hits.sort(reverse=True)
    longest = hits[0]
    if all(needle in longest[2] for _, _, needle in hits[1:]) and (len(hits) == 1 or hits[1][0] < longest[0]):
        return longest[1]
    return None


def parse_mcq_answer(text: str, num_options: int, options: Sequence[str] | None = None) -> str | None:
    """The option letter a model output chooses, or None when it names no offered letter.

    Rules, first that applies wins:
    1. a letter opening the output, alone or followed by ``)``, ``.``, ``:`` or ``,`` (``"B"``, ``"(b)"``, ``"B) ..."``,
       the usual continuation of ``Best Option: (``). This is decisive: an opening letter outside the options is wrong;
    2. ``answer``/``option``/``choice`` (``is``) followed by a letter (``"The answer is C"``);
    3. a capital letter in brackets anywhere (``"... so (C)"``);
    4. the text of exactly one option (``options`` given), the longest if one option's text contains another's;
    5. the first lone capital letter that is an offered letter (``"A"``/``"I"`` followed by a lower-case word are
       skipped as English words).
    A letter found by rules 2, 3 or 5 that is not offered is treated as no answer.
    """
    stripped = text.strip() if isinstance(text, str) else ""
    if not stripped:
        return None
    letters = set(option_letters(num_options))

    m = _LEADING_LETTER.match(stripped) or _ANSWER_PHRASE.search(stripped)  # rules 1 and 2 decide
    if m:
        letter = m.group(1).upper()
        return letter if letter in letters else None

    for m in _BRACKETED_LETTER.finditer(stripped):
        if m.group(1) in letters:
            return m.group(1)

    if options:
        letter = _match_option_text(stripped, options)
        if letter is not None:
            return letter

    for m in _LONE_CAPITAL.finditer(stripped):
        letter = m.group(1)
        if letter in ("A", "I") and _LOWER_CASE_WORD.match(stripped, m.end()):
            continue
        if letter in letters:
            return letter
    return None


_TIME = r"\d+(?::\d{1,2}){0,2}(?:\.\d+)?"
# A pair starts only where a number starts (not after a digit, `.` or `:`): each run of digits is then tried from one
# position, which keeps the search linear in the output length. Without it a 32k-digit output took 77 s.
_SECONDS_PAIR = re.compile(
    rf"(?<![\d.:])({_TIME})(?:\s*(?:seconds?|secs?|s)\b)?\s*(?:to|and|-|–|—|~)\s*({_TIME})", flags=re.IGNORECASE
)
_ANSWER_TAG = re.compile(r"<(/?)answer>", flags=re.IGNORECASE)


def _to_seconds(token: str) -> float:
    """``"12.5"`` -> 12.5; ``"1:05"`` -> 65; ``"1:02:03.5"`` -> 3723.5."""
    seconds = 0.0
    for part in token.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def _answer_blocks(text: str) -> list[str]:
    """The contents of ``<answer>...</answer>`` blocks (each from an opening tag to the next closing tag), found in one
    pass over the tags: a lazy ``<answer>(.*?)</answer>`` regex rescans the rest of the text from every unclosed tag."""
    blocks, start = [], None
    for tag in _ANSWER_TAG.finditer(text):
        if start is None and not tag.group(1):
            start = tag.end()
        elif start is not None and tag.group(1):
            blocks.append(text[start : tag.start()])
            start = None
    return blocks


def parse_timestamps(text: str) -> tuple[float, float] | None:
    """The predicted ``(start, end)`` in seconds, or None when the output has no seconds pair: the last ``"S to E"``,
    ``"S and E"`` or ``"S - E"`` pair (units such as ``s``/``seconds`` and ``mm:ss`` times are accepted), searched in
    the last ``<answer>...</answer>`` block first when there is one. A reversed pair is swapped."""
    if not isinstance(text, str):
        return None
    blocks = _answer_blocks(text)
    for source in ([blocks[-1]] if blocks else []) + [text]:
        matches = _SECONDS_PAIR.findall(source)
        if matches:
            start, end = (_to_seconds(t) for t in matches[-1])
            return (start, end) if start <= end else (end, start)
    return None


def temporal_iou(prediction: Sequence[float], target: Sequence[float]) -> float:
    """Intersection over union of two ``(start, end)`` segments (each is sorted first); two zero-length segments give
    1.0 when identical and 0.0 otherwise."""
    ps, pe = sorted(float(t) for t in prediction)
    ts, te = sorted(float(t) for t in target)
    intersection = max(0.0, min(pe, te) - max(ps, ts))
    union = (pe - ps) + (te - ts) - intersection
    if union <= 0:
        return 1.0 if (ps, pe) == (ts, te) else 0.0
    return intersection / union


# Annotations


MAX_LISTED_PROBLEMS = 50


def problem_listing(headline: str, problems: list[str]) -> str:
    """`headline`, then the first `MAX_LISTED_PROBLEMS` problems one per line (and how many more there are)."""
    listed = "".join(f"\n  {problem}" for problem in problems[:MAX_LISTED_PROBLEMS])
    more = len(problems) - MAX_LISTED_PROBLEMS
    return f"{headline}:{listed}" + (f"\n  ... and {more} more" if more > 0 else "")


def read_json_lines(path: str | os.PathLike, skip_comments: bool = False) -> Iterator[tuple[int, object, str | None]]:
    """``(line number, value, problem)`` for each non-blank line of a UTF-8 JSONL file (and not a ``#`` line, with
    ``skip_comments``). A line that is not valid UTF-8 or not JSON comes back as a problem (value None) that the
    caller reports with its line number, instead of one error for the whole file."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
                continue
            if not line.strip() or (skip_comments and line.lstrip().startswith("#")):
                continue
            try:
                yield line_no, json.loads(line), None
            except json.JSONDecodeError as e:
                yield line_no, None, f"not valid JSON ({e.msg} at column {e.colno})"


def _normalise_gt_letter(answer, options: Sequence[str]) -> str | None:
    """The ground-truth letter from ``"B"``, ``"(B)"``, ``"b"``, ``"B. text"``, an int index or an option's text."""
    letters = option_letters(len(options))
    if isinstance(answer, int) and not isinstance(answer, bool):
        return letters[answer] if 0 <= answer < len(letters) else None
    if not isinstance(answer, str):
        return None
    m = re.match(r"^\s*\(?([A-Za-z])\)?\s*(?:[.:)]\s*.*)?$", answer, flags=re.DOTALL)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    texts = [t.strip().lower() for t in option_texts(options)]
    if answer.strip().lower() in texts:
        return letters[texts.index(answer.strip().lower())]
    return None


def is_number(value) -> bool:
    """A finite int or float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optional_label(raw: dict, key: str, problems: list[str]) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    problems.append(f"{key!r} must be a string, got {type(value).__name__}")
    return None


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def validate_record(task: str, raw, video_root: str | os.PathLike | None = None) -> tuple[dict | None, list[str]]:
    """Check one parsed annotation line. Returns ``(record, problems)``; ``record`` is None when there are problems. The
    record keeps every input field and gains normalised ones: ``id`` (str), ``video`` (resolved against ``video_root``
    when relative), ``answer`` (a letter) for mcq, ``timestamps`` (sorted floats) for grounding."""
    check_task(task)
    if not isinstance(raw, dict):
        return None, [f"expected a JSON object, got {type(raw).__name__}"]
    problems: list[str] = []
    record = dict(raw)

    if not isinstance(raw.get("id"), (str, int)) or isinstance(raw.get("id"), bool) or str(raw.get("id")) == "":
        problems.append("missing or empty 'id' (a string or integer)")
    else:
        record["id"] = str(raw["id"])
    video = raw.get("video")
    if not isinstance(video, str) or not video:
        problems.append("missing or empty 'video' (a path)")
    elif video_root is not None and not os.path.isabs(video):
        record["video"] = os.path.join(os.fspath(video_root), video)

    for key in ("start", "end", "duration"):
        if key in raw and raw[key] is not None and not (is_number(raw[key]) and raw[key] >= 0):
            problems.append(f"{key!r} must be a non-negative number, got {raw[key]!r}")
    if is_number(raw.get("start")) and is_number(raw.get("end")) and raw["start"] >= raw["end"]:
        problems.append(f"'start' ({raw['start']}) must be before 'end' ({raw['end']})")

    if task == "mcq":
        if not isinstance(raw.get("question"), str):
            problems.append("missing 'question' (a string)")
        options = raw.get("options")
        if not isinstance(options, list) or not all(isinstance(o, str) and o.strip() for o in options):
            problems.append("'options' must be a list of non-empty strings")
        elif not 2 <= len(options) <= MAX_OPTIONS:
            problems.append(f"'options' must have 2 to {MAX_OPTIONS} entries, got {len(options)}")
        else:
            letter = _normalise_gt_letter(raw.get("answer"), options)
            if letter is None:
                problems.append(
                    f"'answer' {raw.get('answer')!r} is not one of the offered letters "
                    f"{''.join(option_letters(len(options)))} (or an option index or text)"
                )
            record["answer"] = letter
        record["category"] = _optional_label(raw, "category", problems)
        record["duration_group"] = _optional_label(raw, "duration_group", problems)
    else:
        if not isinstance(raw.get("query"), str) or not raw["query"].strip():
            problems.append("missing or empty 'query' (a string)")
        stamps = raw.get("timestamps")
        if not (isinstance(stamps, list) and len(stamps) == 2 and all(is_number(t) and t >= 0 for t in stamps)):
            problems.append(f"'timestamps' must be [start, end] in seconds (non-negative numbers), got {stamps!r}")
        else:
            record["timestamps"] = sorted(float(t) for t in stamps)
        if raw.get("duration") is not None and is_number(raw["duration"]) and raw["duration"] <= 0:
            problems.append(f"'duration' must be positive, got {raw['duration']}")
    return (None if problems else record), problems


def load_annotations(path: str | os.PathLike, task: str, video_root: str | os.PathLike | None = None,
                     check_videos: bool = True) -> list[dict]:
    """Read and validate a benchmark JSONL file (one record per line; blank lines and ``#`` lines are skipped). Every
    line is checked before anything is returned; all problems are raised together in one ``AnnotationError``, each as
    ``file:line: problem``. Relative ``video`` paths are joined to ``video_root`` (default: the annotation file's
    folder); with ``check_videos`` a missing video file is a problem too. Ids must be unique. Grounding records may lack
    ``duration``; the caller must fill it before building prompts."""
    path = Path(path)
    check_task(task)
    if not path.is_file():
        raise AnnotationError(f"annotation file {path} does not exist")
    root = Path(video_root) if video_root is not None else path.parent
    records: list[dict] = []
    errors: list[str] = []
    first_line_of: dict[str, int] = {}
    for line_no, raw, unreadable in read_json_lines(path, skip_comments=True):
        if unreadable:
            errors.append(f"{path}:{line_no}: {unreadable}")
            continue
        record, problems = validate_record(task, raw, root)
        if record is not None:
            if record["id"] in first_line_of:
                problems.append(f"duplicate id {record['id']!r} (first seen on line {first_line_of[record['id']]})")
            else:
                first_line_of[record["id"]] = line_no
            if check_videos and not os.path.isfile(record["video"]):
                problems.append(f"video file {record['video']} does not exist")
        errors.extend(f"{path}:{line_no}: {problem}" for problem in problems)
        if not problems:
            record["source_line"] = line_no
            records.append(record)
    if errors:
        raise AnnotationError(problem_listing(f"{len(errors)} problem(s) in {path}", errors))
    if not records:
        raise AnnotationError(f"annotation file {path} has no records")
    return records


# Sharding


def shard_indices(num_items: int, num_shards: int, shard_index: int) -> list[int]:
    """Item indices of one shard, by the reference's zigzag rule with balanced chunk sizes. The items are cut into
    ``2 * num_shards`` contiguous chunks; shard ``i`` takes chunks ``i`` and ``2 * num_shards - 1 - i``, so when items
    are sorted by length every shard gets a similar mix. Chunk sizes are chosen so that shard sizes differ by at most
    one. Every item lands in exactly one shard, and the split depends only on the three numbers."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    quotas = [num_items // num_shards + (i < num_items % num_shards) for i in range(num_shards)]
    # chunk i is the front half of shard i's quota; chunk 2K-1-i is its back half.
    sizes = [(q + 1) // 2 for q in quotas] + [q // 2 for q in reversed(quotas)]
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    first, second = shard_index, 2 * num_shards - 1 - shard_index
    return [*range(starts[first], starts[first] + sizes[first]), *range(starts[second], starts[second] + sizes[second])]


def shard_items(items: Sequence, num_shards: int, shard_index: int) -> list:
    """The items of one shard (see ``shard_indices``), in their original order."""
    return [items[i] for i in shard_indices(len(items), num_shards, shard_index)]


def group_by_video(items: Sequence[dict]) -> list[dict]:
    """The items with the questions about each video next to each other: videos in the order they first appear,
    each video's items in their own order. An answer function can then reuse a video's state across them."""
    first_seen: dict[str, int] = {}
    for item in items:
        first_seen.setdefault(item["video"], len(first_seen))
    return sorted(items, key=lambda item: first_seen[item["video"]])


def shard_output_path(output_dir: str | os.PathLike, name: str, shard_index: int, num_shards: int) -> Path:
    """``{output_dir}/{name}.shard{i}of{K}.jsonl``."""
    return Path(output_dir) / f"{name}.shard{shard_index}of{num_shards}.jsonl"


_SHARD_FILE = re.compile(r"^(?P<name>.+)\.shard(?P<index>\d+)of(?P<total>\d+)\.jsonl$")


# Resumable predictions


def read_predictions(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """The prediction records of a JSONL file (an empty list when it does not exist). A last line that is not valid JSON
    is taken as a write cut short by a crash: it is ignored, and with ``repair`` it is cut off the file so that later
    appends start on a clean line (a valid last line that lacks its newline gets one). A bad line anywhere else raises
    ``PredictionFileError`` naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records: list[dict] = []
    offset = 0
    for line_no, raw in enumerate(lines, start=1):
        line_start = offset
        offset += len(raw) + 1
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or "id" not in record:
                raise ValueError("not an object with an 'id'")
        except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            if any(rest.strip() for rest in lines[line_no:]):
                raise PredictionFileError(f"{path}:{line_no}: corrupt prediction line ({e}); fix or delete it") from e
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(line_start)
            return records
        records.append(record)
    if repair and data and not data.endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
    return records


def make_prediction(task: str, record: dict, output: str, sampling: FrameSampling = FrameSampling()) -> dict:
    """The JSONL line for one answered item: the inputs needed for scoring, the raw output and its parse."""
    line = {"id": record["id"], "task": task, "video": record["video"]}
    if task == "mcq":
        parsed = parse_mcq_answer(output, len(record["options"]), record["options"])
        line.update(options=record["options"], answer=record["answer"], category=record.get("category"),
                    duration_group=record.get("duration_group"), prediction=output, parsed=parsed,
                    correct=parsed == record["answer"])
    else:
        predicted = parse_timestamps(output)
        line.update(query=record["query"], timestamps=record["timestamps"], duration=record["duration"],
                    num_frames=sampling.num_frames(record["duration"]), prediction=output,
                    pred_timestamps=list(predicted) if predicted is not None else None,
                    iou=temporal_iou(predicted, record["timestamps"]) if predicted is not None else 0.0)
    return line


@dataclass
class RunSummary:
    """What ``run_items`` did: items found finished in the output file, and items answered now."""

    output_path: Path
    num_items: int
    num_skipped: int
    num_answered: int


def run_items(items: Sequence[dict], answer_fn: AnswerFn, output_path: str | os.PathLike, task: str,
              sampling: FrameSampling = FrameSampling(), on_item: Callable[[dict, dict], None] | None = None
              ) -> RunSummary:
    """Answer every item not yet in ``output_path``, appending one JSON line per item (flushed at once). ``sampling``
    sets the frame count stated in grounding prompts; it must match the sampling of ``answer_fn``. Items whose ``id`` is
    already in the file are skipped, so an interrupted run continues where it stopped; a line cut short by a crash is
    dropped and its item redone. ``on_item(record, prediction_line)`` is called after each write (progress reporting).
    Exceptions from ``answer_fn`` propagate, naming the item."""
    check_task(task)
    if task == "grounding":
        undated = [record["id"] for record in items if not record.get("duration")]
        if undated:
            raise ValueError(
                f"grounding items need a positive 'duration' for the prompt; missing for ids {undated[:10]}"
            )
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    finished = read_predictions(output_path, repair=True)
    for line in finished:
        if line.get("task", task) != task:
            raise PredictionFileError(
                f"{output_path} holds {line.get('task')!r} predictions, but this run is {task!r}; "
                "use another output directory or --name"
            )
    done = {str(line["id"]) for line in finished}
    todo = [record for record in items if record["id"] not in done]
    with open(output_path, "a", encoding="utf-8") as f:
        for record in todo:
            prompt, answer_prompt = build_prompt(task, record, sampling)
            try:
                output = answer_fn(record, prompt, answer_prompt)
            except Exception as e:
                raise RuntimeError(f"answering item {record['id']!r} (video {record['video']}) failed: {e}") from e
            line = make_prediction(task, record, output, sampling)
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            if on_item is not None:
                on_item(record, line)
    return RunSummary(output_path, len(items), len(items) - len(todo), len(todo))


# Metrics


def _accuracy_block(correct: int, total: int) -> dict:
    return {"accuracy": 100.0 * correct / total if total else 0.0, "correct": correct, "total": total}


def compute_mcq_metrics(predictions: Iterable[dict]) -> dict:
    """Accuracy (percent) overall, per ``category`` and per ``duration_group``. Each prediction's raw output is parsed
    again (so the current parsing rules apply); an unparsed output is wrong and counted in ``num_unparsed``. Items
    without a category or duration group are left out of that table."""
    total = correct = unparsed = 0
    # key -> label -> [correct, total]
    groups = {key: defaultdict(lambda: [0, 0]) for key in ("category", "duration_group")}
    for line in predictions:
        parsed = parse_mcq_answer(line.get("prediction"), len(line["options"]), line["options"])
        hit = parsed is not None and parsed == line["answer"]
        total += 1
        correct += hit
        unparsed += parsed is None
        for key, table in groups.items():
            if line.get(key) is not None:
                table[str(line[key])][0] += hit
                table[str(line[key])][1] += 1
    return {
        "task": "mcq",
        **_accuracy_block(correct, total),
        "num_unparsed": unparsed,
        "per_category": {k: _accuracy_block(*v) for k, v in sorted(groups["category"].items())},
        "per_duration_group": {k: _accuracy_block(*v) for k, v in sorted(groups["duration_group"].items())},
    }


def compute_grounding_metrics(predictions: Iterable[dict], thresholds: Sequence[float] = RECALL_THRESHOLDS) -> dict:
    """mIoU and R@t (IoU >= t) as percentages; an output with no seconds pair has IoU 0 (``num_unparsed``)."""
    ious, unparsed = [], 0
    for line in predictions:
        predicted = parse_timestamps(line.get("prediction"))
        unparsed += predicted is None
        ious.append(temporal_iou(predicted, line["timestamps"]) if predicted is not None else 0.0)
    n = len(ious)
    metrics = {"task": "grounding", "total": n, "num_unparsed": unparsed, "mIoU": 100.0 * sum(ious) / n if n else 0.0}
    for t in thresholds:
        metrics[f"R@{t}"] = 100.0 * sum(iou >= t for iou in ious) / n if n else 0.0
    return metrics


def compute_metrics(task: str, predictions: Iterable[dict]) -> dict:
    if task == "mcq":
        return compute_mcq_metrics(predictions)
    if task == "grounding":
        return compute_grounding_metrics(predictions)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# Merging shards


def merge_shards(output_dir: str | os.PathLike, name: str) -> tuple[list[dict], dict]:
    """All predictions of ``name`` across its shard files, each id once (first file in (K, i) order wins). Returns
    ``(predictions, info)``; ``info`` lists the files read, shard files missing for a shard count seen (e.g.
    ``x.shard1of4.jsonl`` when only 0, 2 and 3 of 4 exist) and the number of duplicate ids dropped."""
    shards = []  # (K, i, path) of every {name}.shard{i}of{K}.jsonl
    for path in Path(output_dir).glob(f"{glob.escape(name)}.shard*of*.jsonl"):
        m = _SHARD_FILE.match(path.name)
        if m and m.group("name") == name:
            shards.append((int(m.group("total")), int(m.group("index")), path))
    if not shards:
        raise FileNotFoundError(f"no prediction files {name}.shard*of*.jsonl in {output_dir}")
    shards.sort()
    seen: dict[int, set[int]] = defaultdict(set)
    predictions, ids, duplicates = [], set(), 0
    for total, index, path in shards:
        seen[total].add(index)
        for line in read_predictions(path):
            key = str(line["id"])
            if key in ids:
                duplicates += 1
                continue
            ids.add(key)
            predictions.append(line)
    missing = [f"{name}.shard{i}of{total}.jsonl" for total, indices in sorted(seen.items())
               for i in range(total) if i not in indices]
    files = [path.name for _, _, path in shards]
    info = {"files": files, "missing_shard_files": missing, "num_duplicates_dropped": duplicates}
    return predictions, info


def score_output_dir(output_dir: str | os.PathLike, name: str, task: str,
                     expected_ids: Iterable[str] | None = None) -> dict:
    """Merge the shard files of ``name``, write ``{name}.merged.jsonl`` and update ``metrics.json``; return metrics.
    ``metrics.json`` maps each ``name`` scored in this folder to its metrics. With ``expected_ids`` (the annotation
    ids), predictions for other ids are left out and ``num_missing`` counts ids with no prediction."""
    output_dir = Path(output_dir)
    predictions, info = merge_shards(output_dir, name)
    for line in predictions:
        if line.get("task", task) != task:
            raise PredictionFileError(
                f"prediction {line['id']!r} of {name!r} is a {line.get('task')!r} prediction, not {task!r}"
            )
    coverage: dict = {}
    if expected_ids is not None:
        expected = {str(i) for i in expected_ids}
        unexpected = sum(str(line["id"]) not in expected for line in predictions)
        predictions = [line for line in predictions if str(line["id"]) in expected]
        coverage = {
            "num_expected": len(expected),
            "num_missing": len(expected - {str(line["id"]) for line in predictions}),
            "num_unexpected_dropped": unexpected,
        }
    metrics = {"name": name, **compute_metrics(task, predictions), **coverage, **info}

    merged = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in predictions)
    write_atomically(output_dir / f"{name}.merged.jsonl", merged)
    update_metrics_file(output_dir, name, metrics)
    return metrics


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file of its own next to ``path`` and rename it into place: a reader (or a crash)
    never sees half a file, and concurrent writers never share a temporary file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # the permissions a plain open() gives, not mkstemp's owner-only ones
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def update_metrics_file(output_dir: Path, name: str, metrics: dict) -> None:
    """Set ``metrics.json[name]``. The read-modify-write holds an exclusive lock on ``metrics.json.lock``, so
    concurrent ``score`` runs of other names into the same folder each keep their entry."""
    path = output_dir / "metrics.json"
    with open(output_dir / "metrics.json.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        all_metrics = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        all_metrics[name] = metrics
        write_atomically(path, json.dumps(all_metrics, indent=2, ensure_ascii=False) + "\n")
