"""Encode once, ask many: 10 questions about one long video from a reused video state vs 10 independent runs, on
one GPU, in the same run (prefill + first-token logits; decoding excluded).

- independent (per question): `encode_video` (256-frame chunks) + chunked prefill of the whole prompt.
- reused: `encode_video` and `encode_video_state` once, then per question `model(**state.question_inputs(ids))`.
- question-only floor (per question): the question's tokens continuing a complete cache of the prompt through every
  block (what a question costs when no stage depends on it).
- exactness (bf16): greedy tokens (8) and first-step logits of reused vs independent, for 2 questions;
  the state's memory, its safetensors file, save and load times.

Random bf16 weights of config b (benchmarks/common.py) (Nano-9B-v2 + SigLIP so400m, `uni_7_0.5-attn_39_0.05`), random
frames of the right shape through the real vision tower; nothing is downloaded.

    python benchmarks/video_state.py --tiny           # CPU smoke test, tiny dims
    source benchmarks/gpu_setup.sh && python benchmarks/video_state.py --out benchmarks/results/video_state.json
"""

import argparse
import os
import sys
import tempfile
from statistics import median_high

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    add_common_arguments,
    build_model,
    log,
    make_config,
    mem,
    meta,
    run_steps,
    timed,
    video_prompt_ids,
    weight_bytes,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, out="benchmarks/results/video_state.json")
    p.add_argument("--config", default="b", help="config of common.py (b: the paper's TransV schedule)")
    p.add_argument("--frames", type=int, default=4096)
    p.add_argument("--questions", type=int, default=10)
    p.add_argument("--independent-runs", type=int, default=None,
                   help="independent runs timed (default: one per question); fewer are extrapolated to all questions")
    p.add_argument("--question-tokens", type=int, default=24, help="tokens after the video in each prompt")
    p.add_argument("--prefill-chunk", type=int, default=16384, help="prefill_chunk_size (tokens)")
    args = p.parse_args(argv)
    if args.tiny:
        args.frames, args.prefill_chunk, args.question_tokens = 16, 64, 6
    return args


def pixel_chunks(model, frames, device):
    """Random normalised frames, 256 at a time (one chunk made once and handed out again: only its shape matters
    to the timing), as `VideoStream.pixel_chunks` hands them to `encode_video`."""
    size = model.config.vision_config.image_size
    generator = torch.Generator(device).manual_seed(0)
    chunk = torch.randn(min(256, frames), 3, size, size, device=device, generator=generator)
    chunk = chunk.clamp(-1, 1).to(model.dtype)
    for start in range(0, frames, chunk.shape[0]):
        yield chunk[: min(chunk.shape[0], frames - start)]


def prompts(model, args, device):
    """`--questions` prompts: the same 8-token prefix and video, a different question after it for each."""
    prefix = video_prompt_ids(model.config, args.frames, device, suffix=0)
    vocab = min(model.config.text_config.vocab_size, 131072)
    gen = torch.Generator().manual_seed(2)
    return [torch.cat([prefix, torch.randint(100, vocab, (1, args.question_tokens), generator=gen).to(device)], 1)
            for _ in range(args.questions)]


def independent_run(model, ids, args, device):
    """Vision + whole-prompt chunked prefill + first-token logits; returns (vision s, llm s, logits, cache)."""
    vision_s, features = timed(device, lambda: model.encode_video(pixel_chunks(model, args.frames, device),
                                                                   num_frames=args.frames))
    llm_s, out = timed(device, lambda: model(input_ids=ids, video_features=features, use_cache=True,
                                             prefill_chunk_size=args.prefill_chunk, logits_to_keep=1))
    return vision_s, llm_s, out.logits[:, -1], out.past_key_values


