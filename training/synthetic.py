"""A synthetic long-video task family, generated on the fly: find the needle.

Every clip is `num_frames` seconds of video at one frame per second: grey squares (the haystack) drift over a dark
background, and once, at a random time, a large square of one colour (the needle) shows for `NEEDLE_SECONDS`
seconds. The question asks for the needle's colour in the multiple-choice form of the evaluation harness
(`evaluation.tasks.build_mcq_prompt`: question, lettered options, instruction; the answer starts with
`Best Option: (`). The options always come in the order of `COLORS`, so the task needs the video and nothing else:
a model that ignores it gets 25 %.

A clip is fully determined by `(seed, num_frames)`, so training, held-out evaluation and the `ask` default use
disjoint seed ranges of the same family.

    python -m training.synthetic --out data/needle --num-samples 1600 --min-frames 8 --max-frames 32 --seed 0

writes `videos/*.mp4`, `train.jsonl` (the training format of training/README.md) and `eval.jsonl` (the MCQ
annotation format of evaluation/README.md) for the same clips.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.tasks import build_mcq_prompt, option_letters
from inference.tiny_default import write_video
from timeviper.processing_timeviper import MCQ_ANSWER_PROMPT

# Colour name -> RGB. Far apart in every channel, so they survive H.264's chroma subsampling and a random vision tower.
COLORS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 235), "yellow": (235, 220, 30)}
QUESTION = "What colour is the square that appears for a moment?"
NEEDLE_SECONDS = 2
FRAME_SIZE = 32  # pixels; even, as yuv420p needs
NUM_DISTRACTORS = 3
# Seeds at or above this value are held out from training (evaluation, tests, the ask default).
HELD_OUT_SEED_START = 1_000_000


@dataclass(frozen=True)
class NeedleClip:
    """One clip of the family: its length, where the needle is, which colour it has."""

    seed: int
    num_frames: int
    needle_start: int
    color: str

    @classmethod
    def draw(cls, seed: int, num_frames: int) -> "NeedleClip":
        if num_frames < NEEDLE_SECONDS:
            raise ValueError(f"num_frames must be at least {NEEDLE_SECONDS} (the needle's length), got {num_frames}")
        rng = np.random.default_rng([seed, num_frames])
        start = int(rng.integers(0, num_frames - NEEDLE_SECONDS + 1))
        return cls(seed, num_frames, start, list(COLORS)[int(rng.integers(len(COLORS)))])

    @property
    def needle_frames(self) -> range:
        """Indices (= seconds) of the frames that show the needle."""
        return range(self.needle_start, self.needle_start + NEEDLE_SECONDS)

    @property
    def answer_letter(self) -> str:
        return option_letters(len(COLORS))[list(COLORS).index(self.color)]

    @property
    def answer_text(self) -> str:
        """The assistant's answer as trained: the harness's answer prompt, then letter and option."""
        return f"{MCQ_ANSWER_PROMPT}{self.answer_letter}) {self.color}"

    def frames(self) -> np.ndarray:
        """(num_frames, FRAME_SIZE, FRAME_SIZE, 3) uint8 RGB."""
        # A second stream for the pixels, independent of the one that places and colours the needle.
        rng = np.random.default_rng([self.seed + 0x5EED, self.num_frames])
        size = FRAME_SIZE
        video = np.full((self.num_frames, size, size, 3), 24, np.uint8)
        side = size // 4
        position = rng.uniform(0, size - side, (NUM_DISTRACTORS, 2))
        velocity = rng.uniform(-2, 2, (NUM_DISTRACTORS, 2))
        shade = rng.integers(110, 200, NUM_DISTRACTORS)
        for t in range(self.num_frames):
            for (y, x), grey in zip(position.astype(int), shade):
                video[t, y : y + side, x : x + side] = grey
            position += velocity
            bounce = (position < 0) | (position > size - side)
            velocity[bounce] *= -1
            position = position.clip(0, size - side)
        needle = size * 3 // 4  # most of the frame: a strong signal for a tiny model and 4 tokens per frame
        y, x = rng.integers(0, size - needle + 1, 2)
        video[self.needle_frames.start : self.needle_frames.stop, y : y + needle, x : x + needle] = COLORS[self.color]
        return video

    def write_video(self, path) -> Path:
        """The clip as an H.264 (or MPEG-4 Part 2) file at 1 frame per second."""
        return write_video(path, self.frames(), fps=1, crf="18")

    def mcq_record(self, video: str) -> dict:
        """An MCQ annotation line of the evaluation harness."""
        return {
            "id": f"needle-{self.num_frames}f-{self.seed}",
            "video": video,
            "question": QUESTION,
            "options": list(COLORS),
            "answer": self.answer_letter,
            "duration": float(self.num_frames),
        }

    def training_record(self, video: str) -> dict:
        """A training JSONL line: the harness's MCQ prompt as the user turn, the lettered answer as the assistant's."""
        prompt = build_mcq_prompt(QUESTION, list(COLORS))
        return {
            "id": f"needle-{self.num_frames}f-{self.seed}",
            "video": video,
            "conversations": [
                {"role": "user", "content": f"<video>{prompt}"},
                {"role": "assistant", "content": self.answer_text},
            ],
        }


def write_split(out: Path, seeds, frame_counts) -> list[NeedleClip]:
    """Videos under `out/videos`, and the same clips as `out/train.jsonl` and `out/eval.jsonl` (MCQ annotations)."""
    clips = [NeedleClip.draw(seed, n) for seed, n in zip(seeds, frame_counts)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "eval.jsonl", "w") as eval_file, open(out / "train.jsonl", "w") as train_file:
        for clip in clips:
            name = f"videos/{clip.num_frames:05d}f_{clip.seed}.mp4"
            clip.write_video(out / name)
            eval_file.write(json.dumps(clip.mcq_record(name)) + "\n")
            train_file.write(json.dumps(clip.training_record(name)) + "\n")
    return clips


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for videos/, train.jsonl and eval.jsonl")
    parser.add_argument("--num-samples", type=int, required=True)
    parser.add_argument("--min-frames", type=int, default=8, help="shortest clip, in frames (= seconds)")
    parser.add_argument("--max-frames", type=int, default=32, help="longest clip, in frames (= seconds)")
    parser.add_argument("--seed", type=int, default=0, help="first clip seed; clip i has seed + i")
    args = parser.parse_args(argv)
    if not NEEDLE_SECONDS <= args.min_frames <= args.max_frames:
        parser.error(f"need {NEEDLE_SECONDS} <= --min-frames <= --max-frames")
    if args.num_samples < 1:
        parser.error("--num-samples must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    seeds = range(args.seed, args.seed + args.num_samples)
    lengths = np.random.default_rng(args.seed).integers(args.min_frames, args.max_frames + 1, args.num_samples)
    clips = write_split(Path(args.out), seeds, [int(n) for n in lengths])
    print(f"wrote {len(clips)} clips of {args.min_frames}-{args.max_frames} frames to {args.out}")


if __name__ == "__main__":
    main()
