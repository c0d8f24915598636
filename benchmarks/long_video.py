"""Long-video efficiency benchmark of TimeViper on one GPU: memory, prefill time against its compute floor, decode
throughput against its bandwidth floor, for the hybrid Nemotron-Nano-9B-v2 LLM (with and without TransV) and a
Qwen2.5-7B-architecture baseline, all behind the same SigLIP so400m/14-384 + ToMe (16 tokens/frame) + MLP stack.

Full-size architectures, random bf16 weights (nothing is downloaded); on CUDA, mamba-ssm's Triton kernels where
`mamba_ssm` imports (gpu_setup.sh).

Frames never exist as one pixel tensor: `get_video_features` is replaced by a function that draws each vision chunk
of random (chunk, 3, 384, 384) bf16 frames on the GPU and passes it through the model's own `encode_frames`
(mode "e2e"), or, for large frame counts, by one that returns random ToMe+projector outputs of the right shape
(mode "llm_only"): the LLM side is then measured and the vision side is extrapolated from the measured per-frame
rate (vision chunks are independent and identical in cost, so its time is exactly linear in frames).

    python benchmarks/long_video.py --tiny                 # CPU smoke test, tiny dims
    python benchmarks/long_video.py --out results.json     # GPU, full sizes (see benchmarks/README.md)
"""

import argparse
import functools
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from statistics import linear_regression, median_high
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    CONFIGS,
    PEAK_BYTES,
    PEAK_FLOPS,
    T0,
    add_common_arguments,
    build_model,
    compression_flops,
    free,
    is_cuda,
    llm_flops,
    log,
    make_config,
    mem,
    meta,
    profile_region,
    random_features,
    save,
    sync,
    timed,
    tokens_per_block,
    tome_proj_flops_per_frame,
    video_prompt_ids,
    vision_flops_per_frame,
    weight_bytes,
)

# Prompt text around the video placeholders (video_prompt_ids' defaults).
PROMPT_TEXT_TOKENS = 8 + 16


def ints(text):
    return [int(x) for x in text.split(",") if x.strip()] if text else []


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, out="benchmarks/results/long_video.json")
    p.add_argument("--profile-out", default=None, help="text file for the profiler tables (default: next to --out)")
    p.add_argument("--configs", default="a,b,c", help="subset of a (Nano), b (Nano+TransV), c (Qwen2.5-7B arch)")
    p.add_argument("--e2e-frames", default="256,1024,4096", help="frame counts run end to end (real vision)")
    p.add_argument("--llm-frames", default="8192,16384,32768",
                   help="frame counts run with synthetic vision features (vision time extrapolated)")
    p.add_argument("--llm-frames-b", default="65536", help="extra llm_only frame counts for config b only")
    p.add_argument("--max-llm-frames-c", type=int, default=16384,
                   help="Qwen baseline: llm_only sweep stops here (time)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--decode-context", type=int, default=32768)
    p.add_argument("--decode-batches", default="1,32")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--decode-configs", default="a,c")
    p.add_argument("--decode-variants", default="as_is,static_graph",
                   help="as_is: the default dynamic cache, op by op; static_graph: static cache, CUDA-graph steps")
    p.add_argument("--graph-check", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA-graph decoding vs eager decoding of the same steps, per config (CUDA only)")
    p.add_argument("--extras", default="b,compile,a",
                   help="after the sweeps, in order and budget permitting: a config name verifies its predicted max "
                        "frame count with one run; 'compile' times a torch.compile'd vision tower chunk")
    p.add_argument("--fit-margin", type=float, default=0.96, help="verify at this fraction of the predicted max")
    p.add_argument("--ab", default="", choices=["", "cudnn_vision_attention"],
                   help="cudnn_vision_attention: the vision chunk timed again with SDPA preferring cuDNN attention")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="kernel-vs-PyTorch Mamba path check at a small size")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--budget-s", type=float, default=1e9, help="skip steps predicted to end after this many seconds")
    args = p.parse_args(argv)
    if args.tiny:
        if "--e2e-frames" not in (sys.argv[1:] if argv is None else argv):
            args.e2e_frames = "4,16"
        args.llm_frames, args.llm_frames_b = "32", "64"
        args.decode_context, args.max_llm_frames_c = 256, 32
        args.decode_batches = "1,4"
    args.profile_out = args.profile_out or os.path.join(os.path.dirname(args.out) or ".", "profiles.txt")
    return args


# Calls of the Mamba Triton kernels, counted by install_kernel_counters.
KERNEL_CALLS = {"mamba_chunk_scan_combined": 0, "selective_state_update": 0}


def install_kernel_counters():
    import timeviper.modeling_timeviper as tm

    for name in KERNEL_CALLS:
        fn = getattr(tm, name)
        if fn is None or getattr(fn, "_counted", False):
            continue

        def counted(*a, _fn=fn, _name=name, **k):
            KERNEL_CALLS[_name] += 1
            return _fn(*a, **k)

        counted._counted = True
        setattr(tm, name, counted)