def step_timing(model, device, args, results):
    questions = prompts(model, args, device)
    # Warm-up (kernels, allocator) on the same shapes: one independent run and one reused question.
    *_, cache = independent_run(model, questions[0], args, device)
    independent = []
    runs = args.questions if args.independent_runs is None else args.independent_runs
    for i, ids in enumerate(questions[:runs]):
        vision_s, llm_s, _, cache = independent_run(model, ids, args, device)
        independent.append({"vision_s": vision_s, "llm_s": llm_s})
        log("independent", i, independent[-1])
    results["independent"] = independent
    # The question-only floor on the last independent run's complete cache: each question's tokens continue it.
    floors = []
    for ids in questions:
        question = ids[:, -args.question_tokens :]
        seconds, _ = timed(device, lambda: model(input_ids=question, past_key_values=cache, logits_to_keep=1))
        floors.append(seconds)
    del cache
    results["question_only_floor_s"] = floors
    log("question-only floor", floors)

    vision_s, features = timed(device, lambda: model.encode_video(pixel_chunks(model, args.frames, device),
                                                                   num_frames=args.frames))
    state_s, state = timed(device, lambda: model.encode_video_state(
        questions[0], video_features=features, prefill_chunk_size=args.prefill_chunk))
    del features
    model(**state.question_inputs(questions[0]), logits_to_keep=1)  # warm-up of the question path
    per_question = []
    for ids in questions:
        seconds, _ = timed(device, lambda: model(**state.question_inputs(ids), logits_to_keep=1))
        per_question.append(seconds)
    log("reused: vision", vision_s, "state", state_s, "questions", per_question)
    run_s = [r["vision_s"] + r["llm_s"] for r in independent] or [0.0]
    total_independent = sum(run_s) / len(run_s) * args.questions
    total_reused = vision_s + state_s + sum(per_question)
    results["reused"] = {
        "vision_s": vision_s, "encode_video_state_s": state_s, "per_question_s": per_question,
        "state_memory_bytes": state.memory_bytes(), "state_bytes_per_frame": state.memory_bytes() / args.frames,
        "held_stage_input_bytes": 0 if state.resume.held is None else state.resume.held.hidden_states.nbytes,
        "first_question_dependent_stage": state.resume.stage_index,
    }
    results["summary"] = {
        "questions": args.questions, "independent_runs_timed": len(independent), "frames": args.frames,
        "tokens_in": int(questions[0].shape[1]), "total_independent_s": total_independent,
        "total_reused_s": total_reused, "speedup": total_independent / total_reused,
        "per_question_reused_median_s": median_high(per_question), "question_only_floor_median_s": median_high(floors),
        "per_question_over_floor": median_high(per_question) / median_high(floors),
        "gpu_peak_bytes": mem(device)["peak"],
    }
    log("summary", results["summary"])
    step_disk(model, state, device, results)


def step_disk(model, state, device, results):
    from timeviper.modeling_timeviper import TimeViperVideoState

    with tempfile.TemporaryDirectory() as folder:
        save_s, _ = timed(device, lambda: state.save(folder))
        file_bytes = os.path.getsize(os.path.join(folder, "video_state.safetensors"))
        load_s, _ = timed(device, lambda: TimeViperVideoState.load(folder, model))
    results["disk"] = {"save_s": save_s, "load_s": load_s, "safetensors_bytes": file_bytes}
    log("disk", results["disk"])


def step_exact(model, device, args, results):
    """Reused == independent on the GPU in bf16: 8 greedy tokens and the first-step logits, 2 questions."""
    exact_args = argparse.Namespace(**{**vars(args), "questions": 2})
    questions = prompts(model, exact_args, device)
    features = model.encode_video(pixel_chunks(model, args.frames, device), num_frames=args.frames)
    state = model.encode_video_state(questions[0], video_features=features, prefill_chunk_size=args.prefill_chunk)
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    records = []
    for ids in questions:
        full = model.generate(input_ids=ids, video_features=features, prefill_chunk_size=args.prefill_chunk, **greedy)
        reused = model.generate_from_video_state(state, ids, **greedy)
        first_full, first_reused = full.logits[0].float(), reused.logits[0].float()
        records.append({
            "same_greedy_tokens": bool(torch.equal(full.sequences, reused.sequences)),
            "first_logits_max_abs_diff": (first_full - first_reused).abs().max().item(),
            "first_logits_max_abs": first_full.abs().max().item(),
            "same_first_token": bool(first_full.argmax() == first_reused.argmax()),
        })
        log("exact", records[-1])
    results["exact"] = records


@torch.no_grad()  # for the call only: a test that runs main() in-process keeps its own grad mode
def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    results = {"meta": meta(device, args), "config": args.config,
               "pixels": "random normalised frames of the right shape through the real-size vision tower"}
    model, build_s = build_model(make_config(args.config, args.tiny, args.vision_chunk), device, torch.bfloat16)
    results["model"] = {"build_s": build_s, "token_compression": model.config.token_compression,
                        "weight_bytes": weight_bytes(model)}
    log("model built", results["model"])
    run_steps([("timing", step_timing), ("exact", step_exact)], model, device, args, results)
    log("done")


if __name__ == "__main__":
    main()
