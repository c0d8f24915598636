"""The embedded tiny default: a random-weight TimeViper small enough for any CPU, its byte-level tokenizer and
processor, and a generated sample video. It exercises the whole pipeline; its answers are noise."""

from pathlib import Path

import numpy as np

from timeviper.configuration_timeviper import TimeViperConfig

TINY_IMAGE_SIZE = 28
_SPECIALS = {
    # special tokens in id order, and which of them are unk / pad / eos
    "nemotron_h": (["<unk>", "<pad>", "</s>", "<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>"], "<unk>", "<pad>", "</s>"),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>", "<|endoftext|>"),
}
PLACEHOLDER_TOKENS = ["<video>", "<image>"]


def make_tiny_tokenizer(backbone: str = "nemotron_h"):
    """A deterministic byte-level tokenizer (one token per byte, no merges) built offline: the backbone's special
    tokens, `<video>`, `<image>`, then the 256 byte symbols. Any text round-trips through encode/decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if backbone not in _SPECIALS:
        raise ValueError(f"Unknown backbone {backbone!r}; expected one of {sorted(_SPECIALS)}.")
    specials, unk, pad, eos = _SPECIALS[backbone]
    all_specials = specials + PLACEHOLDER_TOKENS
    vocab = {token: i for i, token in enumerate(all_specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(all_specials)
    kwargs = {"pad_token": pad, "eos_token": eos}
    if unk is not None:
        kwargs["unk_token"] = unk
    extra = [t for t in all_specials if t not in (unk, pad, eos)]
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, additional_special_tokens=extra, padding_side="right", **kwargs)


def tiny_vision_config() -> dict:
    """A 3-block SigLIP on 28-pixel frames (a 7 x 7 patch grid)."""
    return dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=TINY_IMAGE_SIZE,
        patch_size=4, hidden_act="gelu", layer_norm_eps=1e-6, vision_use_head=False,
    )


def tiny_text_config(backbone: str, vocab_size: int) -> dict:
    """A 4-layer Qwen2, or a Nemotron-H with Mamba, MLP and attention blocks in the order `M-*M-M*M`: every block type,
    and attention blocks at 2 and 6 for attention-guided compression stages."""
    if backbone == "qwen2":
        return dict(
            model_type="qwen2", vocab_size=vocab_size, hidden_size=48, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768,
            tie_word_embeddings=False,
        )
    if backbone != "nemotron_h":
        raise ValueError(f"Unknown backbone {backbone!r}; expected one of {sorted(_SPECIALS)}.")
    return dict(
        model_type="nemotron_h", vocab_size=vocab_size, hidden_size=48, hybrid_override_pattern="M-*M-M*M",
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, intermediate_size=64, mamba_num_heads=4,
        mamba_head_dim=8, ssm_state_size=8, n_groups=2, conv_kernel=4, chunk_size=8, time_step_limit=(0.0, float("inf")),
    )


def build_tiny_default(backbone: str = "nemotron_h", token_compression=None, projector_type: str = "tome_mlp", seed: int | None = 0):
    """(model, processor) with random weights: the pipeline end to end, nothing downloaded. `seed=None` leaves the
    global RNG as the caller set it."""
    import torch

    from timeviper.modeling_timeviper import TimeViperForConditionalGeneration

    tokenizer = make_tiny_tokenizer(backbone)
    text = {**tiny_text_config(backbone, len(tokenizer)), "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id}
    config = TimeViperConfig(
        vision_config=tiny_vision_config(), text_config=text, projector_type=projector_type, tokens_per_frame=4,
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), token_compression=token_compression,
    )
    if seed is not None:
        torch.manual_seed(seed)
    model = TimeViperForConditionalGeneration(config).eval()
    processor = make_processor(tokenizer, backbone, config.vision_tokens_per_frame, TINY_IMAGE_SIZE)
    use_tokenizer_ids(model, processor)
    return model, processor


def make_processor(tokenizer, backbone: str, tokens_per_frame: int, image_size: int):
    """A TimeViper processor around `tokenizer`, with the backbone's chat template and square frames of `image_size`."""
    from timeviper.processing_timeviper import TimeViperProcessor, TimeViperVideoProcessor, get_chat_template

    video_processor = TimeViperVideoProcessor(size={"height": image_size, "width": image_size})
    return TimeViperProcessor(
        video_processor=video_processor, tokenizer=tokenizer, chat_template=get_chat_template(backbone),
        tokens_per_frame=tokens_per_frame,
    )


def use_tokenizer_ids(model, processor) -> None:
    """Point the model's bos/pad/eos ids (config and generation config) at the processor's tokenizer; generation also
    stops at the chat template's turn separator."""
    tokenizer = processor.tokenizer
    separator = tokenizer.convert_tokens_to_ids(processor.turn_separator)
    for target in (model.config, model.generation_config):
        target.bos_token_id, target.pad_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = list(dict.fromkeys([tokenizer.eos_token_id, separator]))


def write_video(path, frames, fps: int, crf: str | None = None) -> Path:
    """RGB uint8 frames (a sequence of (H, W, 3) arrays) as an H.264 file (MPEG-4 Part 2 where PyAV has no libx264),
    with `crf` as the H.264 quality when given."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if crf is not None and codec == "libx264":
            stream.options = {"crf": crf}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_sample_video(path, seconds: int = 12, fps: int = 10, size: int = 96) -> Path:
    """A short synthetic clip (a square moving across a colour gradient), written with PyAV as H.264 / MPEG-4."""
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    gradient = np.stack(np.broadcast_arrays(ramp, ramp[:, None], np.uint8(128)), -1)  # red: x, green: y, blue: 128
    frames = np.repeat(gradient[None], seconds * fps, axis=0)
    for i, frame in enumerate(frames):
        x = int((size - 16) * i / max(1, seconds * fps - 1))
        frame[40:56, x : x + 16] = (255, 32, 32)
    return write_video(path, frames, fps)