def decode_bytes(model, cache):
    """Bytes one decode step must move at least: every LLM weight but the embedding table (lm_head included), the
    whole KV cache read, the Mamba states read and written."""
    lm = model.model.language_model
    weights = sum(p.numel() * p.element_size() for n, p in lm.named_parameters()
                  if not n.startswith(("embed", "merge_modules")))
    weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    kv = sum(t.numel() * t.element_size() for t in [*cache.keys.values(), *cache.values.values()])
    states = 2 * sum(t.numel() * t.element_size() for t in [*cache.ssm_states.values(), *cache.conv_states.values()])
    return {"weights": weights, "kv": kv, "mamba_states_rw": states, "total": weights + kv + states}


class PhaseTimer:
    """Hooks that sync and stamp the vision tower, ToMe+projector and LLM phases of a prefill, record the tokens
    each LLM block sees and the running peak memory after each block."""

    def __init__(self, model, device):
        self.device, self.active, self.handles = device, False, []
        inner = model.model
        self.reset()
        encode_patches = inner.encode_patches

        def timed_encode_patches(frames):
            # Wrapped rather than hooked: a hook on a vision block turns the tower's fused inference path off.
            self._stamp("vision_start")
            features = encode_patches(frames)
            self._stamp("vision_end")
            return features

        wrapped = inner.__dict__.get("encode_patches")  # another PhaseTimer's wrapper, put back on removal

        def restore():
            if wrapped is None:
                del inner.encode_patches
            else:
                inner.encode_patches = wrapped

        inner.encode_patches = timed_encode_patches
        self.handles.append(SimpleNamespace(remove=restore))
        self.handles.append(inner.multi_modal_projector.register_forward_hook(lambda m, a, o: self._stamp("proj_end")))
        lm = inner.language_model
        self.handles.append(lm.register_forward_pre_hook(lambda m, a: self._stamp("llm_start")))
        self.handles.append(lm.register_forward_hook(lambda m, a, o: self._stamp("llm_end")))
        for i, layer in enumerate(lm.layers):
            self.handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: self._layer_in(i, a)))

    def reset(self):
        self.vision_s = self.tome_proj_s = 0.0
        self.last = {}
        self.layer_tokens, self.layer_peak = [], []
        self.pre_llm_peak = None

    def _stamp(self, name):
        if not self.active:
            return
        sync(self.device)
        now = time.perf_counter()
        if name == "vision_end":
            self.vision_s += now - self.last["vision_start"]
        if name == "proj_end":
            self.tome_proj_s += now - self.last["vision_end"]
        if name == "llm_start":
            self.pre_llm_peak = mem(self.device)["peak"]
        self.last[name] = now

    def _layer_in(self, i, args):
        if not self.active:
            return
        if i > 0:
            self.layer_peak.append(mem(self.device)["peak"])
        self.layer_tokens.append(int(args[0].shape[1]))

    @property
    def llm_s(self):
        return self.last["llm_end"] - self.last["llm_start"]

    def remove(self):
        for h in self.handles:
            h.remove()


def install_frame_source(model, mode, device, seed=0):
    """Replace get_video_features: placeholder `pixel_values_videos` of shape (F, 1) stands for F frames."""
    inner = model.model
    cfg = inner.config
    dtype = inner.vision_tower.embeddings.patch_embedding.weight.dtype

    def get_video_features(pixel_values_videos):
        frames = pixel_values_videos.shape[0]
        gen = torch.Generator(device=device).manual_seed(seed)
        chunks = []
        for start in range(0, frames, cfg.vision_chunk_size):
            n = min(cfg.vision_chunk_size, frames - start)
            if mode == "e2e":
                chunks.append(inner.encode_frames(random_pixels(model, n, device, gen)))
            else:
                chunks.append(random_features(cfg, n, device, dtype, gen))
        return torch.cat(chunks)

    inner.get_video_features = get_video_features


def generate_timed(model, input_ids, placeholder, new_tokens, device, timer):
    """model.generate with greedy decoding of exactly `new_tokens`; returns (prefill_s, total_s, peak, n_new)."""
    stamps = []
    original_forward = model.forward

    @functools.wraps(original_forward)
    def forward(*a, **k):
        out = original_forward(*a, **k)
        sync(device)
        stamps.append(time.perf_counter())
        timer.active = False
        return out

    model.forward = forward
    try:
        free(device)
        timer.reset()
        timer.active = True
        sync(device)
        start = time.perf_counter()
        out = model.generate(input_ids=input_ids, pixel_values_videos=placeholder, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, use_cache=True)
        sync(device)
        total = time.perf_counter() - start
    finally:
        model.forward = original_forward
        timer.active = False
    timer.reserved_peak = mem(device)["reserved_peak"]
    return stamps[0] - start, total, mem(device)["peak"], out.shape[1] - input_ids.shape[1]


