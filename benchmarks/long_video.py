"""Long-video efficiency benchmark of TimeViper on one GPU: memory, prefill time against its compute floor, decode
throughput against its bandwidth floor, for the hybrid Nemotron-Nano-9B-v2 LLM (with and without TransV) and a
Qwen2.5-7B-architecture baseline, all behind the same SigLIP so400m/14-384 + ToMe (16 tokens/frame) + MLP stack.

Full-size architectures, random bf16 weights (nothing is downloaded). On CUDA the Mamba-2 scan and the decode state
update are mamba-ssm's Triton kernels when `mamba_ssm` imports (see gpu_setup.sh); the causal depthwise conv always
runs through torch.nn.functional.conv1d (causal-conv1d is not installed).

Frames never exist as one pixel tensor: `get_video_features` is replaced by a function that draws each vision chunk
of random (chunk, 3, 384, 384) bf16 frames on the GPU and passes it through the model's own `encode_frames`
(mode "e2e"), or, for large frame counts, by one that returns random ToMe+projector outputs of the right shape
(mode "llm_only"): the LLM side is then measured and the vision side is extrapolated from the measured per-frame
rate (vision chunks are independent and identical in cost, so its time is exactly linear in frames).

    python benchmarks/long_video.py --tiny                 # CPU smoke test, tiny dims
    python benchmarks/long_video.py --out results.json     # GPU, full sizes (see benchmarks/README.md)
"""

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import sys
import time
import traceback

import torch
from torch import nn

PEAK_FLOPS = 790e12  # bf16 dense matmul on random data, measured on the H100s we benchmark on
PEAK_BYTES = 3.0e12  # device-to-device copy, measured on the same H100s
CONFIGS = {
    "a": dict(backbone="nano", compression=None, label="Nano-9B-v2 hybrid, no compression"),
    "b": dict(backbone="nano", compression="uni_7_0.5-attn_39_0.05", label="Nano-9B-v2 hybrid + TransV uni_7_0.5-attn_39_0.05"),
    "c": dict(backbone="qwen", compression=None, label="Qwen2.5-7B architecture, no compression"),
}
T0 = time.perf_counter()


def log(*args):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *args, flush=True)


def ints(text):
    return [int(x) for x in text.split(",") if x.strip()] if text else []


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke test of the whole script)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/long_video.json", help="JSON written after every step")
    p.add_argument("--profile-out", default=None, help="text file for the profiler tables (default: next to --out)")
    p.add_argument("--configs", default="a,b,c", help="subset of a (Nano), b (Nano+TransV), c (Qwen2.5-7B arch)")
    p.add_argument("--e2e-frames", default="256,1024,4096", help="frame counts run end to end (real vision)")
    p.add_argument("--llm-frames", default="8192,16384,32768",
                   help="frame counts run with synthetic vision features (vision time extrapolated)")
    p.add_argument("--llm-frames-b", default="65536", help="extra llm_only frame counts for config b only")
    p.add_argument("--max-llm-frames-c", type=int, default=16384, help="Qwen baseline: llm_only sweep stops here (time)")
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
    p.add_argument("--memory-cap-gib", type=float, default=79.0,
                   help="cap PyTorch's allocator here when the card is larger (H200), to emulate an 80 GB H100")
    p.add_argument("--patches", default="", help="monkeypatches to apply: kv_prealloc,lean_scatter")
    p.add_argument("--ab", default="", help="A/B checks to run: kv_prealloc,lean_scatter,conv1d_cuda,fused_gated_norm")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="kernel-vs-PyTorch Mamba path check at a small size")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--budget-s", type=float, default=1e9, help="skip steps predicted to end after this many seconds")
    p.add_argument("--vision-chunk", type=int, default=None, help="override config.vision_chunk_size")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Configs and models
# ---------------------------------------------------------------------------------------------------------------


def make_config(name, tiny):
    from transformers import Qwen2Config

    from timeviper.configuration_timeviper import TimeViperConfig, nano_9b_v2_text_config, so400m_vision_config

    spec = CONFIGS[name]
    if tiny:
        vision = so400m_vision_config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      image_size=56, patch_size=8)
        nano = nano_9b_v2_text_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      intermediate_size=96, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16,
                                      n_groups=2, chunk_size=16, vocab_size=512)
        qwen = Qwen2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=640, rope_theta=1e6, rms_norm_eps=1e-6,
                           tie_word_embeddings=False)
    else:
        vision = so400m_vision_config()
        nano = nano_9b_v2_text_config()
        qwen = Qwen2Config(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                           intermediate_size=18944, vocab_size=152064, rope_theta=1e6, rms_norm_eps=1e-6,
                           max_position_embeddings=32768, tie_word_embeddings=False)
    text = nano if spec["backbone"] == "nano" else qwen
    # Placeholder ids outside the vocabulary, so that a generated token can never be taken for a placeholder.
    vocab = text.vocab_size
    return TimeViperConfig(vision_config=vision, text_config=text, token_compression=spec["compression"],
                           image_token_id=vocab, video_token_id=vocab + 1)


def build_model(cfg, device, dtype, args):
    from timeviper.modeling_timeviper import TimeViperForConditionalGeneration

    if args.vision_chunk:
        cfg.vision_chunk_size = args.vision_chunk
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(device):
        model = TimeViperForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    sync(device)
    return model, time.perf_counter() - t


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def free(device):
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def mem(device):
    if not str(device).startswith("cuda"):
        return {"allocated": 0, "peak": 0, "reserved_peak": 0}
    return {"allocated": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated(),
            "reserved_peak": torch.cuda.max_memory_reserved()}


# ---------------------------------------------------------------------------------------------------------------
# Monkeypatches under test (A/B); once they win they are ported into modeling_timeviper.py
# ---------------------------------------------------------------------------------------------------------------


