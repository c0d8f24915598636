"""The remote-code check of one transformers release, run in a fresh process where the package is NOT importable.

It loads a folder written by the package (tests/compat/write_folder.py) the way a Hub user does, with
`trust_remote_code=True` only, and checks:
1. the Auto classes: AutoConfig, AutoProcessor, AutoModel (the base TimeViperModel) and AutoModelForImageTextToText;
2. greedy generate() on a TransV schedule: every generated token is the argmax of a full, cache-free forward over the
   sequence before it (one sample, and a left-padded batch of two with different frame counts);
3. save_pretrained -> Auto reload gives the same logits and keeps the Auto classes;
4. pipeline("image-text-to-text") with video messages, alone and with batch_size=2, gives the same answers as
   generate() on each sample;
5. the long-video path (the processor file's `streaming_chat_inputs`, `encode_video`, then
   `generate(video_features=..., prefill_chunk_size=N)`, as `./timeviper.sh ask` runs it) gives the batch's tokens.
All five on FOLDER (Nemotron-H backbone); 1, 2 and 5 also on FOLDER-qwen2 (the Qwen2 backbone).

Usage: python check_remote_code.py FOLDER   (prints one line per check; any failure raises)
"""

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    pipeline,
)

NEW_TOKENS = 6
EXPECTED_AUTO_MAP = {
    "AutoConfig": "configuration_timeviper.TimeViperConfig",
    "AutoModel": "modeling_timeviper.TimeViperModel",
    "AutoModelForImageTextToText": "modeling_timeviper.TimeViperForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_timeviper.TimeViperForConditionalGeneration",
}


def messages(folder: Path, clip: str, question: str):
    return [{"role": "user", "content": [
        {"type": "video", "path": str(folder / clip)},
        {"type": "text", "text": question},
    ]}]


def check_not_installed() -> None:
    if importlib.util.find_spec("timeviper") is not None:
        raise AssertionError("the package `timeviper` is importable here; the check must see only the folder")


def check_auto_classes(folder: Path):
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    auto_map = {key: value.split("--")[-1] for key, value in config.auto_map.items()}
    assert auto_map == EXPECTED_AUTO_MAP, f"{folder}: auto_map {auto_map}"
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__name__ == "TimeViperProcessor", type(processor)
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(base).__name__ == "TimeViperModel", type(base)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "TimeViperForConditionalGeneration", type(model)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), model.model.state_dict().values()))
    return processor, model


def encode(processor, conversations):
    batch = isinstance(conversations[0], list)
    return processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"fps": 2.0, **({"padding": True, "padding_side": "left"} if batch else {})},
    )


@torch.no_grad()
def check_greedy_equals_recompute(model, inputs, label: str) -> torch.Tensor:
    """generate() with its cache against a cache-free forward over each prefix. Returns the new tokens."""
    output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    new_tokens = output[:, prompt_length:]
    assert new_tokens.shape[1] >= 1, f"{label}: generate() returned no new token"
    eos = set(model.generation_config.eos_token_id or [])
    for row in range(output.shape[0]):
        mask = inputs["attention_mask"][row : row + 1]
        frames = frames_of_row(model, inputs, row)
        for step in range(new_tokens.shape[1]):
            prefix = output[row : row + 1, : prompt_length + step]
            prefix_mask = torch.cat([mask, mask.new_ones(1, step)], dim=1)
            # Attention-guided selection is queried by the last prompt token, in generate() as here.
            logits = model(
                input_ids=prefix, attention_mask=prefix_mask, pixel_values_videos=frames, use_cache=False,
                compression_query_positions=torch.tensor([prompt_length - 1]),
            ).logits
            expected = int(logits[0, -1].argmax())
            got = int(new_tokens[row, step])
            assert got == expected, f"{label}, row {row}, step {step}: generate() chose {got}, recomputation {expected}"
            if got in eos:
                break
    print(f"  ok  {label}: {new_tokens.shape[1]} greedy tokens per row equal the cache-free recomputation")
    return new_tokens


def frames_of_row(model, inputs, row: int) -> torch.Tensor:
    """The frames of one row of a batch: the flat frame tensor holds the rows' frames in order."""
    per_frame = model.config.vision_tokens_per_frame
    counts = (inputs["input_ids"] == model.config.video_token_id).sum(dim=1) // per_frame
    start = int(counts[:row].sum())
    return inputs["pixel_values_videos"][start : start + int(counts[row])]