def run_point(run, model, timer, name, frames, mode, keep=True):
    """One prefill + `--new-tokens` greedy tokens through generate(); its record (kept in results["runs"] unless
    `keep` is False: warm-ups) with the phase times against their floors."""
    device = run.device
    install_frame_source(model, mode, device)
    ids = video_prompt_ids(model.config, frames, device)
    placeholder = torch.empty(frames, 1, device=device)
    rec = {"config": name, "frames": frames, "mode": mode, "tokens_in": int(ids.shape[1])}
    try:
        prefill, total, peak, n_new = generate_timed(model, ids, placeholder, run.args.new_tokens, device, timer)
    except torch.OutOfMemoryError as err:
        rec.update(oom=True, error=str(err).splitlines()[0][:300])
        log(f"{name} F={frames} {mode}: OOM")
    else:
        rec.update(
            oom=False, new_tokens=n_new, prefill_s=prefill, total_s=total, decode_s=total - prefill,
            peak_bytes=peak, reserved_peak_bytes=timer.reserved_peak, pre_llm_peak_bytes=timer.pre_llm_peak,
            peak_layer=next((i for i, p in enumerate(timer.layer_peak) if p >= peak), "after last layer"),
            llm_s=timer.llm_s, layer_tokens=timer.layer_tokens,
        )
        add_phases_and_floors(rec, model, timer, run.vision_rate)
        log(f"{name} F={frames:>6} {mode:8s} prefill {prefill:7.2f}s (llm {timer.llm_s:6.2f}s) "
            f"+{n_new} tok {total - prefill:5.2f}s peak {peak / 2**30:6.1f} GiB  ratio {rec['ratio']}")
    finally:
        del placeholder
        free(device)
    if keep:
        run.results["runs"].append(rec)
    return rec


def add_phases_and_floors(rec, model, timer, vision_rate):
    """The record's FLOPs, compute floors and phase times (measured in e2e mode, extrapolated from `vision_rate` in
    llm_only mode), and each phase's ratio to its floor."""
    frames, prefill = rec["frames"], rec["prefill_s"]
    lf = llm_flops(model, timer.layer_tokens, compression_flops(model, timer.layer_tokens, PROMPT_TEXT_TOKENS))
    vf = vision_flops_per_frame(model) * frames
    tf = tome_proj_flops_per_frame(model) * frames
    rec["flops"] = {"vision": vf, "tome_proj": tf, "llm": lf}
    rec["floor_s"] = {"vision": vf / PEAK_FLOPS, "tome_proj": tf / PEAK_FLOPS, "llm": lf["total"] / PEAK_FLOPS}
    rec["floor_s"]["prefill"] = sum(rec["floor_s"].values())
    if rec["mode"] == "e2e":
        rec.update(vision_s=timer.vision_s, tome_proj_s=timer.tome_proj_s,
                   other_prefill_s=prefill - timer.vision_s - timer.tome_proj_s - timer.llm_s)
        rec["prefill_e2e_s"] = prefill
    else:
        rec["vision_extrapolated"] = True
        rec["other_prefill_s"] = prefill - timer.llm_s
        if vision_rate:
            rec["vision_s"] = vision_rate["vision_s_per_frame"] * frames
            rec["tome_proj_s"] = vision_rate["tome_proj_s_per_frame"] * frames
            rec["prefill_e2e_s"] = prefill + rec["vision_s"] + rec["tome_proj_s"]
            # The vision phase holds only the weights, the features gathered so far and one chunk's activations.
            rec["vision_phase_peak_bound_bytes"] = vision_rate["chunk_working_set_bytes"]
    rec["ratio"] = {k: rec[k + "_s"] / rec["floor_s"][k] for k in ("vision", "tome_proj", "llm") if k + "_s" in rec}
    if "prefill_e2e_s" in rec:
        rec["ratio"]["prefill"] = rec["prefill_e2e_s"] / rec["floor_s"]["prefill"]


