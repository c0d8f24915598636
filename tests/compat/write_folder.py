"""Write the folder the compatibility check loads: the embedded tiny model with a TransV schedule and a trained-looking
(non-zero) TransV gate, saved by the package's own `save_pretrained`, plus two short clips of different lengths.

Usage: python tests/compat/write_folder.py OUTPUT_DIR   (with the package importable)
"""

import sys
from pathlib import Path

import torch

from inference.tiny_default import build_tiny_default, write_sample_video

# TransV at block 1 (uniform, keep half) and attention-guided dropping at block 2: decode steps must read the cached
# TransV memory and the per-block KV of different lengths.
SCHEDULE = "uni_1_0.5-attn_2_0.25"


def main(output: Path) -> None:
    model, processor = build_tiny_default(token_compression=SCHEDULE)
    with torch.no_grad():
        for transfer in model.model.language_model.merge_modules.values():
            transfer.alpha.fill_(0.7)  # a gate of 0 would make TransV plain dropping and hide a TransV cache bug
    model.save_pretrained(output)
    processor.save_pretrained(output)
    write_sample_video(output / "clip_long.mp4", seconds=5, fps=4)
    write_sample_video(output / "clip_short.mp4", seconds=3, fps=4)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
