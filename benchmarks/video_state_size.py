"""Bytes per frame of a video state (`TimeViperVideoState.memory_bytes`) at Nano-9B-v2's hidden size, layer pattern
and attention shapes with the paper's schedule `uni_7_0.5-attn_39_0.05`, on the CPU: two states (32 and 64
frames, random bf16 weights and features) and the difference per frame. The MLP width, Mamba heads and vocabulary
are shrunk: they do not enter the per-frame size (Mamba states are constant in the length), so it runs anywhere.

    python benchmarks/video_state_size.py
"""

import torch

from common import TINY_VISION  # benchmarks/common.py (this script's folder is on sys.path)
from timeviper.configuration_timeviper import TimeViperConfig, nano_9b_v2_text_config, so400m_vision_config
from timeviper.modeling_timeviper import TimeViperForConditionalGeneration


def main():
    vision = so400m_vision_config(**TINY_VISION)
    text = nano_9b_v2_text_config(intermediate_size=64, mamba_num_heads=8, vocab_size=512)
    config = TimeViperConfig(vision_config=vision, text_config=text, token_compression="uni_7_0.5-attn_39_0.05",
                             image_token_id=512, video_token_id=513)
    torch.manual_seed(0)
    model = TimeViperForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    sizes = {}
    for frames in (32, 64):
        ids = torch.tensor([[5, 6] + [config.video_token_id] * (config.vision_tokens_per_frame * frames) + [7, 8]])
        features = torch.randn(frames, config.vision_tokens_per_frame, text.hidden_size, dtype=torch.bfloat16)
        with torch.no_grad():
            state = model.encode_video_state(ids, video_features=features, prefill_chunk_size=512)
        sizes[frames] = state.memory_bytes()
        print(f"{frames} frames: {sizes[frames]:,} bytes")
    per_frame = (sizes[64] - sizes[32]) / 32
    print(f"per frame: {per_frame:,.0f} bytes ({per_frame / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