def vision_microbench(model, device, args, results, repeats=3, label="vision_microbench"):
    """Per-chunk vision tower and ToMe+projector time, and the chunk's activation working set."""
    inner = model.model
    n = inner.config.vision_chunk_size
    pixels = random_pixels(model, n, device)
    timer = PhaseTimer(model, device)
    inner.encode_frames(pixels)  # warm-up
    free(device)
    base = mem(device)["allocated"]
    vis, tp = [], []
    for _ in range(repeats):
        timer.reset()
        timer.active = True
        inner.encode_frames(pixels)
        vis.append(timer.vision_s)
        tp.append(timer.tome_proj_s)
    timer.active = False
    timer.remove()
    peak = mem(device)["peak"]
    vf, tf = vision_flops_per_frame(model), tome_proj_flops_per_frame(model)
    vis_med, tp_med = median_high(vis), median_high(tp)
    rec = {
        "chunk_frames": n, "vision_s_per_chunk": vis, "tome_proj_s_per_chunk": tp,
        "vision_s_per_frame": vis_med / n, "tome_proj_s_per_frame": tp_med / n,
        "chunk_working_set_bytes": peak - base,
        "vision_flops_per_frame": vf, "tome_proj_flops_per_frame": tf,
        "vision_ratio_to_floor": vis_med / (n * vf / PEAK_FLOPS),
        "tome_proj_ratio_to_floor": tp_med / (n * tf / PEAK_FLOPS),
        "attn_implementation": inner.vision_tower.config._attn_implementation,
    }
    results[label] = rec
    log(f"vision chunk {n}: tower {vis_med * 1e3:.1f} ms ({rec['vision_ratio_to_floor']:.2f}x floor), "
        f"ToMe+proj {tp_med * 1e3:.1f} ms, working set {(peak - base) / 2**30:.2f} GiB")
    if profiling(args, device) and label == "vision_microbench":
        profile_region("vision_chunk", lambda: inner.encode_frames(pixels), device, results, args)
    del pixels
    free(device)
    return rec


def compiled_tower_bench(model, device, args, results, repeats=3):
    """The vision tower chunk with every encoder layer under torch.compile (inductor, default mode): compile time,
    then the chunk's time against its floor, as `vision_microbench_compiled`."""
    inner = model.model
    n = inner.config.vision_chunk_size
    pixels = random_pixels(model, n, device)
    rec = vision_microbench(model, device, args, results, repeats, label="vision_microbench_compiled")
    try:
        layers = inner.vision_tower.encoder.layers[: inner.config.vision_layers_used]
        compiled = [torch.compile(layer) for layer in layers]

        def run_compiled():
            f = inner.vision_tower.embeddings(pixels).contiguous()
            for layer in compiled:
                f = layer(f, None)
            return f

        rec["compiled_tower_compile_s"], _ = timed(device, run_compiled)
        times = [timed(device, run_compiled)[0] for _ in range(repeats)]
        rec["compiled_tower_s_per_chunk"] = times
        rec["compiled_tower_ratio_to_floor"] = median_high(times) / (n * vision_flops_per_frame(model) / PEAK_FLOPS)
        log(f"torch.compile'd tower: {median_high(times) * 1e3:.1f} ms per chunk "
            f"({rec['compiled_tower_ratio_to_floor']:.2f}x)")
    except Exception as err:  # noqa: BLE001 - a failed compile is a result of this A/B, not the end of the run
        rec["compiled_tower_error"] = repr(err)[:300]
    del pixels
    free(device)


def random_pixels(model, frames, device, generator=None):
    vcfg = model.config.vision_config
    dtype = model.model.vision_tower.embeddings.patch_embedding.weight.dtype
    return torch.randn(frames, 3, vcfg.image_size, vcfg.image_size, device=device, dtype=dtype, generator=generator)


def profiling(args, device):
    """Profiles are taken on CUDA, and on the CPU in the --tiny smoke test (to exercise the code)."""
    return args.profile and (args.tiny or is_cuda(device))


def decode_bench(model, name, device, args, results, label):
    """Text prompt of `decode_context` tokens: prefill at batch 1, then decode steps at batch 1 and, from the
    replicated cache, at larger batches. Greedy, one token per row per step. Label "static_graph" decodes on a
    static cache (CUDA-graph replays; the first step, which captures the graph, is reported apart)."""
    gen = torch.Generator().manual_seed(3)
    vocab = min(model.config.text_config.vocab_size, 131072)
    ids = torch.randint(100, vocab, (1, args.decode_context), generator=gen).to(device)
    for batch in ints(args.decode_batches):
        rec = {"config": name, "variant": label, "context": args.decode_context, "batch": batch}
        try:
            free(device)
            rec.update(decode_batch(model, name, ids, batch, device, args, results, label))
        except torch.OutOfMemoryError as err:
            rec.update(oom=True, error=str(err).splitlines()[0][:300])
        free(device)
        log(f"decode {name} {label} b={batch}: "
            + ("OOM" if rec["oom"] else f"{rec['tokens_per_s']:.0f} tok/s, step {rec['step_s_median'] * 1e3:.1f} ms, "
               f"floor {rec['floor_step_s'] * 1e3:.1f} ms ({rec['fraction_of_floor']:.0%}), "
               f"peak {rec['peak_bytes'] / 2**30:.1f} GiB"))
        results["decode"].append(rec)


