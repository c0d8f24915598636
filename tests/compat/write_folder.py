"""Write the folders the compatibility check loads: the embedded tiny model (Nemotron-H backbone in OUTPUT_DIR, Qwen2
in OUTPUT_DIR-qwen2) with a TransV schedule and trained-looking (non-zero) TransV gates, saved by the package's own
`save_pretrained`, plus two short clips of different lengths.

Usage: python tests/compat/write_folder.py OUTPUT_DIR   (with the package importable)
"""

import sys
from pathlib import Path

import torch

from inference.tiny_default import build_tiny_default, write_sample_video

# TransV at block 1 (uniform, keep half) and attention-guided dropping at block 2: decode steps must read the cached
# TransV memory and the per-block KV of different lengths.
SCHEDULE = "uni_1_0.5-attn_2_0.25"


def write_folder(output: Path, backbone: str) -> None:
    model, processor = build_tiny_default(backbone, token_compression=SCHEDULE)
    with torch.no_grad():
        for transfer in model.model.language_model.merge_modules.values():
            transfer.alpha.fill_(0.7)  # a gate of 0 would make TransV plain dropping and hide a TransV cache bug
    model.save_pretrained(output)
    processor.save_pretrained(output)
    write_sample_video(output / "clip_long.mp4", seconds=5, fps=4)
    write_sample_video(output / "clip_short.mp4", seconds=3, fps=4)


def main(output: Path) -> None:
    write_folder(output, "nemotron_h")
    write_folder(output.with_name(output.name + "-qwen2"), "qwen2")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
