"""Train the embedded default model: a tiny TimeViper that finds the needle (training/synthetic.py), in minutes on
one CPU core.

    ./timeviper.sh python -m training.train_default            # writes inference/needle_model/

It generates the training clips, then runs this package's training command (`training.train`, the Hugging Face
Trainer) twice, as the paper does: stage 1 trains the projector of a fresh tiny model (vision tower and LLM frozen,
no compression), stage 2 trains projector, LLM and the TransV modules of `SCHEDULE` (vision frozen). The result
is copied without optimizer state or code files into `--out`. A fixed `--seed` fixes the clips, their order and the
initial weights; the trained weights still differ between runs (floating-point differences grow during stage 2), and
so can the accuracy: check a new model with tests/test_needle_model.py before shipping it (README, "The embedded
trained model").
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from training import synthetic
from training import train as train_cli

# Tiny LLM blocks: 0 Mamba, 1 MLP, 2 attention, 3 Mamba, 4 MLP, 5 Mamba, 6 attention, 7 Mamba. Uniform compression
# before block 3, attention-guided before block 6 (an attention block), both with TransV; the paper's
# `uni_7_0.5-attn_39_0.05` at this depth.
SCHEDULE = "uni_3_0.5-attn_6_0.1"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "inference" / "needle_model"
# What a loadable folder needs; the Trainer's optimizer / RNG state and the remote-code copies stay behind.
SHIPPED_FILES = (
    "model.safetensors", "config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
    "tokenizer_config.json", "chat_template.jinja",
)
COMMON_ARGS = [
    "--per_device_train_batch_size", "8", "--dataloader_num_workers", "0", "--save_strategy", "no",
    "--report_to", "none", "--logging_steps", "25", "--weight_decay", "0.0",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"where the trained model goes (default {DEFAULT_OUT})")
    parser.add_argument("--work-dir", help="keep the generated clips and both stages' folders here (default: a temp dir)")
    parser.add_argument("--num-samples", type=int, default=1600, help="training clips")
    parser.add_argument("--min-frames", type=int, default=8)
    parser.add_argument("--max-frames", type=int, default=32)
    parser.add_argument("--stage1-steps", type=int, default=100)
    parser.add_argument("--stage2-steps", type=int, default=800)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="a model trained from scratch needs more than the paper's 1e-5")
    parser.add_argument("--projector-lr", type=float, default=5e-3, help="the projector must lift the needle's colour out of frozen random vision features")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (more than the free cores slows it down)")
    return parser.parse_args(argv)


def train_stages(args, work: Path) -> Path:
    data = work / "data"
    synthetic.main(["--out", str(data), "--num-samples", str(args.num_samples), "--min-frames", str(args.min_frames),
                    "--max-frames", str(args.max_frames), "--seed", str(args.seed)])
    common = ["--data", str(data / "train.jsonl"), "--video-root", str(data), "--seed", str(args.seed),
              "--learning_rate", str(args.learning_rate), "--projector_lr", str(args.projector_lr), "--max_frames", str(args.max_frames), *COMMON_ARGS]
    stage1, stage2 = work / "stage1", work / "stage2"
    train_cli.main(["--tiny", "--stage", "1", "--output_dir", str(stage1), "--max_steps", str(args.stage1_steps),
                    "--warmup_steps", "0.05", *common])
    train_cli.main(["--model", str(stage1), "--stage", "2", "--token-compression", SCHEDULE, "--output_dir",
                    str(stage2), "--max_steps", str(args.stage2_steps), *common])
    return stage2


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work_dir or scratch)
        trained = train_stages(args, work)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name in SHIPPED_FILES:
            shutil.copyfile(trained / name, out / name)
    print(f"trained model written to {out}")


if __name__ == "__main__":
    main()