def decode_batch(model, name, ids, batch, device, args, results, label):
    """One batch size of `decode_bench`: the timed steps against the bandwidth floor (and their profile at the
    largest batch)."""
    from timeviper.modeling_timeviper import TimeViperHybridCache

    # A static cache has room for every step below: warm-up + timed steps + the profiled ones.
    cache = TimeViperHybridCache(args.decode_context + args.decode_steps + 8 if label == "static_graph" else None)

    def step(token):
        logits = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1:].argmax(-1)

    prefill_s, token = timed(device, lambda: step(ids))
    if batch > 1:
        cache.batch_repeat_interleave(batch)
        token = token.repeat(batch, 1)
    steps, tokens = [], []
    for _ in range(args.decode_steps + 2):
        seconds, token = timed(device, lambda: step(token))
        steps.append(seconds)
        tokens.append(int(token[-1, 0]))
    first_step_s = steps[0]  # includes the graph capture of a static cache
    steps = steps[2:]
    step_s = median_high(steps)
    bytes_ = decode_bytes(model, cache)
    floor_s = bytes_["total"] / PEAK_BYTES
    rec = dict(prefill_s=prefill_s, first_step_s=first_step_s, oom=False, tokens=tokens, step_s_median=step_s,
               step_s_mean=sum(steps) / len(steps), tokens_per_s=batch / step_s, bytes_per_step=bytes_,
               floor_step_s=floor_s, floor_tokens_per_s=batch / floor_s, fraction_of_floor=floor_s / step_s,
               peak_bytes=mem(device)["peak"], cache_bytes=cache.memory_bytes())
    if profiling(args, device) and batch == max(ints(args.decode_batches)):
        state = {"token": token}

        def profiled_step():
            state["token"] = step(state["token"])

        profile_region(f"decode_{name}_{label}_b{batch}", profiled_step, device, results, args, repeats=3)
    return rec


def graph_check(model, name, device, results, tiny, steps=8):
    """CUDA-graph decoding vs the same static-cache steps run eagerly, and vs the dynamic cache: a batch of two video
    prompts (random projector outputs; the second row left-padded by 5 tokens), 8 greedy steps."""
    from timeviper.modeling_timeviper import TimeViperHybridCache

    cfg = model.config
    install_frame_source(model, "llm_only", device)
    frames = 4 if tiny else 64
    ids = video_prompt_ids(cfg, frames, device).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    placeholder = torch.empty(2 * frames, 1, device=device)
    logits, forced = {}, []  # the dynamic run's greedy tokens are fed to the other two (random weights: near-ties)
    for mode in ("dynamic", "static_eager", "static_graph"):
        cache = TimeViperHybridCache(None if mode == "dynamic" else ids.shape[1] + steps)
        step_mask = mask
        token = model(input_ids=ids, attention_mask=mask, pixel_values_videos=placeholder, past_key_values=cache,
                      logits_to_keep=1).logits[:, -1:].argmax(-1)
        out = []
        for step in range(steps):
            if mode == "dynamic":
                forced.append(token)
            token = forced[step]
            if mode == "static_eager":  # the computation the graph captured, launched op by op
                cache.begin_static_step()
                step_logits = model.eager_decode_step(token, cache)
            else:
                step_mask = torch.cat([step_mask, torch.ones_like(token)], 1)
                step_logits = model(input_ids=token, attention_mask=step_mask, past_key_values=cache).logits
            out.append(step_logits[:, -1].float())
            token = step_logits[:, -1:].argmax(-1)
        logits[mode] = torch.stack(out, 1)
        if mode == "static_graph" and is_cuda(device) and cache.decode_graph is None:
            raise RuntimeError("the static cache did not capture a CUDA graph")
        del cache

    def compare(a, b):
        return {"max_abs": float((logits[a] - logits[b]).abs().max()),
                "argmax_agreement": float((logits[a].argmax(-1) == logits[b].argmax(-1)).float().mean())}

    out = {"graph_vs_static_eager": compare("static_graph", "static_eager"),
           "graph_vs_dynamic": compare("static_graph", "dynamic"), "ref_max_abs": float(logits["dynamic"].abs().max())}
    out["teacher_forced"] = True
    results.setdefault("graph_check", {})[name] = out
    log(f"graph check {name}:", json.dumps(out))


# The model's handles of mamba-ssm's kernels; set to None, they select its PyTorch path.
KERNEL_HANDLES = ("mamba_chunk_scan_combined", "selective_state_update", "gated_rmsnorm_kernel")