def kv_prealloc_update(self, key_states, value_states, layer_idx, *args, **kwargs):
    """Append into a buffer with spare room instead of torch.cat of the whole cache at every decode step."""
    buffers = self.__dict__.setdefault("_bench_kv_buffers", {})
    old_k, old_v = self.keys.get(layer_idx), self.values.get(layer_idx)
    if old_k is None:
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states
    length, new = old_k.shape[-2], key_states.shape[-2]
    buf = buffers.get(layer_idx)
    fits = (buf is not None and buf[0].data_ptr() == old_k.data_ptr() and buf[0].shape[:2] == old_k.shape[:2]
            and buf[0].shape[-2] >= length + new)
    if not fits:
        buffers.pop(layer_idx, None)
        cap = length + new + 256
        kb = old_k.new_empty(*old_k.shape[:2], cap, old_k.shape[-1])
        vb = old_v.new_empty(*old_v.shape[:2], cap, old_v.shape[-1])
        kb[..., :length, :].copy_(old_k)
        vb[..., :length, :].copy_(old_v)
        buffers[layer_idx] = buf = (kb, vb)
    kb, vb = buf
    kb[..., length : length + new, :].copy_(key_states)
    vb[..., length : length + new, :].copy_(value_states)
    self.keys[layer_idx], self.values[layer_idx] = kb[..., : length + new, :], vb[..., : length + new, :]
    return self.keys[layer_idx], self.values[layer_idx]


_ORIG_MASKED_SCATTER = torch.Tensor.masked_scatter


def lean_masked_scatter(self, mask, source):
    """Row-wise equivalent of masked_scatter for a (..., 1) mask: no int64 prefix sum over every element."""
    if mask.dim() == self.dim() and mask.shape[-1] == 1 and mask.shape[:-1] == self.shape[:-1]:
        rows = mask[..., 0]
        out = self.clone()
        out[rows] = source.reshape(-1, self.shape[-1])[: int(rows.sum())].to(self.dtype)
        return out
    return _ORIG_MASKED_SCATTER(self, mask, source)


def conv1d_convolve(self, xbc, conv_state):
    """The causal depthwise conv through F.conv1d (one cuDNN kernel) instead of four multiply-adds."""
    import torch.nn.functional as F

    xbc = xbc.transpose(1, 2)
    if conv_state is None:
        conv_state = xbc.new_zeros(xbc.shape[0], self.conv_dim, self.kernel_size - 1)
    padded = torch.cat([conv_state.to(xbc.dtype), xbc], dim=-1)
    out = F.conv1d(padded, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
    return F.silu(out).transpose(1, 2), padded[..., -(self.kernel_size - 1) :]


def fused_gated_norm_forward(self, hidden_states, gate):
    """mamba-ssm's Triton gated RMSNorm (one pass, fp32 inside) instead of the PyTorch fp32 ops."""
    if not hidden_states.is_cuda:
        from timeviper.modeling_timeviper import TimeViperRMSNormGated

        return TimeViperRMSNormGated._bench_original_forward(self, hidden_states, gate)
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

    return rmsnorm_fn(hidden_states, self.weight, None, z=gate, eps=self.variance_epsilon, group_size=self.group_size,
                      norm_before_gate=False)


def legacy_encode_frames(self, frames):
    """encode_frames as it was before the .contiguous() fix (SigLIP residual stream in a transposed layout)."""
    from timeviper.modeling_timeviper import merge_tokens

    vision = self.vision_tower
    features = vision.embeddings(frames.to(vision.embeddings.patch_embedding.weight.dtype))
    for layer in vision.encoder.layers[: self._vision_layers_to_run()]:
        features = layer(features, None)
    if self.config.projector_type == "tome_mlp":
        features = merge_tokens(features, self.config.tokens_per_frame)
    return self.multi_modal_projector(features)


def fused_rmsnorm_forward(self, hidden_states):
    """TimeViperRMSNorm through torch's fused F.rms_norm (fp32), weight applied after the bf16 cast as before."""
    import torch.nn.functional as F

    dtype = hidden_states.dtype
    normed = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.variance_epsilon)
    return self.weight * normed.to(dtype)


@contextlib.contextmanager
def patches(names):
    from timeviper.modeling_timeviper import (TimeViperHybridCache, TimeViperMamba2Mixer, TimeViperModel,
                                              TimeViperRMSNorm, TimeViperRMSNormGated)

    names = set(n for n in names if n)
    if not hasattr(TimeViperRMSNormGated, "_bench_original_forward"):
        TimeViperRMSNormGated._bench_original_forward = TimeViperRMSNormGated.forward
    saved = (TimeViperHybridCache.update, TimeViperMamba2Mixer.convolve, TimeViperRMSNormGated.forward)
    saved2 = (TimeViperModel.encode_frames, TimeViperRMSNorm.forward)
    try:
        if "legacy_vision_layout" in names:
            TimeViperModel.encode_frames = legacy_encode_frames
        if "fused_rmsnorm" in names:
            TimeViperRMSNorm.forward = fused_rmsnorm_forward
        if "kv_prealloc" in names:
            TimeViperHybridCache.update = kv_prealloc_update
        if "lean_scatter" in names:
            torch.Tensor.masked_scatter = lean_masked_scatter
        if "conv1d_cuda" in names:
            TimeViperMamba2Mixer.convolve = conv1d_convolve
        if "fused_gated_norm" in names:
            TimeViperRMSNormGated.forward = fused_gated_norm_forward
        yield
    finally:
        TimeViperHybridCache.update, TimeViperMamba2Mixer.convolve, TimeViperRMSNormGated.forward = saved
        TimeViperModel.encode_frames, TimeViperRMSNorm.forward = saved2
        torch.Tensor.masked_scatter = _ORIG_MASKED_SCATTER


