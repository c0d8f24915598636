"""Inputs of the multi-GPU training benchmark, written under --work: `model/` (a full-size random TimeViper
checkpoint with the TransV schedule's modules, its processor and remote code, loadable by `python -m training.train
--model`), `data/` (a synthetic H.264 clip, train.jsonl and the collated probe batches) and `prepared.json` (sizes and
parameter counts; written last, so its presence means the folder is complete).

    PYTHONPATH=. python benchmarks/multi_gpu/prepare.py --work /tmp/tv_multi_gpu            # GPU: full size
    PYTHONPATH=. python benchmarks/multi_gpu/prepare.py --work /tmp/tv_tiny --tiny --frames 8 # CPU smoke run
"""

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import TINY_NANO, TINY_VISION
from inference.tiny_default import make_processor, make_tiny_tokenizer, use_tokenizer_ids, write_sample_video
from timeviper import copy_remote_code
from timeviper.configuration_timeviper import TimeViperConfig, nano_9b_v2_text_config, so400m_vision_config
from timeviper.modeling_timeviper import TimeViperForConditionalGeneration
from training.data import TimeViperDataCollator, TimeViperSFTDataset

SCHEDULE = "uni_7_0.5-attn_39_0.05"
VIDEO_FPS = 8
VIDEO_SIZE = 64
TRAIN_TURNS = [{"role": "user", "content": "<video>What happens in this video?"},
               {"role": "assistant", "content": "A red square slides from the left edge to the right edge."}]
MODULE_PREFIXES = {"vision": "model.vision_tower.", "projector": "model.multi_modal_projector.",
                   "transv": "model.language_model.merge_modules."}
PROBE_TURNS = [{"role": "user", "content": "<video>Describe the colours."},
               {"role": "assistant", "content": "A gradient with a red square."}]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="folder to write model/, data/ and prepared.json into")
    p.add_argument("--tiny", action="store_true", help="tiny widths (CPU smoke run of the benchmark's scripts)")
    p.add_argument("--frames", type=int, default=256, help="frames of the clip (all are sampled in training)")
    p.add_argument("--samples", type=int, default=64, help="lines of train.jsonl (>= steps x GPUs avoids a 2nd epoch)")
    p.add_argument("--schedule", default=SCHEDULE, help="TransV schedule of the checkpoint")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_config(tokenizer, tiny: bool, schedule: str | None, **text_overrides) -> TimeViperConfig:
    """Full-size (or --tiny) TimeViper whose placeholder and special ids are the byte-level tokenizer's."""
    special_ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id)
    text = nano_9b_v2_text_config(**special_ids, **(TINY_NANO if tiny else {}), **text_overrides)
    if len(tokenizer) > text.vocab_size:
        raise ValueError(f"the tokenizer's {len(tokenizer)} ids do not fit the vocabulary of {text.vocab_size}")
    return TimeViperConfig(vision_config=so400m_vision_config(**(TINY_VISION if tiny else {})), text_config=text,
                           token_compression=schedule, video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"))


def build_checkpoint(folder: Path, tiny: bool, schedule: str, seed: int) -> dict:
    """Build the random model in bf16 directly on the GPU (seconds, no fp32 copy on the host) and save it with its
    processor and remote code. Returns parameter counts and the size on disk."""
    tokenizer = make_tiny_tokenizer("nemotron_h")
    config = make_config(tokenizer, tiny, schedule)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = TimeViperForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    image_size = config.vision_config.image_size
    processor = make_processor(tokenizer, "nemotron_h", config.vision_tokens_per_frame, image_size)
    use_tokenizer_ids(model, processor)
    model.save_pretrained(folder)  # with auto_map and the code files
    processor.save_pretrained(folder)
    copy_remote_code(folder)
    counts = parameter_counts(model)
    del model
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"parameters": counts, "checkpoint_gib": weights / 2**30, "image_size": image_size,
            "tokens_per_frame": config.vision_tokens_per_frame, "vocab_size": config.text_config.vocab_size,
            "tokenizer_ids": len(tokenizer), "build_device": device}


def module_group(name: str) -> str:
    """`vision` (frozen in every stage), `projector`, `transv` (TransV cross-attentions) or `llm` (the rest of the
    language model and lm_head) for a parameter name."""
    return next((group for group, prefix in MODULE_PREFIXES.items() if name.startswith(prefix)), "llm")


def parameter_counts(model) -> dict:
    counts = {name: 0 for name in (*MODULE_PREFIXES, "llm")}
    for name, parameter in model.named_parameters():
        counts[module_group(name)] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


def write_data(folder: Path, frames: int, samples: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_sample_video(folder / "clip.mp4", seconds=frames // VIDEO_FPS, fps=VIDEO_FPS, size=VIDEO_SIZE)
    for name, turns, count in (("train.jsonl", TRAIN_TURNS, samples), ("probe.jsonl", PROBE_TURNS, 1)):
        lines = [json.dumps({"id": f"{name.split('.')[0]}-{i}", "video": "clip.mp4", "conversations": turns})
                 for i in range(count)]
        (folder / name).write_text("\n".join(lines) + "\n")


def without_video(batch: dict, video_token_id: int) -> dict:
    """The probe with its placeholders and frames removed: the language model alone (no vision tower, no compression
    stage), so a difference in its logits is not amplified by a different choice of kept vision tokens, and its
    intermediate outputs are small enough to keep (block_outputs.py)."""
    keep = batch["input_ids"][0] != video_token_id
    return {key: batch[key][:, keep] for key in ("input_ids", "attention_mask", "labels")}


def probe_paths(batch_path: str | Path) -> dict[str, Path]:
    """The video probe and its text-only twin (written together by `write_probe_batch`)."""
    return {"video": Path(batch_path), "text": Path(batch_path).with_name("probe_text_batch.pt")}


def write_probe_batch(model_folder: Path, data: Path, frames: int) -> dict:
    """The probe sample through the training dataset and collator, with the processor saved in the model folder;
    also the length of a training sample (tokens per GPU and step)."""
    from timeviper.processing_timeviper import TimeViperProcessor

    processor = TimeViperProcessor.from_pretrained(model_folder, trust_remote_code=True)

    def first_sample(name: str) -> dict:
        return TimeViperSFTDataset(data / name, processor, video_root=data, num_frames=frames, max_frames=frames)[0]

    batch = TimeViperDataCollator.from_processor(processor)([first_sample("probe.jsonl")])
    torch.save(batch, data / "probe_batch.pt")
    torch.save(without_video(batch, processor.video_token_id), data / "probe_text_batch.pt")
    return {"train_tokens": len(first_sample("train.jsonl")["input_ids"]), "probe_tokens": batch["input_ids"].shape[1],
            "probe_frames": batch["pixel_values_videos"].shape[0]}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.frames % VIDEO_FPS:
        raise SystemExit(f"--frames must be a multiple of {VIDEO_FPS} (the clip is written at {VIDEO_FPS} fps)")
    work = Path(args.work)
    marker = work / "prepared.json"
    marker.unlink(missing_ok=True)
    start = time.perf_counter()
    summary = build_checkpoint(work / "model", args.tiny, args.schedule, args.seed)
    summary["checkpoint_s"] = time.perf_counter() - start
    write_data(work / "data", args.frames, args.samples)
    summary.update(write_probe_batch(work / "model", work / "data", args.frames))
    summary.update(tiny=args.tiny, frames=args.frames, samples=args.samples, schedule=args.schedule, seed=args.seed,
                   seconds=time.perf_counter() - start)
    marker.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), flush=True)


if __name__ == "__main__":
    main()