def kernel_check(device, results, small=False):
    """Mamba-2 through mamba-ssm's Triton kernels vs the PyTorch path of the same model, at a small size with the
    real Mamba head layout (128 heads x 80, state 128, 8 groups, chunk 128), fp32 and bf16, prefill (two rows, one
    left-padded; the sequence also split into carried chunks) and 8 greedy decode steps."""
    import timeviper.modeling_timeviper as tm

    cfg = kernel_check_config(small)
    ids = torch.randint(100, 4096, (2, 700), generator=torch.Generator().manual_seed(5)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    valid = mask.bool()
    kernels = {name: getattr(tm, name, None) for name in KERNEL_HANDLES}
    out = {}
    try:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            with torch.device(device):
                model = tm.TimeViperForConditionalGeneration._from_config(cfg, dtype=dtype).eval()
            with torch.inference_mode():
                kernel_prefill, kernel_decode = prefill_and_decode(model, ids, mask, kernels, use_kernels=True)
                torch_prefill, torch_decode = prefill_and_decode(model, ids, mask, kernels, use_kernels=False)
                chunked_prefill, _ = prefill_and_decode(model, ids, mask, kernels, use_kernels=True, sequence_chunk=256)
            out[str(dtype).replace("torch.", "")] = {
                "prefill_kernel_vs_torch": difference(kernel_prefill[valid], torch_prefill[valid]),
                "decode_kernel_vs_torch_8_steps": difference(kernel_decode, torch_decode),
                "prefill_kernel_chunked256_vs_unchunked": difference(chunked_prefill[valid], kernel_prefill[valid]),
                "argmax_agreement_prefill": float(
                    (kernel_prefill.argmax(-1) == torch_prefill.argmax(-1))[valid].float().mean()
                ),
            }
            del model
            free(device)
    finally:
        for name, kernel in kernels.items():
            setattr(tm, name, kernel)
    results["kernel_check"] = out
    log("kernel check:", json.dumps(out))


def kernel_check_config(small):
    """A 6-block hybrid at the real Mamba head layout (`small`: tiny widths, for the CPU smoke test)."""
    from timeviper.configuration_timeviper import TimeViperConfig, nano_9b_v2_text_config, so400m_vision_config

    widths = dict(hidden_size=1024, intermediate_size=2048, num_attention_heads=8, head_dim=128)
    if small:
        widths = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, head_dim=16, mamba_num_heads=4,
                      mamba_head_dim=16, ssm_state_size=16, n_groups=2)
    text = nano_9b_v2_text_config(**widths, num_key_value_heads=2, hybrid_override_pattern="M-M*-M", vocab_size=4096)
    vision = so400m_vision_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return TimeViperConfig(vision_config=vision, text_config=text, image_token_id=4096, video_token_id=4097)


def prefill_and_decode(model, ids, mask, kernels, use_kernels, sequence_chunk=None, steps=8):
    """float32 logits of the prefill and of `steps` greedy decode steps (each path decodes its own greedy tokens),
    with mamba-ssm's kernels or the PyTorch path, the sequence split into `sequence_chunk`-token chunks if given."""
    import timeviper.modeling_timeviper as tm

    for name, kernel in kernels.items():
        setattr(tm, name, kernel if use_kernels else None)
    for layer in model.model.language_model.layers:
        layer.sequence_chunk_size = sequence_chunk or tm.TimeViperTextModel.sequence_chunk_size
    cache = tm.TimeViperHybridCache()
    prefill = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits.float()
    token = prefill[:, -1:].argmax(-1)
    decoded = []
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        logits = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True).logits.float()
        decoded.append(logits[:, -1])
        token = logits[:, -1:].argmax(-1)
    return prefill, torch.stack(decoded, 1)


def difference(a, b):
    return {"max_abs": float((a - b).abs().max()), "rel_l2": float((a - b).norm() / b.norm()),
            "ref_max_abs": float(b.abs().max())}


def repeat(fn, times):
    for _ in range(times):
        fn()


def measure_ceilings(device, results):
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    mm = 10 * 2 * 8192**3 / timed(device, lambda: repeat(lambda: a @ b, 10))[0]
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    bw = 10 * 2 * x.numel() / timed(device, lambda: repeat(lambda: y.copy_(x), 10))[0]
    del a, b, x, y
    free(device)
    results["meta"]["measured_ceilings"] = {"bf16_matmul_flops": mm, "copy_bytes_per_s": bw}
    log(f"ceilings: matmul {mm / 1e12:.0f} TFLOP/s, copy {bw / 1e12:.2f} TB/s")


def llm_cost_estimate(model, frames):
    """Seconds an llm_only prefill of `frames` should take, at 40% of peak (for skipping against the budget)."""
    vision_tokens = frames * model.config.vision_tokens_per_frame
    layer_tokens = tokens_per_block(model, vision_tokens, PROMPT_TEXT_TOKENS)
    return llm_flops(model, layer_tokens)["total"] / (0.4 * PEAK_FLOPS) + 2.0


def fit_memory(points, cap):
    """Least squares peak = a + b * frames over the measured points; predicted largest frame count under cap."""
    pts = [(r["frames"], r["peak_bytes"]) for r in points]
    if len(pts) < 2:
        return None
    slope, intercept = linear_regression(*zip(*pts))
    if slope <= 0:
        return None
    return {"points": pts, "bytes_per_frame": slope, "intercept_bytes": intercept,
            "predicted_max_frames": int((cap - intercept) / slope)}