# ---------------------------------------------------------------------------------------------------------------
# Kernel accounting: count the calls of the Mamba Triton kernels
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# FLOP and byte counting
# ---------------------------------------------------------------------------------------------------------------


def linear_params(module):
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def vision_flops_per_frame(model):
    vcfg = model.config.vision_config
    patches = (vcfg.image_size // vcfg.patch_size) ** 2
    layers = model.model._vision_layers_to_run()
    d = vcfg.hidden_size
    embed = 2 * patches * 3 * vcfg.patch_size**2 * d
    per_layer = 2 * patches * linear_params(model.model.vision_tower.encoder.layers[0]) + 4 * patches**2 * d
    return embed + layers * per_layer


def tome_proj_flops_per_frame(model):
    from timeviper.modeling_timeviper import tome_schedule

    vcfg = model.config.vision_config
    patches = (vcfg.image_size // vcfg.patch_size) ** 2
    tokens = model.config.vision_tokens_per_frame
    tome = 0
    n = patches
    for r in tome_schedule(patches, tokens) if model.config.projector_type == "tome_mlp" else []:
        tome += 2 * (n // 2 + n % 2) * (n // 2) * (vcfg.hidden_size // 16)  # cosine scores on the 16-head mean
        n -= r
    return tome + 2 * tokens * linear_params(model.model.multi_modal_projector)


def ssd_flops_per_token(text_cfg):
    q, n, g = text_cfg.chunk_size, text_cfg.ssm_state_size, text_cfg.n_groups
    h, p = text_cfg.mamba_num_heads, text_cfg.mamba_head_dim
    # C B^T per group inside a chunk + (CB) x per head + chunk states B^T x + state output C h.
    return 2 * q * n * g + 2 * q * h * p + 4 * n * h * p


def llm_flops(model, layer_tokens, extra=0):
    """layer_tokens: tokens each LLM block processed in the prefill (measured by hooks)."""
    lm = model.model.language_model
    tc = model.config.text_config
    total = {"linear": 0, "attention": 0, "ssd": 0, "conv": 0, "other": extra}
    for layer, tokens in zip(lm.layers, layer_tokens):
        total["linear"] += 2 * linear_params(layer) * tokens
        attention = layer.attention
        if attention is not None:
            total["attention"] += 2 * tokens**2 * attention.num_heads * attention.head_dim  # causal: half of 4 L^2 d
        if getattr(layer, "block_type", "") == "linear_attention":
            total["ssd"] += ssd_flops_per_token(tc) * tokens
            total["conv"] += 2 * layer.mixer.kernel_size * layer.mixer.conv_dim * tokens
    total["lm_head"] = 2 * model.lm_head.weight.numel()
    total["total"] = sum(total.values())
    return total


def compression_flops(model, layer_tokens, text_tokens):
    """Attention-guided scores (k_proj over the kept sequence) and TransV cross-attention, both small."""
    lm = model.model.language_model
    flops = 0
    for stage in lm.stages:
        tokens_in = layer_tokens[stage.layer_idx - 1]
        kept = layer_tokens[stage.layer_idx]
        if stage.method == "attention":
            att = lm.layers[stage.layer_idx].attention
            flops += 2 * tokens_in * att.k_proj.weight.numel() + 2 * tokens_in * att.num_heads * att.head_dim
        if stage.transfer:
            dropped = tokens_in - kept
            merge = lm.merge_modules[str(lm.stages.index(stage))]
            flops += 2 * text_tokens * (merge.q_proj.weight.numel() + merge.o_proj.weight.numel())
            flops += 2 * dropped * (merge.k_proj.weight.numel() + merge.v_proj.weight.numel())
            flops += 4 * text_tokens * dropped * merge.num_heads * merge.head_dim
    return flops


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


# ---------------------------------------------------------------------------------------------------------------
# Frame sources and phase timing
# ---------------------------------------------------------------------------------------------------------------


class PhaseTimer:
    """Hooks that sync and stamp the vision tower, ToMe+projector and LLM phases of a prefill, record the tokens
    each LLM block sees and the running peak memory after each block."""

    def __init__(self, model, device):
        self.device, self.active, self.handles = device, False, []
        inner = model.model
        vision = inner.vision_tower
        last = vision.encoder.layers[inner._vision_layers_to_run() - 1]
        self.reset()
        self.handles.append(vision.embeddings.register_forward_pre_hook(lambda m, a: self._stamp("vision_start")))
        self.handles.append(last.register_forward_hook(lambda m, a, o: self._stamp("vision_end")))
        self.handles.append(inner.multi_modal_projector.register_forward_hook(lambda m, a, o: self._stamp("proj_end")))
        lm = inner.language_model
        self.handles.append(lm.register_forward_pre_hook(lambda m, a: self._llm_start()))
        self.handles.append(lm.register_forward_hook(lambda m, a, o: self._stamp("llm_end")))
        for i, layer in enumerate(lm.layers):
            self.handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: self._layer_in(i, a)))

    def reset(self):
        self.vision_s = self.tome_proj_s = 0.0
        self.last = {}
        self.layer_tokens, self.layer_peak = [], []
        self.pre_llm_peak = None

    def _now(self):
        sync(self.device)
        return time.perf_counter()

    def _stamp(self, name):
        if not self.active:
            return
        now = self._now()
        if name == "vision_end":
            self.vision_s += now - self.last["vision_start"]
        if name == "proj_end":
            self.tome_proj_s += now - self.last["vision_end"]
        self.last[name] = now

    def _llm_start(self):
        if not self.active:
            return
        self.last["llm_start"] = self._now()
        self.pre_llm_peak = mem(self.device)["peak"]

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
    vcfg = cfg.vision_config
    dtype = inner.vision_tower.embeddings.patch_embedding.weight.dtype

    def get_video_features(pixel_values_videos):
        frames = pixel_values_videos.shape[0]
        gen = torch.Generator(device=device).manual_seed(seed)
        chunks = []
        for start in range(0, frames, cfg.vision_chunk_size):
            n = min(cfg.vision_chunk_size, frames - start)
            if mode == "e2e":
                pixels = torch.randn(n, 3, vcfg.image_size, vcfg.image_size, device=device, dtype=dtype, generator=gen)
                chunks.append(inner.encode_frames(pixels))
            else:
                chunks.append(0.5 * torch.randn(n, cfg.vision_tokens_per_frame, cfg.text_config.hidden_size,
                                                device=device, dtype=dtype, generator=gen))
        return torch.cat(chunks)

    inner.get_video_features = get_video_features


def video_prompt(cfg, frames, device, prefix=8, suffix=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    vocab = min(cfg.text_config.vocab_size, 131072)
    ids = torch.cat([
        torch.randint(100, vocab, (prefix,), generator=gen),
        torch.full((frames * cfg.vision_tokens_per_frame,), cfg.video_token_id),
        torch.randint(100, vocab, (suffix,), generator=gen),
    ])
    return ids[None].to(device), prefix + suffix


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------


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


def run_point(model, name, frames, mode, device, args, timer, results, vision_rate=None):
    cfg = model.config
    install_frame_source(model, mode, device)
    ids, text_tokens = video_prompt(cfg, frames, device)
    placeholder = torch.empty(frames, 1, device=device)
    rec = {"config": name, "frames": frames, "mode": mode, "tokens_in": int(ids.shape[1]),
           "patches": ",".join(sorted(set(args.patches.split(",")) - {""}))}
    try:
        prefill, total, peak, n_new = generate_timed(model, ids, placeholder, args.new_tokens, device, timer)
    except torch.OutOfMemoryError as err:
        rec.update(oom=True, error=str(err).splitlines()[0][:300])
        log(f"{name} F={frames} {mode}: OOM")
        results["runs"].append(rec)
        return rec
    finally:
        del placeholder
        free(device)
    lf = llm_flops(model, timer.layer_tokens, compression_flops(model, timer.layer_tokens, text_tokens))
    vf = vision_flops_per_frame(model) * frames
    tf = tome_proj_flops_per_frame(model) * frames
    rec.update(
        oom=False, new_tokens=n_new, prefill_s=prefill, total_s=total, decode_s=total - prefill,
        peak_bytes=peak, reserved_peak_bytes=getattr(timer, "reserved_peak", None), pre_llm_peak_bytes=timer.pre_llm_peak,
        peak_layer=next((i for i, p in enumerate(timer.layer_peak) if p >= peak), "after last layer"),
        llm_s=timer.llm_s, layer_tokens=timer.layer_tokens,
        flops={"vision": vf, "tome_proj": tf, "llm": lf},
        floor_s={"vision": vf / PEAK_FLOPS, "tome_proj": tf / PEAK_FLOPS, "llm": lf["total"] / PEAK_FLOPS},
    )
    rec["floor_s"]["prefill"] = sum(rec["floor_s"].values())
    if mode == "e2e":
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
    log(f"{name} F={frames:>6} {mode:8s} prefill {prefill:7.2f}s (llm {timer.llm_s:6.2f}s) "
        f"+{n_new} tok {total - prefill:5.2f}s peak {peak / 2**30:6.1f} GiB  ratio {rec['ratio']}")
    results["runs"].append(rec)
    return rec


def vision_microbench(model, device, args, results, repeats=3, label="vision_microbench"):
    """Per-chunk vision tower and ToMe+projector time, and the chunk's activation working set."""
    inner = model.model
    cfg = inner.config
    vcfg = cfg.vision_config
    dtype = inner.vision_tower.embeddings.patch_embedding.weight.dtype
    n = cfg.vision_chunk_size
    pixels = torch.randn(n, 3, vcfg.image_size, vcfg.image_size, device=device, dtype=dtype)
    timer = PhaseTimer(model, device)
    inner.encode_frames(pixels)  # warm-up
    free(device)
    base = mem(device)["allocated"]
    timer.active = True
    vis, tp = [], []
    for _ in range(repeats):
        timer.reset()
        timer.active = True
        out = inner.encode_frames(pixels)
        vis.append(timer.vision_s)
        tp.append(timer.tome_proj_s)
        del out
    timer.active = False
    timer.remove()
    peak = mem(device)["peak"]
    vf, tf = vision_flops_per_frame(model), tome_proj_flops_per_frame(model)
    vis_med, tp_med = sorted(vis)[len(vis) // 2], sorted(tp)[len(tp) // 2]
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
    if args.profile and (args.tiny or str(device).startswith("cuda")) and label == "vision_microbench":
        profile_region("vision_chunk", lambda frames=pixels: inner.encode_frames(frames), device, results, args)
    if str(device).startswith("cuda") and label == "vision_microbench_compiled":
        try:
            compiled = [torch.compile(layer) for layer in inner.vision_tower.encoder.layers[: inner._vision_layers_to_run()]]

            def run_compiled(frames=pixels):  # bound now: `pixels` is deleted at the end of this function
                f = inner.vision_tower.embeddings(frames).contiguous()
                for layer in compiled:
                    f = layer(f, None)
                return f

            t = time.perf_counter()
            run_compiled()
            sync(device)
            compile_s = time.perf_counter() - t
            times = []
            for _ in range(repeats):
                sync(device)
                t = time.perf_counter()
                run_compiled()
                sync(device)
                times.append(time.perf_counter() - t)
            med = sorted(times)[len(times) // 2]
            rec["compiled_tower_s_per_chunk"] = times
            rec["compiled_tower_compile_s"] = compile_s
            rec["compiled_tower_ratio_to_floor"] = med / (n * vf / PEAK_FLOPS)
            log(f"torch.compile'd tower: {med * 1e3:.1f} ms per chunk ({rec['compiled_tower_ratio_to_floor']:.2f}x)")
        except Exception as err:  # noqa: BLE001
            rec["compiled_tower_error"] = repr(err)[:300]
    del pixels
    free(device)
    return rec


def categorize(name):
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "pytorch_flash")):
        return "attention (SDPA)"
    if any(k in n for k in ("_chunk_scan", "_chunk_state", "_state_passing", "_bmm_chunk", "_chunk_cumsum",
                            "selective_scan", "_selective_scan_update")):
        return "mamba Triton"
    if any(k in n for k in ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul", "xmma")):
        return "matmul (cuBLAS)"
    if "conv" in n:
        return "conv"
    if any(k in n for k in ("copy", "cat", "memcpy", "memset", "index", "gather", "scatter")):
        return "copy/index"
    if "reduce" in n or "norm" in n:
        return "reductions/norms"
    return "elementwise/other"


def profile_region(label, fn, device, results, args, repeats=1):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(device).startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        sync(device)
    from torch.autograd import DeviceType

    # Kernel-level events only (an aten op's device time is its kernels' time: counting both would double it).
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0
              and not e.key.startswith(("Command Buffer", "Activity Buffer"))]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events)
    cats = {}
    for e in events:
        c = categorize(e.key)
        cats[c] = cats.get(c, 0) + e.self_device_time_total
    top = [{"name": e.key[:160], "ms": e.self_device_time_total / 1e3 / repeats, "calls": e.count // repeats,
            "category": categorize(e.key)} for e in events[:15]]
    results.setdefault("profiles", {})[label] = {
        "device_ms": total / 1e3 / repeats, "by_category_ms": {k: v / 1e3 / repeats for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top_kernels": top,
    }
    path = args.profile_out or os.path.join(os.path.dirname(args.out) or ".", "profiles.txt")
    with open(path, "a") as f:
        f.write(f"\n===== {label} =====\n")
        f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=90))
    log(f"profile {label}: {total / 1e3 / repeats:.1f} ms device; "
        + ", ".join(f"{k} {v / 1e3 / repeats:.1f}" for k, v in sorted(cats.items(), key=lambda kv: -kv[1])))