@torch.no_grad()
def check_save_reload(model, inputs) -> None:
    reference = model(**inputs).logits
    with tempfile.TemporaryDirectory() as resaved:
        model.save_pretrained(resaved)
        config = AutoConfig.from_pretrained(resaved, trust_remote_code=True)
        auto_map = {key: value.split("--")[-1] for key, value in config.auto_map.items()}
        assert auto_map == EXPECTED_AUTO_MAP, f"save_pretrained wrote auto_map {auto_map}"
        reloaded = AutoModelForImageTextToText.from_pretrained(resaved, trust_remote_code=True).eval()
        # Same process, same weights read back from disk, same CPU kernels: the logits must be identical.
        assert torch.equal(reloaded(**inputs).logits, reference), "save_pretrained -> reload changed the logits"
    print("  ok  save_pretrained -> AutoModelForImageTextToText reload: identical logits, same auto_map")


def check_pipeline(folder: Path, conversations, expected_answers: list[str]) -> None:
    pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    generate_kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False}
    single = pipe(text=conversations[0], generate_kwargs=generate_kwargs, return_full_text=False,
                  processor_kwargs={"fps": 2.0})
    assert single[0]["generated_text"] == expected_answers[0], (single, expected_answers[0])
    batched = pipe(text=conversations, batch_size=2, generate_kwargs=generate_kwargs, return_full_text=False,
                   processor_kwargs={"fps": 2.0})
    answers = [result[0]["generated_text"] for result in batched]
    assert answers == expected_answers, (answers, expected_answers)
    print(f"  ok  pipeline('image-text-to-text'), one input and batch_size=2: {answers}")


@torch.no_grad()
def check_streaming(processor, model, conversations, expected_tokens: torch.Tensor, label: str) -> None:
    """Frames streamed from the files and encoded chunk by chunk, the prompt prefilled 5 tokens at a time (chunk
    boundaries inside frames, the prompt and at compression stages): the same greedy tokens as generate() on the
    processor's pixels."""
    processing = sys.modules[type(processor).__module__]
    inputs, streams = processing.streaming_chat_inputs(
        processor, conversations, chunk_frames=3, fps=2.0, padding=True, padding_side="left"
    )
    features = torch.cat([model.encode_video(s.pixel_chunks(model.device, model.dtype), num_frames=s.num_frames)
                          for s in streams])
    output = model.generate(**inputs, video_features=features, prefill_chunk_size=5, max_new_tokens=NEW_TOKENS,
                            do_sample=False)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(new_tokens, expected_tokens), f"{label}: streamed {new_tokens.tolist()}, expected {expected_tokens.tolist()}"
    print(f"  ok  {label}: streamed frames + chunked prefill give the processor path's tokens")


def check_generation(folder: Path, label: str):
    """Checks 1 and 2 on one folder. Returns the model, the single sample's inputs, the conversations and the batch's
    answers."""
    processor, model = check_auto_classes(folder)
    print(f"  ok  {label}: AutoConfig, AutoProcessor, AutoModel -> TimeViperModel, AutoModelForImageTextToText")
    conversations = [
        messages(folder, "clip_long.mp4", "What moves across the frame?"),
        messages(folder, "clip_short.mp4", "Colour?"),
    ]
    single = encode(processor, conversations[0])
    check_greedy_equals_recompute(model, single, f"{label}, one sample")
    batch = encode(processor, conversations)
    frame_counts = (batch["input_ids"] == model.config.video_token_id).sum(1) // model.config.vision_tokens_per_frame
    assert frame_counts[0] != frame_counts[1], f"the two samples should have different frame counts, got {frame_counts}"
    batch_tokens = check_greedy_equals_recompute(
        model, batch, f"{label}, left-padded batch with {frame_counts.tolist()} frames"
    )
    check_streaming(processor, model, conversations, batch_tokens, f"{label}, streaming")
    answers = [processor.decode(tokens, skip_special_tokens=True) for tokens in batch_tokens]
    return model, single, conversations, answers


def main(folder: Path) -> None:
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, folder {folder}")
    check_not_installed()
    model, single, conversations, answers = check_generation(folder, "nemotron_h")
    check_save_reload(model, single)
    check_pipeline(folder, conversations, answers)
    check_generation(folder.with_name(folder.name + "-qwen2"), "qwen2")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