@dataclass
class Run:
    """What every step of one benchmark run reads and writes."""

    args: argparse.Namespace
    device: torch.device
    results: dict
    vision_rate: dict | None = None  # vision_microbench of the first config: extrapolates llm_only runs

    def save(self):
        save(self.results, self.args)

    def allows(self, cost, what):
        """Whether a step predicted to take `cost` seconds ends within --budget-s (else it is logged as skipped)."""
        left = T0 + self.args.budget_s - time.perf_counter()
        if cost < left:
            return True
        log(f"SKIP {what}: predicted {cost:.0f}s, {left:.0f}s left")
        return False


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_grad_enabled(False)
    os.makedirs(os.path.dirname(args.profile_out) or ".", exist_ok=True)
    open(args.profile_out, "w").close()
    install_kernel_counters()
    results = {"meta": {**meta(device, args), "peak_flops_used": PEAK_FLOPS, "peak_bytes_used": PEAK_BYTES},
               "runs": [], "decode": [], "fit": {}}
    run = Run(args, device, results)
    log("meta:", json.dumps(results["meta"]))
    if is_cuda(device):
        measure_ceilings(device, results)
    run.save()
    run_kernel_check(run)
    for name in args.configs.split(","):
        sweep_config(run, name)
    for name in args.extras.split(","):
        if name == "compile":
            compiled_vision_extra(run)
        elif name in results["fit"]:
            verify_fit(run, name)
    results["kernel_calls"] = dict(KERNEL_CALLS)
    results["meta"]["elapsed_s"] = time.perf_counter() - T0
    run.save()
    log("kernel calls:", KERNEL_CALLS)
    summary(results)


def run_kernel_check(run):
    import timeviper.modeling_timeviper as tm

    if not run.args.check or not (run.args.tiny or (is_cuda(run.device) and tm.mamba_chunk_scan_combined is not None)):
        return
    try:
        kernel_check(run.device, run.results, small=run.args.tiny)
    except Exception:  # noqa: BLE001 - the sweeps still run; the traceback is the check's result
        run.results["kernel_check"] = {"error": traceback.format_exc()[-2000:]}
        log("kernel check failed", run.results["kernel_check"]["error"])
    run.save()


def sweep_config(run, name):
    """Every measurement of one config, on one model built for it."""
    args, device = run.args, run.device
    cfg = make_config(name, args.tiny, args.vision_chunk)
    with torch.inference_mode():
        model, build_s = build_model(cfg, device, torch.bfloat16)
        describe_model(run, name, model, build_s)
        timer = PhaseTimer(model, device)
        # Warm-up: vision + compression path, and an LLM-only pass long enough for the carried-chunk kernels.
        run_point(run, model, timer, name, 16, "e2e", keep=False)
        warm = (model.model.language_model.sequence_chunk_size + 512) // cfg.vision_tokens_per_frame
        run_point(run, model, timer, name, 8 if args.tiny else warm, "llm_only", keep=False)
        if run.vision_rate is None:
            run.vision_rate = measure_vision_rate(run, model)
        e2e_sweep(run, model, timer, name)
        if args.graph_check and (args.tiny or is_cuda(device)):
            graph_check(model, name, device, run.results, args.tiny)
            run.save()
        profile_prefill(run, model, name)
        if name in args.decode_configs.split(","):
            decode_sweep(run, model, name)
        llm_only_sweep(run, model, timer, name)
        record_fit(run, name)
        timer.remove()
        del model, timer
        free(device)


def describe_model(run, name, model, build_s):
    weights = weight_bytes(model)
    run.results.setdefault("models", {})[name] = {
        "label": CONFIGS[name]["label"], "build_s": build_s, "weight_bytes": weights,
        "params": sum(p.numel() for p in model.parameters()),
        "llm_params": sum(p.numel() for p in model.model.language_model.parameters()),
        "vision_params": sum(p.numel() for p in model.model.vision_tower.parameters()),
        "token_compression": model.config.token_compression}
    log(f"== {name}: {CONFIGS[name]['label']}: built in {build_s:.1f}s, {weights / 2**30:.1f} GiB weights")


def measure_vision_rate(run, model):
    """The vision chunk's per-frame rate (and, with --ab cudnn_vision_attention, the same with cuDNN attention
    preferred)."""
    rate = vision_microbench(model, run.device, run.args, run.results)
    if run.args.ab == "cudnn_vision_attention" and is_cuda(run.device):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        with sdpa_kernel(backends, set_priority=True):
            vision_microbench(model, run.device, run.args, run.results, label="vision_microbench_cudnn_attention")
    run.save()
    return rate


def e2e_sweep(run, model, timer, name):
    per_frame = run.vision_rate["vision_s_per_frame"] + run.vision_rate["tome_proj_s_per_frame"]
    for frames in ints(run.args.e2e_frames):
        if run.allows(frames * per_frame + llm_cost_estimate(model, frames), f"{name} e2e F={frames}"):
            run_point(run, model, timer, name, frames, "e2e")
            run.save()


