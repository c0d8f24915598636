"""Long videos from a file to the answer with bounded memory: the frames stream through the vision tower chunk by
chunk (`VideoStream` + `encode_video`) and the LLM prefill runs in chunks (`generate(prefill_chunk_size=...)`).
Used by `inference.ask` and the evaluation harness; exact (the same answer as the processor's one-shot path)."""

import sys

import torch

from timeviper.processing_timeviper import expand_video_placeholder

# Sampled frames decoded, resized and encoded per chunk (a few of them in host memory at once).
STREAM_CHUNK_FRAMES = 64
# Prompt tokens per prefill chunk: one chunk's activations instead of the whole prompt's (16 tokens per frame).
PREFILL_CHUNK_TOKENS = 16384


def processing_module(processor):
    """The processing file the processor came from (the package's, or a checkpoint's remote code), so that the
    streaming reader matches the processor's own sampling and normalisation."""
    return sys.modules[type(processor).__module__]


def stream_conversation(model, processor, conversation, chunk_frames: int = STREAM_CHUNK_FRAMES, **options):
    """Prompt inputs, video features and the opened streams of `conversation` (one or a batch). ``options`` are the
    processor's sampling (``fps``, ``max_frames``, ...) and tokenizer (``padding``, ...) options. The features stay on
    the model's device in its dtype; pass them as
    ``generate(**inputs, video_features=features, prefill_chunk_size=PREFILL_CHUNK_TOKENS)``."""
    streaming_chat_inputs = processing_module(processor).streaming_chat_inputs
    inputs, streams = streaming_chat_inputs(processor, conversation, chunk_frames=chunk_frames, **options)
    features = torch.cat([
        model.encode_video(stream.pixel_chunks(model.device, model.dtype), num_frames=stream.num_frames)
        for stream in streams
    ])
    return inputs, features, streams


def video_prompt_ids(processor, conversation, num_frames: int) -> torch.Tensor:
    """``input_ids`` (1, length) of a conversation about one video whose `num_frames` frames are already sampled,
    tokenised as `streaming_chat_inputs` does, without opening the video again: the prompts of further questions
    about a video whose state is reused (``model.encode_video_state``)."""
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    prompt = expand_video_placeholder(processor, prompt, num_frames)
    return processor.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