def decode_bench(model, name, device, args, results, patch_names, label):
    """Text prompt of `decode_context` tokens: prefill at batch 1, then decode steps at batch 1 and, from the
    replicated cache, at larger batches. Greedy, one token per row per step. Label "static_graph" decodes on a
    static cache (CUDA-graph replays; the first step, which captures the graph, is reported apart)."""
    from timeviper.modeling_timeviper import TimeViperHybridCache

    static = label == "static_graph"
    # Room for every step below: warm-up + timed steps + the profiled ones.
    max_length = args.decode_context + args.decode_steps + 8 if static else None

    cfg = model.config
    gen = torch.Generator().manual_seed(3)
    vocab = min(cfg.text_config.vocab_size, 131072)
    ids = torch.randint(100, vocab, (1, args.decode_context), generator=gen).to(device)
    out_recs = []
    with patches(patch_names):
        for batch in ints(args.decode_batches):
            rec = {"config": name, "variant": label, "context": args.decode_context, "batch": batch}
            try:
                free(device)
                cache = TimeViperHybridCache(max_length)
                sync(device)
                t = time.perf_counter()
                logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                sync(device)
                rec["prefill_s"] = time.perf_counter() - t
                token = logits[:, -1:].argmax(-1)
                if batch > 1:
                    cache.batch_repeat_interleave(batch)
                    token = token.repeat(batch, 1)
                steps, tokens = [], []
                for step in range(args.decode_steps + 2):
                    sync(device)
                    t = time.perf_counter()
                    logits = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                    token = logits[:, -1:].argmax(-1)
                    sync(device)
                    steps.append(time.perf_counter() - t)
                    tokens.append(int(token[-1, 0]))
                rec["first_step_s"] = steps[0]  # includes the graph capture of a static cache
                steps = steps[2:]
                step_s = sorted(steps)[len(steps) // 2]
                bytes_ = decode_bytes(model, cache)
                floor_s = bytes_["total"] / PEAK_BYTES
                rec.update(oom=False, tokens=tokens, step_s_median=step_s, step_s_mean=sum(steps) / len(steps),
                           tokens_per_s=batch / step_s, bytes_per_step=bytes_, floor_step_s=floor_s,
                           floor_tokens_per_s=batch / floor_s, fraction_of_floor=floor_s / step_s,
                           peak_bytes=mem(device)["peak"], cache_bytes=cache.memory_bytes())
                if args.profile and (args.tiny or str(device).startswith("cuda")) and batch == max(ints(args.decode_batches)):
                    state = {"token": token}

                    def step(cache=cache):  # bound now: `cache` is deleted after each batch
                        lg = model(input_ids=state["token"], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                        state["token"] = lg[:, -1:].argmax(-1)

                    profile_region(f"decode_{name}_{label}_b{batch}", step, device, results, args, repeats=3)
                del cache, logits, token
            except torch.OutOfMemoryError as err:
                rec.update(oom=True, error=str(err).splitlines()[0][:300])
            free(device)
            log(f"decode {name} {label} b={batch}: "
                + ("OOM" if rec["oom"] else f"{rec['tokens_per_s']:.0f} tok/s, step {rec['step_s_median'] * 1e3:.1f} ms, "
                   f"floor {rec['floor_step_s'] * 1e3:.1f} ms ({rec['fraction_of_floor']:.0%}), peak {rec['peak_bytes'] / 2**30:.1f} GiB"))
            results["decode"].append(rec)
            out_recs.append(rec)
    return out_recs


def graph_check(model, name, device, results, tiny, steps=8):
    """CUDA-graph decoding vs the same static-cache steps run eagerly, and vs the dynamic cache: a batch of two video
    prompts (random projector outputs; the second row left-padded by 5 tokens), 8 greedy steps."""
    from timeviper.modeling_timeviper import TimeViperHybridCache

    cfg = model.config
    install_frame_source(model, "llm_only", device)
    frames = 4 if tiny else 64
    ids, _ = video_prompt(cfg, frames, device)
    ids = ids.repeat(2, 1)
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
        if mode == "static_graph" and str(device).startswith("cuda") and cache.decode_graph is None:
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


def kernel_check(device, results, small=False):
    """Mamba-2 through mamba-ssm's Triton kernels vs the PyTorch path of the same model, at a small size with the
    real Mamba head layout (128 heads x 80, state 128, 8 groups, chunk 128), fp32 and bf16, prefill (two rows, one
    left-padded; the sequence also split into carried chunks) and 8 greedy decode steps."""
    import timeviper.modeling_timeviper as tm
    from timeviper.configuration_timeviper import TimeViperConfig, nano_9b_v2_text_config, so400m_vision_config

    text = nano_9b_v2_text_config(hidden_size=1024, intermediate_size=2048, num_attention_heads=8, head_dim=128,
                                  num_key_value_heads=2, hybrid_override_pattern="M-M*-M", vocab_size=4096)
    if small:  # CPU smoke test of this function only
        text = nano_9b_v2_text_config(hidden_size=64, intermediate_size=64, num_attention_heads=4, head_dim=16,
                                      num_key_value_heads=2, hybrid_override_pattern="M-M*-M", vocab_size=4096,
                                      mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2)
    vision = so400m_vision_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = TimeViperConfig(vision_config=vision, text_config=text, image_token_id=4096, video_token_id=4097)
    kernels = {"mamba_chunk_scan_combined": tm.mamba_chunk_scan_combined,
               "selective_state_update": tm.selective_state_update,
               "gated_rmsnorm_kernel": getattr(tm, "gated_rmsnorm_kernel", None)}
    out = {}
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(100, 4096, (2, 700), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0

    def run(model, use_kernels, seq_chunk=None):
        for k, v in kernels.items():
            setattr(tm, k, v if use_kernels else None)
        for layer in model.model.language_model.layers:
            layer.sequence_chunk_size = seq_chunk or tm.TimeViperTextModel.sequence_chunk_size
        cache = tm.TimeViperHybridCache()
        logits = [model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits.float()]
        token, m = logits[0][:, -1:].argmax(-1), mask
        steps = []
        for _ in range(8):
            m = torch.cat([m, torch.ones_like(token)], 1)
            lg = model(input_ids=token, attention_mask=m, past_key_values=cache, use_cache=True).logits.float()
            steps.append(lg[:, -1])
            token = lg[:, -1:].argmax(-1)  # greedy tokens of this path; compared step by step below
        return logits[0], torch.stack(steps, 1), token

    try:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            with torch.device(device):
                model = tm.TimeViperForConditionalGeneration._from_config(cfg, dtype=dtype).eval()
            with torch.inference_mode():
                kp, kd, _ = run(model, True)
                tp, td, _ = run(model, False)
                kc, _, _ = run(model, True, seq_chunk=256)
            valid = mask.bool()
            def stats(a, b, masked=False):
                if masked:
                    a, b = a[valid], b[valid]
                return {"max_abs": float((a - b).abs().max()), "rel_l2": float((a - b).norm() / b.norm()),
                        "ref_max_abs": float(b.abs().max())}
            out[str(dtype).replace("torch.", "")] = {
                "prefill_kernel_vs_torch": stats(kp, tp, True),
                "decode_kernel_vs_torch_8_steps": stats(kd, td),
                "prefill_kernel_chunked256_vs_unchunked": stats(kc, kp, True),
                "argmax_agreement_prefill": float((kp.argmax(-1) == tp.argmax(-1))[valid].float().mean()),
            }
            del model
            free(device)
    finally:
        for k, v in kernels.items():
            setattr(tm, k, v)
    results["kernel_check"] = out
    log("kernel check:", json.dumps(out))


def measure_ceilings(device, results):
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    mm = 10 * 2 * 8192**3 / (time.perf_counter() - t)
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    bw = 10 * 2 * x.numel() / (time.perf_counter() - t)
    del a, b, x, y
    free(device)
    results["meta"]["measured_ceilings"] = {"bf16_matmul_flops": mm, "copy_bytes_per_s": bw}
    log(f"ceilings: matmul {mm / 1e12:.0f} TFLOP/s, copy {bw / 1e12:.2f} TB/s")


def meta(device, args):
    import transformers

    import timeviper.modeling_timeviper as tm

    info = {"gated_rmsnorm_kernel": getattr(tm, "gated_rmsnorm_kernel", None) is not None, "argv": sys.argv, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device), "tiny": args.tiny,
            "peak_flops_used": PEAK_FLOPS, "peak_bytes_used": PEAK_BYTES,
            "mamba_chunk_scan_combined": tm.mamba_chunk_scan_combined is not None,
            "selective_state_update": tm.selective_state_update is not None,
            "causal_conv": ("causal-conv1d's CUDA kernel (prefill; F.conv1d for single-token steps)"
                            if tm.causal_conv1d_fn is not None else
                            "torch.nn.functional.conv1d on CUDA (causal-conv1d not installed); 4 multiply-adds on CPU"),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    for mod in ("triton", "mamba_ssm", "causal_conv1d"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001
            info[mod] = f"not importable: {type(err).__name__}"
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        free_b, total_b = torch.cuda.mem_get_info()
        info.update(gpu=props.name, gpu_total_bytes=total_b, sm_count=props.multi_processor_count,
                    cuda=torch.version.cuda)
        cap = args.memory_cap_gib * 2**30
        if total_b > cap * 1.03:
            torch.cuda.set_per_process_memory_fraction(cap / total_b)
            info["memory_cap_bytes"] = cap
            info["memory_cap_note"] = "card larger than an 80 GB H100: allocator capped to emulate one"
        else:
            info["memory_cap_bytes"] = total_b - 2**30  # CUDA context and allocator slack
    return info


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def llm_cost_estimate(model, frames):
    """Seconds an llm_only prefill of `frames` should take, at 40% of peak (for skipping against the budget)."""
    cfg = model.config
    text = 24
    tokens = frames * cfg.vision_tokens_per_frame + text
    vision = tokens - text
    layer_tokens = []
    for i in range(len(model.model.language_model.layers)):
        keep = 1.0
        for stage in model.model.language_model.stages:
            if i >= stage.layer_idx:
                keep = stage.keep_ratio
        layer_tokens.append(int(vision * keep) + text)
    return llm_flops(model, layer_tokens)["total"] / (0.4 * PEAK_FLOPS) + 2.0


class Budget:
    def __init__(self, seconds):
        self.end = T0 + seconds

    def left(self):
        return self.end - time.perf_counter()

    def allows(self, cost, what):
        if cost < self.left():
            return True
        log(f"SKIP {what}: predicted {cost:.0f}s, {self.left():.0f}s left")
        return False


def save(results, args):
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, args.out)


def fit_memory(points, cap):
    """Least squares peak = a + b * frames over the measured points; predicted largest frame count under cap."""
    pts = [(r["frames"], r["peak_bytes"]) for r in points]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    intercept = my - slope * mx
    if slope <= 0:
        return None
    return {"points": pts, "bytes_per_frame": slope, "intercept_bytes": intercept,
            "predicted_max_frames": int((cap - intercept) / slope)}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    budget = Budget(args.budget_s)
    if args.tiny:
        args.e2e_frames = args.e2e_frames if argv and "--e2e-frames" in argv else "4,16"
        args.llm_frames, args.llm_frames_b = "32", "64"
        args.decode_context, args.max_llm_frames_c = 256, 32
        args.decode_batches = "1,4"
    prof_path = args.profile_out or os.path.join(os.path.dirname(args.out) or ".", "profiles.txt")
    os.makedirs(os.path.dirname(prof_path) or ".", exist_ok=True)
    open(prof_path, "w").close()

    import timeviper.modeling_timeviper as tm

    install_kernel_counters()
    results = {"meta": meta(device, args), "runs": [], "decode": [], "fit": {}, "ab": {}}
    log("meta:", json.dumps(results["meta"]))
    dtype = torch.bfloat16
    cap = results["meta"].get("memory_cap_bytes", 80e9)
    if str(device).startswith("cuda"):
        measure_ceilings(device, results)
    save(results, args)
    torch.set_grad_enabled(False)

    if args.check and (args.tiny or (str(device).startswith("cuda") and tm.mamba_chunk_scan_combined is not None)):
        try:
            kernel_check(device, results, small=args.tiny)
        except Exception:  # noqa: BLE001
            results["kernel_check"] = {"error": traceback.format_exc()[-2000:]}
            log("kernel check failed", results["kernel_check"]["error"])
        save(results, args)

    vision_rate = None
    patch_names = args.patches.split(",")
    ab = set(args.ab.split(",")) - {""}
    for name in args.configs.split(","):
        cfg = make_config(name, args.tiny)
        with torch.inference_mode(), patches(patch_names):
            model, build_s = build_model(cfg, device, dtype, args)
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            results.setdefault("models", {})[name] = {
                "label": CONFIGS[name]["label"], "build_s": build_s, "weight_bytes": weights,
                "params": sum(p.numel() for p in model.parameters()),
                "llm_params": sum(p.numel() for p in model.model.language_model.parameters()),
                "vision_params": sum(p.numel() for p in model.model.vision_tower.parameters()),
                "token_compression": cfg.token_compression}
            log(f"== {name}: {CONFIGS[name]['label']}: built in {build_s:.1f}s, {weights / 2**30:.1f} GiB weights")
            timer = PhaseTimer(model, device)
            # Warm-up: vision + compression path, and an LLM-only pass long enough for the carried-chunk kernels.
            run_point(model, name, 16, "e2e", device, args, timer, {"runs": []})
            warm = (tm.TimeViperTextModel.sequence_chunk_size + 512) // cfg.vision_tokens_per_frame
            run_point(model, name, warm if not args.tiny else 8, "llm_only", device, args, timer, {"runs": []})
            if vision_rate is None:
                vision_rate = vision_microbench(model, device, args, results)
                if "cudnn_vision_attention" in ab and str(device).startswith("cuda"):
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
                    with sdpa_kernel(backends, set_priority=True):
                        vision_microbench(model, device, args, results, label="vision_microbench_cudnn_attention")
                if "legacy_vision_layout" in ab:
                    with patches(["legacy_vision_layout"]):
                        vision_microbench(model, device, args, results, label="vision_microbench_legacy_layout")
                save(results, args)
            for frames in ints(args.e2e_frames):
                cost = frames * (vision_rate["vision_s_per_frame"] + vision_rate["tome_proj_s_per_frame"]) \
                    + llm_cost_estimate(model, frames)
                if budget.allows(cost, f"{name} e2e F={frames}"):
                    run_point(model, name, frames, "e2e", device, args, timer, results, vision_rate)
                    save(results, args)
            if args.graph_check and (args.tiny or str(device).startswith("cuda")):
                graph_check(model, name, device, results, args.tiny)
                save(results, args)
            if args.profile and (args.tiny or str(device).startswith("cuda")) and ints(args.e2e_frames):
                frames = max(ints(args.e2e_frames))
                if budget.allows(llm_cost_estimate(model, frames) * 1.5, f"profile {name}"):
                    install_frame_source(model, "llm_only", device)
                    ids, _ = video_prompt(cfg, frames, device)
                    ph = torch.empty(frames, 1, device=device)
                    profile_region(f"prefill_llm_only_{name}_F{frames}",
                                   lambda model=model: model(input_ids=ids, pixel_values_videos=ph, logits_to_keep=1),
                                   device, results, args)
                    del ids, ph
                    free(device)
                    save(results, args)
            prefill_ab = [v for v in ("conv1d_cuda", "fused_gated_norm", "fused_rmsnorm") if v in ab]
            if prefill_ab and name == "a":
                frames = max(ints(args.e2e_frames))
                variants = [[]] + [[v] for v in prefill_ab] + ([prefill_ab] if len(prefill_ab) > 1 else []) + [[]]
                if budget.allows(len(variants) * llm_cost_estimate(model, frames), "prefill A/B"):
                    recs = []
                    for variant in variants:
                        with patches(patch_names + variant):
                            r = run_point(model, name, frames, "llm_only", device, args, timer, {"runs": []}, vision_rate)
                        recs.append({"patches": variant, "llm_s": r.get("llm_s"), "prefill_s": r.get("prefill_s"),
                                     "decode_s": r.get("decode_s"), "peak_bytes": r.get("peak_bytes")})
                    results["ab"]["prefill"] = {"config": name, "frames": frames, "runs": recs}
                    save(results, args)
            if name in args.decode_configs.split(","):
                for variant in args.decode_variants.split(","):
                    if variant == "static_graph" and not str(device).startswith("cuda"):
                        continue
                    if budget.allows(30, f"decode {name} {variant}"):
                        decode_bench(model, name, device, args, results, patch_names, variant)
                        save(results, args)
                for variant in ("kv_prealloc", "fused_rmsnorm"):
                    if variant in ab and variant not in patch_names and budget.allows(30, f"decode A/B {variant}"):
                        decode_bench(model, name, device, args, results, patch_names + [variant], variant)
                        save(results, args)
            llm_frames = ints(args.llm_frames) + (ints(args.llm_frames_b) if name == "b" else [])
            if name == "c":
                llm_frames = [f for f in llm_frames if f <= args.max_llm_frames_c]
            for frames in llm_frames:
                if budget.allows(llm_cost_estimate(model, frames), f"{name} llm_only F={frames}"):
                    rec = run_point(model, name, frames, "llm_only", device, args, timer, results, vision_rate)
                    save(results, args)
                    if rec.get("oom"):
                        break
            if "lean_scatter" in ab and name == "b" and "lean_scatter" not in patch_names:
                frames = max(ints(args.llm_frames))
                if budget.allows(llm_cost_estimate(model, frames), "lean_scatter A/B"):
                    with patches(["lean_scatter"]):
                        rec = run_point(model, name, frames, "llm_only", device, args, timer, {"runs": []}, vision_rate)
                    base = next((r for r in results["runs"] if r["config"] == name and r["frames"] == frames
                                 and r["mode"] == "llm_only" and not r.get("oom")), None)
                    results["ab"]["lean_scatter"] = {"config": name, "frames": frames, "patched": rec,
                                                     "baseline_peak_bytes": base and base["peak_bytes"]}
                    save(results, args)
            points = [r for r in results["runs"] if r["config"] == name and not r.get("oom") and r["frames"] >= (4 if args.tiny else 4096)]
            fit = fit_memory(points, cap)
            if fit:
                results["fit"][name] = fit
                log(f"{name}: {fit['bytes_per_frame'] / 2**20:.2f} MiB/frame, predicted max {fit['predicted_max_frames']} frames")
                save(results, args)
            timer.remove()
            del model, timer
            free(device)
    # Extras, budget permitting: verify the predicted largest frame counts, then a torch.compile'd vision tower.
    for name in args.extras.split(","):
        if name == "compile" and str(device).startswith("cuda") and budget.allows(150, "compiled vision A/B"):
            with torch.inference_mode():
                model, _ = build_model(make_config("a", args.tiny), device, dtype, args)
                vision_microbench(model, device, args, results, label="vision_microbench_compiled")
                del model
                free(device)
            save(results, args)
        if name not in results["fit"]:
            continue
        fit = results["fit"][name]
        cfg = make_config(name, args.tiny)
        with torch.inference_mode(), patches(patch_names):
            model, _ = build_model(cfg, device, dtype, args)
            frames = 48 if args.tiny else int(fit["predicted_max_frames"] * args.fit_margin) // 256 * 256
            if budget.allows(llm_cost_estimate(model, frames) * 1.2, f"{name} fit verify F={frames}"):
                timer = PhaseTimer(model, device)
                rec = run_point(model, name, frames, "llm_only", device, args, timer, results, vision_rate)
                rec["fit_verification"] = True
                fit["verified_frames"] = frames
                fit["verified_ok"] = not rec.get("oom")
                timer.remove()
                del timer
                save(results, args)
            del model
            free(device)
    results["kernel_calls"] = dict(KERNEL_CALLS)
    results["meta"]["elapsed_s"] = time.perf_counter() - T0
    save(results, args)
    log("kernel calls:", KERNEL_CALLS)
    summary(results)


def summary(results):
    print("\nconfig frames  mode      prefill_s  e2e_s(vision extrap.)  decode16_s  peak_GiB  ratio(prefill/floor)")
    for r in results["runs"]:
        if r.get("oom"):
            print(f"{r['config']:6s} {r['frames']:6d}  {r['mode']:8s}  OOM")
            continue
        print(f"{r['config']:6s} {r['frames']:6d}  {r['mode']:8s}  {r['prefill_s']:9.2f}  {r.get('prefill_e2e_s', float('nan')):9.2f}"
              f"             {r['decode_s']:9.2f}  {r['peak_bytes'] / 2**30:8.1f}  {r['ratio'].get('prefill', float('nan')):.2f}")
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