def profile_prefill(run, model, name):
    """Kernel-level profile of an llm_only prefill at the largest e2e frame count."""
    if not profiling(run.args, run.device) or not ints(run.args.e2e_frames):
        return
    frames = max(ints(run.args.e2e_frames))
    if not run.allows(llm_cost_estimate(model, frames) * 1.5, f"profile {name}"):
        return
    install_frame_source(model, "llm_only", run.device)
    ids = video_prompt_ids(model.config, frames, run.device)
    placeholder = torch.empty(frames, 1, device=run.device)
    profile_region(f"prefill_llm_only_{name}_F{frames}",
                   lambda: model(input_ids=ids, pixel_values_videos=placeholder, logits_to_keep=1),
                   run.device, run.results, run.args)
    del ids, placeholder
    free(run.device)
    run.save()


def decode_sweep(run, model, name):
    for variant in run.args.decode_variants.split(","):
        if variant == "static_graph" and not is_cuda(run.device):
            continue
        if run.allows(30, f"decode {name} {variant}"):
            decode_bench(model, name, run.device, run.args, run.results, variant)
            run.save()


def llm_only_sweep(run, model, timer, name):
    """llm_only points in increasing frame count, up to the first OOM."""
    args = run.args
    llm_frames = ints(args.llm_frames) + (ints(args.llm_frames_b) if name == "b" else [])
    if name == "c":
        llm_frames = [f for f in llm_frames if f <= args.max_llm_frames_c]
    for frames in llm_frames:
        if run.allows(llm_cost_estimate(model, frames), f"{name} llm_only F={frames}"):
            rec = run_point(run, model, timer, name, frames, "llm_only")
            run.save()
            if rec.get("oom"):
                break


def record_fit(run, name):
    smallest = 4 if run.args.tiny else 4096
    points = [r for r in run.results["runs"] if r["config"] == name and not r.get("oom") and r["frames"] >= smallest]
    fit = fit_memory(points, run.results["meta"].get("memory_cap_bytes", 80e9))
    if fit:
        run.results["fit"][name] = fit
        log(f"{name}: {fit['bytes_per_frame'] / 2**20:.2f} MiB/frame, "
            f"predicted max {fit['predicted_max_frames']} frames")
        run.save()


def compiled_vision_extra(run):
    if not is_cuda(run.device) or not run.allows(150, "compiled vision A/B"):
        return
    with torch.inference_mode():
        model, _ = build_model(make_config("a", run.args.tiny, run.args.vision_chunk), run.device, torch.bfloat16)
        compiled_tower_bench(model, run.device, run.args, run.results)
        del model
        free(run.device)
    run.save()


def verify_fit(run, name):
    """One llm_only run just under the predicted largest frame count of `name`."""
    args, fit = run.args, run.results["fit"][name]
    with torch.inference_mode():
        model, _ = build_model(make_config(name, args.tiny, args.vision_chunk), run.device, torch.bfloat16)
        frames = 48 if args.tiny else int(fit["predicted_max_frames"] * args.fit_margin) // 256 * 256
        if run.allows(llm_cost_estimate(model, frames) * 1.2, f"{name} fit verify F={frames}"):
            timer = PhaseTimer(model, run.device)
            rec = run_point(run, model, timer, name, frames, "llm_only")
            rec["fit_verification"] = True
            fit["verified_frames"] = frames
            fit["verified_ok"] = not rec.get("oom")
            timer.remove()
            del timer
            run.save()
        del model
        free(run.device)


def summary(results):
    print("\nconfig frames  mode      prefill_s  e2e_s(vision extrap.)  decode16_s  peak_GiB  ratio(prefill/floor)")
    for r in results["runs"]:
        if r.get("oom"):
            print(f"{r['config']:6s} {r['frames']:6d}  {r['mode']:8s}  OOM")
            continue
        print(f"{r['config']:6s} {r['frames']:6d}  {r['mode']:8s}  {r['prefill_s']:9.2f}  "
              f"{r.get('prefill_e2e_s', float('nan')):9.2f}             {r['decode_s']:9.2f}  "
              f"{r['peak_bytes'] / 2**30:8.1f}  {r['ratio'].get('prefill', float('nan')):.2f}")
    for r in results["decode"]:
        if not r.get("oom"):
            print(f"decode {r['config']} {r['variant']:12s} b={r['batch']:3d}: {r['tokens_per_s']:8.0f} tok/s "
                  f"({r['fraction_of_floor']:.0%} of floor {r['floor_tokens_per_s']:.0f})")
        else:
            print(f"decode {r['config']} {r['variant']} b={r['batch']}: OOM")
    for k, f in results["fit"].items():
        print(f"fit {k}: {f['bytes_per_frame'] / 2**20:.2f} MiB/frame, predicted max {f['predicted_max_frames']}, "
              f"verified {f.get('verified_frames')} ok={f.get('verified_ok')}")


if __name__ == "__main__":
    main()
