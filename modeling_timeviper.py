"""TimeViper: a hybrid Mamba-Transformer video-language model for hour-long videos.

Data flow: frames -> SigLIP (second-to-last block, no post-norm) -> ToMe merging per frame -> MLP projector ->
the embeddings of the placeholder tokens -> the LLM blocks (Nemotron-H: Mamba-2, attention and MLP blocks; or
Qwen2), where compression stages drop vision tokens (and TransV folds the dropped ones into the text after the
vision span) -> final norm -> lm_head. The generation state lives in generation_timeviper.py.
"""

import contextlib
import copy
import hashlib
import inspect
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

# First: the configuration's transformers version guard, before imports an unsupported release may lack.
from .configuration_timeviper import TimeViperCompressionStage, TimeViperConfig, text_layer_types  # isort: skip
from .configuration_timeviper import attention_layers  # isort: skip

from .generation_timeviper import (  # isort: skip
    CACHE_NAME,
    TimeViperGenerationMixin,
    TimeViperHybridCache,
    check_static_step_inputs,
    resolve_cache_argument,
)

from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipVisionModel
from transformers.pipelines import ImageTextToTextPipeline
from transformers.utils import logging

try:  # mamba-ssm's Triton kernels (GPU) for Mamba-2's scan, decode step, RMSNorm, gated RMSNorm and the vision
    # tower's residual add + LayerNorm; the PyTorch paths below compute the same thing anywhere.
    from mamba_ssm.ops.triton.layer_norm import layer_norm_fn as layernorm_kernel
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn as rmsnorm_kernel
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as gated_rmsnorm_kernel
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:
    mamba_chunk_scan_combined = selective_state_update = rmsnorm_kernel = gated_rmsnorm_kernel = None
    layernorm_kernel = None
try:  # the causal depthwise conv of the Mamba-2 mixer in one CUDA kernel, continuing from and returning conv states
    from causal_conv1d import causal_conv1d_fn
except ImportError:
    causal_conv1d_fn = None
try:  # Triton (it comes with CUDA builds of PyTorch): the squared ReLU of Nemotron-H's MLP in one pass
    import triton
    import triton.language as tl
except ImportError:
    triton = None

logger = logging.get_logger(__name__)

# softplus(dt) of a padded position must be 0 so that the SSM state passes it unchanged: exp(0 * A) = 1, 0 * x = 0.
PADDING_DT = -1.0e4
NON_CUDNN_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Causal self-attention of a whole sequence without autograd, on CUDA: cuDNN's fused kernel first (on an H100 at the
# Nano shape, 40 query / 8 KV heads of 128, 1.6-2.1x FlashAttention-2: 606 against 352 TFLOP/s at 65,000 tokens,
# outputs within 0.004), for lengths where that pays and up to the longest it was run on there. cuDNN builds a plan
# for every new length (35-60 ms, once per process and length), which a shorter sequence's gain does not repay.
# Other lengths, masks, chunks after cached tokens and training take the other backends.
CUDNN_FIRST_BACKENDS = [SDPBackend.CUDNN_ATTENTION, *NON_CUDNN_BACKENDS]
CUDNN_ATTENTION_MIN_TOKENS = 32768
CUDNN_ATTENTION_MAX_TOKENS = 524288
CAN_PRIORITIZE_SDPA = "set_priority" in inspect.signature(sdpa_kernel).parameters  # torch >= 2.6


# Outputs


def with_cache_field(cls):
    """`cls` as a ModelOutput dataclass whose `cache` field carries the installed release's name (CACHE_NAME)."""
    if CACHE_NAME != "cache":
        cls.__annotations__ = {(CACHE_NAME if name == "cache" else name): kind for name, kind in cls.__annotations__.items()}
        delattr(cls, "cache")
        setattr(cls, CACHE_NAME, None)
    return dataclass(cls)


@with_cache_field
class TimeViperModelOutputWithPast(ModelOutput):
    """`kept_positions`: (batch, kept_length) input index of each output position after compression, -1 for
    padding. `cache`: the `TimeViperHybridCache` (named `past_key_values` before transformers 5.24)."""

    last_hidden_state: torch.FloatTensor | None = None
    kept_positions: torch.LongTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    video_hidden_states: torch.FloatTensor | None = None
    image_hidden_states: torch.FloatTensor | None = None


@with_cache_field
class TimeViperCausalLMOutputWithPast(ModelOutput):
    """`cache`: the `TimeViperHybridCache` (named `past_key_values` before transformers 5.24)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    kept_positions: torch.LongTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    video_hidden_states: torch.FloatTensor | None = None
    image_hidden_states: torch.FloatTensor | None = None


# Token layout: masks and positions shared by every block of one compression segment


@dataclass
class TokenLayout:
    """What the blocks of one segment need to know about the tokens: validity (for Mamba), how attention is masked,
    and the RoPE positions of the queries."""

    valid: torch.Tensor | None  # (batch, query_len) bool, None when every token is valid
    attention_mask: torch.Tensor | None  # (batch, 1, query_len, key_len) bool
    is_causal: bool
    position_ids: torch.Tensor  # (batch, query_len)
    # Prefill of a padded batch whose rows each hold one run of valid tokens: (start, end) per row. Attention then
    # runs causally per row on its run, with no (L x L) mask.
    row_spans: list[tuple[int, int]] | None = None
    # Chunked prefill: the queries are the sequence's tokens [query_offset, query_offset + query_len), the keys its
    # tokens [0, query_offset + query_len); `row_spans` are then in key coordinates.
    query_offset: int = 0
    # RoPE (cos, sin) of `position_ids` for a Qwen2 backbone, computed once per segment (`with_rope`); None: NoPE.
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_key_validity(cls, key_valid: torch.Tensor, query_len: int) -> "TokenLayout":
        """key_valid: (batch, key_len) validity of every key, the last `query_len` of which are the queries."""
        key_len = key_valid.shape[1]
        position_ids = (key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, -query_len:]
        query_valid = key_valid[:, -query_len:]
        if bool(key_valid.all()):
            # query_len < key_len: new tokens after cached ones, causal among themselves (aligned lower right)
            return cls(None, None, query_len > 1, position_ids)
        if query_len == 1:
            return cls(query_valid, key_valid[:, None, None, :], False, position_ids)
        if query_len == key_len:
            spans = contiguous_spans(key_valid)
            if spans is not None:
                return cls(query_valid, None, True, position_ids, spans)
        query_index = torch.arange(key_len - query_len, key_len, device=key_valid.device)[:, None]
        key_index = torch.arange(key_len, device=key_valid.device)[None, :]
        mask = (key_index <= query_index)[None, None] & key_valid[:, None, None, :]
        # A padding query has no valid key; letting it see itself keeps softmax finite (its output is never used).
        mask = mask | (key_index == query_index)[None, None]
        return cls(query_valid, mask, False, position_ids)

    @classmethod
    def static_step(cls, key_valid: torch.Tensor) -> "TokenLayout":
        """One decode step on a static cache's buffer `key_valid`, whose unwritten slots are invalid: attention over
        the whole buffer, masked, and the RoPE position = number of valid tokens before the new one."""
        return cls(None, key_valid[:, None, None, :], False, key_valid.sum(-1, keepdim=True) - 1)

    def with_rope(self, rotary_emb, hidden_states: torch.Tensor) -> "TokenLayout":
        if rotary_emb is None:
            return self
        return replace(self, position_embeddings=rotary_emb(hidden_states, self.position_ids))


def contiguous_spans(valid: torch.Tensor) -> list[tuple[int, int]] | None:
    """(start, end) of each row's valid tokens if every row holds exactly one run (left or right padding)."""
    index = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    count = valid.sum(-1)
    start = torch.where(valid, index, valid.shape[1]).min(-1).values
    end = torch.where(valid, index, -1).max(-1).values + 1
    if bool(((end - start) != count).any()):
        return None
    return list(zip(start.tolist(), end.tolist()))


# Vision side: ToMe merging and the projector


def tome_schedule(num_tokens: int, target: int) -> list[int]:
    """Tokens removed in each ToMe round to go from `num_tokens` to `target` (at most half per round).
    729 -> 16 gives [364, 182, 91, 46, 23, 7]."""
    removed = []
    while num_tokens > target:
        r = min(num_tokens - target, num_tokens // 2)
        removed.append(r)
        num_tokens -= r
    return removed


def match_tokens(features: torch.Tensor, r: int, metric_heads: int = 16):
    """ToMe's matching on (frames, p, c) features: each even position (set A) is paired with its most similar odd
    position (set B) by the cosine of the features averaged over `metric_heads` channel groups. Returns the A
    indices left unmerged (by descending score) and the `r` best matched, each (frames, n, 1), and their B partners."""
    frames, p, channels = features.shape
    with torch.no_grad():
        metric = features.view(frames, p, metric_heads, channels // metric_heads).mean(dim=2)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
        best_score, best_partner = scores.max(dim=-1)
        order = best_score.argsort(dim=-1, descending=True)[..., None]
        unmerged, merged = order[:, r:], order[:, :r]
        return unmerged, merged, best_partner[..., None].gather(1, merged)


def bipartite_soft_matching(features: torch.Tensor, sizes: torch.Tensor, r: int, metric_heads: int = 16):
    """One ToMe round on (frames, p, c) features: the `r` best-matched A tokens (`match_tokens`) are averaged into
    their B partners, weighted by how many patches each token stands for. Output: the unmerged A tokens by
    descending match score, then all B tokens in order."""
    frames, p, _ = features.shape
    unmerged, merged, partner = match_tokens(features, r, metric_heads)
    # (frames, |B|, r) 0/1 matrix: merged A token j goes to B token partner[j]. Summing through a matmul, not
    # scatter_reduce: on CUDA that adds with atomics in whatever order threads arrive, so the same frames could
    # merge to different roundings from run to run (and the attention-guided top-k then keep other tokens).
    assignment = features.new_zeros(frames, p // 2, r).scatter_(1, partner.transpose(1, 2), 1.0)

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        width = x.shape[-1]
        kept = src.gather(1, unmerged.expand(-1, -1, width))
        moved = src.gather(1, merged.expand(-1, -1, width))
        return torch.cat([kept, dst + assignment @ moved], dim=1)

    weighted = merge(features * sizes)
    sizes = merge(sizes)
    return weighted / sizes, sizes


def merge_tokens(features: torch.Tensor, target: int) -> torch.Tensor:
    """ToMe each frame independently: (frames, patches, c) -> (frames, target, c)."""
    sizes = torch.ones_like(features[..., :1])
    for r in tome_schedule(features.shape[1], target):
        features, sizes = bipartite_soft_matching(features, sizes, r)
    return features


class TimeViperMultiModalProjector(nn.Module):
    def __init__(self, config: TimeViperConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


# LLM building blocks


class TimeViperRMSNorm(nn.Module):
    # Without autograd, longer sequences are normalised this many tokens at a time: the float32 intermediates of
    # the whole sequence would be the largest transient of a long prefill.
    chunk_size = 16384

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.is_cuda and rmsnorm_kernel is not None and hidden_states.dtype == self.weight.dtype:
            # One pass, fp32 inside, the weight applied before the single rounding (the PyTorch path rounds before
            # and after it: at most one bf16 step apart), instead of six elementwise passes over fp32 copies.
            return rmsnorm_kernel(hidden_states, self.weight, None, eps=self.variance_epsilon)
        if hidden_states.dim() > 2 and hidden_states.shape[-2] > self.chunk_size and not torch.is_grad_enabled():
            return run_in_chunks(self._normalize, hidden_states, self.chunk_size, dim=-2)
        return self._normalize(hidden_states)

    def _normalize(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


class TimeViperRMSNormGated(nn.Module):
    """RMSNorm over groups of channels of `y * silu(gate)` (Mamba-2's output norm, norm_before_gate=False)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if hidden_states.is_cuda and gated_rmsnorm_kernel is not None:
            # The same math in one pass (fp32 inside; the weight is applied before the final rounding), instead of
            # ~10 elementwise fp32 passes over (tokens, intermediate size).
            return gated_rmsnorm_kernel(
                hidden_states, self.weight, None, z=gate, eps=self.variance_epsilon, group_size=self.group_size,
                norm_before_gate=False,
            )
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float() * F.silu(gate.float())
        grouped = hidden_states.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * grouped.flatten(-2).to(dtype)


def ssd_scan(x, dt, A, B, C, D, chunk_size, initial_state=None):
    """Mamba-2 SSD in PyTorch, chunk by chunk so memory stays O(chunk^2) per head whatever the length: in float32,
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T and y_t = h_t C_t + D x_t. x: (b, l, h, p); dt: (b, l, h) after
    softplus and clamping; A, D: (h,); B, C: (b, l, g, n). Returns y (b, l, h, p) and the final state (b, h, p, n)."""
    batch, length, heads, head_dim = x.shape
    heads_per_group = heads // B.shape[2]
    x, dt, A = x.float(), dt.float(), A.float()
    B = B.float().repeat_interleave(heads_per_group, dim=2)
    C = C.float().repeat_interleave(heads_per_group, dim=2)
    if initial_state is None:
        initial_state = x.new_zeros(batch, heads, head_dim, B.shape[-1])
    state = initial_state.float()
    outputs = []
    for start in range(0, length, chunk_size):
        xc, dtc = x[:, start : start + chunk_size], dt[:, start : start + chunk_size]
        Bc, Cc = B[:, start : start + chunk_size], C[:, start : start + chunk_size]
        log_decay = torch.cumsum(dtc * A, dim=1)  # (b, q, h): log of the decay from the chunk start
        q = xc.shape[1]
        causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
        pair_decay = (log_decay[:, :, None, :] - log_decay[:, None, :, :]).masked_fill(~causal[None, :, :, None], -math.inf)
        weights = torch.einsum("bihn,bjhn->bijh", Cc, Bc) * pair_decay.exp()
        y = torch.einsum("bijh,bjhp->bihp", weights, xc * dtc[..., None])
        y = y + torch.einsum("bihn,bhpn->bihp", Cc, state) * log_decay.exp()[..., None]
        decay_to_end = (log_decay[:, -1:] - log_decay).exp() * dtc  # (b, q, h)
        state = state * log_decay[:, -1].exp()[..., None, None] + torch.einsum(
            "bjh,bjhp,bjhn->bhpn", decay_to_end, xc, Bc
        )
        outputs.append(y + xc * D.float()[:, None])
    return torch.cat(outputs, dim=1), state


class TimeViperMamba2Mixer(nn.Module):
    """Mamba-2 mixer with the Nemotron-H parameter names. `forward` is functional in the recurrent state: it takes
    `(conv_state, ssm_state)` (or None) and returns the new one, so callers can split a sequence into chunks."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.n_groups = config.n_groups
        self.ssm_state_size = config.ssm_state_size
        self.chunk_size = config.chunk_size
        self.time_step_limit = tuple(config.time_step_limit)
        self.intermediate_size = self.num_heads * self.head_dim
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.ssm_state_size
        self.kernel_size = config.conv_kernel

        self.in_proj = nn.Linear(
            config.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=config.use_bias
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.kernel_size, groups=self.conv_dim, bias=config.use_conv_bias
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        # In the default (loading) dtype like every other parameter, as in NemotronH: a float32 A_log would stay float32
        # under from_pretrained(dtype=bfloat16) while .to(), FSDP mixed precision and DeepSpeed bf16 cast it, so a
        # reloaded checkpoint would compute differently from the model that was trained and saved.
        log_a = torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32))
        self.A_log = nn.Parameter(log_a.to(torch.get_default_dtype()))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = TimeViperRMSNormGated(
            self.intermediate_size, self.intermediate_size // self.n_groups, config.layer_norm_epsilon
        )
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.use_bias)

    def convolve(self, xbc: torch.Tensor, conv_state: torch.Tensor | None):
        """Causal depthwise conv over (b, l, conv_dim), continuing from `conv_state` (b, conv_dim, kernel-1)."""
        if xbc.is_cuda and causal_conv1d_fn is not None and xbc.shape[1] > 1:
            return self._kernel_convolve(xbc, conv_state)
        xbc = xbc.transpose(1, 2)
        if conv_state is None:
            conv_state = xbc.new_zeros(xbc.shape[0], self.conv_dim, self.kernel_size - 1)
        padded = torch.cat([conv_state.to(xbc.dtype), xbc], dim=-1)
        if padded.is_cuda:  # one depthwise-conv kernel; the written-out sum below is ~9 elementwise passes on GPU
            out = F.conv1d(padded, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
            return F.silu(out).transpose(1, 2), padded[..., -(self.kernel_size - 1) :]
        # A depthwise conv with a kernel of 4 is 4 multiply-adds per channel; written out, it avoids PyTorch's slow
        # CPU depthwise conv1d (about 20 ms per decode step even for tiny models).
        length, weight = xbc.shape[-1], self.conv1d.weight[:, 0]
        out = sum(padded[..., k : k + length] * weight[:, k, None] for k in range(self.kernel_size))
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias[:, None]
        return F.silu(out).transpose(1, 2), padded[..., -(self.kernel_size - 1) :]

    def _kernel_convolve(self, xbc: torch.Tensor, conv_state: torch.Tensor | None):
        """`convolve` through causal-conv1d. The kernel takes and returns conv states only in its channel-last layout,
        (b, conv_dim, l) with the channels adjacent in memory: exactly the (b, l, conv_dim) activations transposed."""
        x = xbc.transpose(1, 2) if xbc.stride(-1) == 1 else xbc.contiguous().transpose(1, 2)
        if conv_state is not None:
            conv_state = conv_state.to(x.dtype).transpose(1, 2).contiguous().transpose(1, 2)
        out, conv_state = causal_conv1d_fn(
            x, self.conv1d.weight[:, 0], self.conv1d.bias, initial_states=conv_state, return_final_states=True,
            activation="silu",
        )
        return out.transpose(1, 2), conv_state

    def scan(self, x, dt, B, C, ssm_state):
        A = -torch.exp(self.A_log.float())
        batch, length = x.shape[:2]
        x = x.view(batch, length, self.num_heads, self.head_dim)
        B = B.view(batch, length, self.n_groups, self.ssm_state_size)
        C = C.view(batch, length, self.n_groups, self.ssm_state_size)
        if x.is_cuda and mamba_chunk_scan_combined is not None:
            if length == 1 and ssm_state is not None:
                return self._kernel_step(x, dt, A, B, C, ssm_state)
            y, state = mamba_chunk_scan_combined(
                x, dt, A, B, C, self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
                initial_states=ssm_state, dt_limit=self.time_step_limit, return_final_states=True,
            )
            return y, state.float()
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)
        return ssd_scan(x, dt, A, B, C, self.D, self.chunk_size, ssm_state)

    def _kernel_step(self, x, dt, A, B, C, ssm_state):
        """One decode token through mamba-ssm's fused state update (updates `ssm_state` in place)."""
        heads, head_dim, state_size = self.num_heads, self.head_dim, self.ssm_state_size
        y = selective_state_update(
            ssm_state, x[:, 0], dt[:, 0, :, None].expand(-1, -1, head_dim),
            A[:, None, None].expand(heads, head_dim, state_size), B[:, 0], C[:, 0],
            D=self.D[:, None].expand(-1, head_dim), dt_bias=self.dt_bias[:, None].expand(-1, head_dim),
            dt_softplus=True,
        )
        return y[:, None], ssm_state

    def forward(self, hidden_states: torch.Tensor, valid: torch.Tensor | None = None, state=None):
        conv_state, ssm_state = state if state is not None else (None, None)
        gate, xbc, dt = self.in_proj(hidden_states).split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1
        )
        if valid is not None:
            # Padding must not reach the recurrence: zero its conv inputs/outputs and give it dt = 0.
            xbc = xbc * valid[..., None]
            dt = dt.masked_fill(~valid[..., None], PADDING_DT)
        xbc, conv_state = self.convolve(xbc, conv_state)
        if valid is not None:
            xbc = xbc * valid[..., None]
        group_width = self.n_groups * self.ssm_state_size
        x, B, C = xbc.split([self.intermediate_size, group_width, group_width], dim=-1)
        y, ssm_state = self.scan(x, dt, B, C, ssm_state)
        y = self.norm(y.reshape(*hidden_states.shape[:2], -1).to(hidden_states.dtype), gate)
        return self.out_proj(y), (conv_state, ssm_state)


class TimeViperAttentionProjections(nn.Module):
    """The q/k/v/o projections of a GQA attention. Nemotron-H: no biases. Qwen2: q/k/v biases."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        o_bias = config.model_type != "qwen2" and getattr(config, "attention_bias", False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=o_bias)

    def _heads(self, states: torch.Tensor, num_heads: int) -> torch.Tensor:
        return states.view(*states.shape[:2], num_heads, self.head_dim).transpose(1, 2)

    def _output(self, attended: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attended.transpose(1, 2).flatten(2))


class TimeViperAttention(TimeViperAttentionProjections):
    """Causal GQA self-attention. Nemotron-H: no positions (NoPE). Qwen2: RoPE (`layout.position_embeddings`)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config)
        self.layer_idx = layer_idx

    def forward(self, hidden_states, layout: TokenLayout, cache=None):
        query = self._heads(self.q_proj(hidden_states), self.num_heads)
        key = self._heads(self.k_proj(hidden_states), self.num_kv_heads)
        value = self._heads(self.v_proj(hidden_states), self.num_kv_heads)
        if layout.position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *layout.position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if layout.row_spans is not None:
            out = attend_per_row(
                attention_function(self.config), query, key, value, layout.row_spans, self.scaling, layout.query_offset
            )
        else:
            out = attend(self.config, query, key, value, layout.attention_mask, layout.is_causal, self.scaling)
        return self._output(out)

    # Keys are projected this many tokens at a time: all of them at once, in float32 and repeated for every query
    # head of their group, would dwarf the logits (heads x L float32) on an hour-long video.
    score_chunk_size = 65536

    @torch.no_grad()
    def last_query_scores(self, hidden_states: torch.Tensor, query_index: int, key_valid: torch.Tensor):
        """Softmax attention of the single query at `query_index` over keys [0, query_index], averaged over heads,
        from this block's q/k projections applied to the raw residual stream (no norm, no positions). O(L)."""
        groups = self.num_heads // self.num_kv_heads
        query = self.q_proj(hidden_states[query_index]).view(self.num_kv_heads, groups, self.head_dim).float()
        logits = []
        for start in range(0, query_index + 1, self.score_chunk_size):
            end = min(start + self.score_chunk_size, query_index + 1)
            keys = self.k_proj(hidden_states[start:end]).view(-1, self.num_kv_heads, self.head_dim)
            logits.append(torch.einsum("kgd,lkd->kgl", query, keys.float()))
        logits = torch.cat(logits, dim=-1).flatten(0, 1) * self.scaling
        logits = logits.masked_fill(~key_valid[: query_index + 1], -math.inf)
        return logits.softmax(dim=-1).mean(dim=0)


def sdpa_attention(query, key, value, mask, is_causal, scale):
    """query (b, heads, q, d); key/value (b, kv_heads, k, d); mask (b, 1, q, k) bool or None. Causal attention with
    fewer queries than keys aligns the queries with the last keys (a chunk after the cached tokens)."""
    if is_causal and query.shape[2] != key.shape[2]:
        mask, is_causal = causal_lower_right(query.shape[2], key.shape[2]), False
    backends = sdpa_backend_order(query, key, mask, is_causal)
    if backends is None:
        choice = contextlib.nullcontext()
    elif backends is CUDNN_FIRST_BACKENDS:
        choice = sdpa_kernel(backends, set_priority=True)
    else:
        choice = sdpa_kernel(backends)
    with choice:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
        )


def sdpa_backend_order(query, key, mask, is_causal) -> list[SDPBackend] | None:
    """The SDPA backends to try, in order (see CUDNN_FIRST_BACKENDS); None on CPU: PyTorch's own choice."""
    if not query.is_cuda:
        return None
    if (CAN_PRIORITIZE_SDPA and is_causal and mask is None and not torch.is_grad_enabled()
            and CUDNN_ATTENTION_MIN_TOKENS <= key.shape[2] <= CUDNN_ATTENTION_MAX_TOKENS):
        return CUDNN_FIRST_BACKENDS
    return NON_CUDNN_BACKENDS


def eager_attention(query, key, value, mask, is_causal, scale):
    """The same contract as `sdpa_attention`, written out (float32 softmax)."""
    repeats = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    scores = (query @ key.transpose(-1, -2)).float() * scale
    if is_causal:
        query_len, key_len = scores.shape[-2:]
        causal = torch.ones(query_len, key_len, dtype=torch.bool, device=scores.device).tril(key_len - query_len)
        scores = scores.masked_fill(~causal, -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return scores.softmax(dim=-1).to(value.dtype) @ value


ATTENTION_FUNCTIONS = {"sdpa": sdpa_attention, "eager": eager_attention}


def grouped_decode_attention(query, key, value, mask, scale):
    """One query per row against a masked KV cache: query (b, heads, 1, d), key/value (b, kv_heads, k, d), mask
    (b, 1, 1, k) bool. The query heads of a group share one matmul over their K/V, which are read once. (SDPA's
    fused kernels do not take a mask together with grouped heads; its fallback copies K/V once per query head.)"""
    batch, heads, _, head_dim = query.shape
    grouped = (query * scale).view(batch, key.shape[1], heads // key.shape[1], head_dim)
    # The scores (b, heads, k) are the only large intermediate: each step on them is one in-place pass in the
    # inputs' dtype (softmax accumulates in float32 for half-precision inputs), as in SDPA's math backend.
    scores = (grouped @ key.transpose(-1, -2)).masked_fill_(~mask.view(batch, 1, 1, -1), -math.inf)
    return (scores.softmax(dim=-1) @ value).view(batch, heads, 1, head_dim)


def attention_function(config):
    """The attention implementation the config asks for (`attn_implementation=` of from_pretrained)."""
    implementation = config._attn_implementation or "sdpa"
    if implementation not in ATTENTION_FUNCTIONS:
        raise ValueError(f"TimeViper supports attn_implementation in {sorted(ATTENTION_FUNCTIONS)}, got {implementation!r}")
    return ATTENTION_FUNCTIONS[implementation]


def attend(config, query, key, value, mask, is_causal, scale):
    """The configured attention; a single query per row against a mask (a decode step) takes
    `grouped_decode_attention`, which no implementation's fused kernel covers."""
    if query.shape[2] == 1 and mask is not None:
        return grouped_decode_attention(query, key, value, mask, scale)
    return attention_function(config)(query, key, value, mask, is_causal, scale)


def attend_per_row(attention, query, key, value, row_spans, scale, query_offset=0):
    """Causal attention of each row over its own run of valid tokens (`row_spans`, in key coordinates); padding
    gets zeros. Memory stays O(L), where a padded batch's dense mask would be O(L^2). The queries are the keys
    [query_offset, query_offset + q) (a chunk of a chunked prefill)."""
    length = query.shape[2]
    rows = []
    for b, (start, end) in enumerate(row_spans):
        first, stop = max(start, query_offset), min(end, query_offset + length)
        if first >= stop:  # no valid query of this row in the chunk
            rows.append(query.new_zeros(1, query.shape[1], length, value.shape[-1]))
            continue
        queries = query[b : b + 1, :, first - query_offset : stop - query_offset]
        keys, values = key[b : b + 1, :, start:stop], value[b : b + 1, :, start:stop]
        out = attention(queries, keys, values, None, stop - first > 1, scale)
        rows.append(F.pad(out, (0, 0, first - query_offset, query_offset + length - stop)))
    return torch.cat(rows)


class TimeViperTransV(TimeViperAttentionProjections):
    """TransV cross-attention: text tokens (queries) attend to the dropped vision tokens (memory), with no causal
    mask and no positions; the output is added gated by `tanh(alpha)`, so at alpha = 0 this is plain dropping. The
    gate lives here so that the module is the whole trainable unit (PEFT's `modules_to_save`, per-module rates)."""

    def __init__(self, config):
        super().__init__(config)
        self.alpha = nn.Parameter(torch.zeros(1))

    def gate(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha).to(like.dtype)

    def memory(self, dropped: torch.Tensor):
        """dropped: (m, d) vision tokens -> key, value (kv_heads, m, head_dim)."""
        key = self._heads(self.k_proj(dropped)[None], self.num_kv_heads)[0]
        value = self._heads(self.v_proj(dropped)[None], self.num_kv_heads)[0]
        return key, value

    def forward(self, text: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None):
        """text: (b, t, d); key/value: (b, kv_heads, m, head_dim); mask: (b, 1, 1, m) bool. Returns (b, t, d)."""
        query = self._heads(self.q_proj(text), self.num_heads)
        return self._output(attend(self.config, query, key, value, mask, False, self.scaling))


if triton is not None:

    @triton.jit
    def _squared_relu_kernel(x_ptr, numel, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offsets < numel
        x = tl.maximum(tl.load(x_ptr + offsets, mask=in_range).to(tl.float32), 0.0)
        tl.store(x_ptr + offsets, (x * x).to(x_ptr.dtype.element_ty), mask=in_range)


def squared_relu_(x: torch.Tensor) -> torch.Tensor:
    """relu(x) ** 2 in place, in one pass over a contiguous `x` (PyTorch takes two: a clamp and a square, over the
    MLP's widest tensor). The square is taken in float32 and rounded once, as PyTorch's is: the same values."""
    block = 4096
    _squared_relu_kernel[(triton.cdiv(x.numel(), block),)](x, x.numel(), BLOCK=block)
    return x


squared_relu_kernel = squared_relu_ if triton is not None else None


class TimeViperMLP(nn.Module):
    """Nemotron-H: down(act(up(x))) with squared ReLU. Qwen2: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gated = config.model_type == "qwen2"
        bias = getattr(config, "mlp_bias", False)
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act if self.gated else config.mlp_hidden_act]
        self.squared_relu = not self.gated and config.mlp_hidden_act == "relu2"

    def forward(self, hidden_states):
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
        up = self.up_proj(hidden_states)
        if self.squared_relu and up.is_cuda and squared_relu_kernel is not None and not torch.is_grad_enabled() \
                and not self.up_proj._forward_hooks:
            # In place on up_proj's fresh output, which nothing else reads: no backward without autograd, and no
            # forward hook that may have kept it.
            return self.down_proj(squared_relu_kernel(up))
        return self.down_proj(self.act_fn(up))


def run_in_chunks(fn, hidden_states: torch.Tensor, chunk_size: int, dim: int = 1,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """Apply a per-token function along the sequence in chunks (bounds the activation memory of wide MLPs); with
    `residual`, return residual + fn(hidden_states), each chunk's sum written straight into the result."""
    if hidden_states.shape[dim] <= chunk_size:
        out = fn(hidden_states)
        return out if residual is None else residual + out
    outputs = ChunkedOutput(hidden_states.shape[dim], dim, residual)
    for part in hidden_states.split(chunk_size, dim=dim):
        outputs.add(fn(part))
    return outputs.result()


class ChunkedOutput:
    """Concatenates per-chunk outputs along `dim`, `length` in all (None: not known ahead), added to `residual` if
    given. Without autograd and with a known length each chunk is written into one preallocated tensor as it comes,
    instead of keeping every chunk and then a torch.cat copy of them all (one full-sequence activation less at the
    peak of a long prefill); the residual's add is that write (no pass over the whole result afterwards)."""

    def __init__(self, length: int | None, dim: int = 1, residual: torch.Tensor | None = None):
        self.length, self.dim, self.residual, self.parts, self.out, self.filled = length, dim, residual, [], None, 0

    def add(self, part: torch.Tensor) -> None:
        if self.out is None and not self.parts and part.shape[self.dim] == self.length:
            # the whole sequence came as one chunk: nothing to copy
            self.out = part if self.residual is None else self.residual + part
            return
        if torch.is_grad_enabled() or self.length is None:
            self.parts.append(part)
            return
        if self.out is None:
            self.out = self._allocate(part)
        target = self.out.narrow(self.dim, self.filled, part.shape[self.dim])
        if self.residual is None:
            target.copy_(part)
        else:
            torch.add(self.residual.narrow(self.dim, self.filled, part.shape[self.dim]), part, out=target)
        self.filled += part.shape[self.dim]

    def _allocate(self, part: torch.Tensor) -> torch.Tensor:
        if self.residual is not None:
            return self.residual.new_empty(self.residual.shape, dtype=torch.promote_types(self.residual.dtype,
                                                                                            part.dtype))
        shape = list(part.shape)
        shape[self.dim] = self.length
        return part.new_empty(shape)

    def result(self) -> torch.Tensor:
        if self.out is not None:
            return self.out
        out = torch.cat(self.parts, dim=self.dim)
        return out if self.residual is None else self.residual + out


class TimeViperHybridBlock(GradientCheckpointingLayer):
    """Nemotron-H block: x + mixer(RMSNorm(x)), with one mixer: Mamba-2, attention or MLP."""

    def __init__(self, config, layer_idx: int, sequence_chunk_size: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.block_type = config.layer_types[layer_idx]
        self.sequence_chunk_size = sequence_chunk_size
        self.norm = TimeViperRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        if self.block_type == "linear_attention":
            self.mixer = TimeViperMamba2Mixer(config, layer_idx)
        elif self.block_type == "full_attention":
            self.mixer = TimeViperAttention(config, layer_idx)
        elif self.block_type == "mlp":
            self.mixer = TimeViperMLP(config)
        else:
            raise ValueError(f"TimeViper supports Mamba, attention and MLP blocks, not {self.block_type!r}")

    @property
    def attention(self) -> TimeViperAttention | None:
        return self.mixer if self.block_type == "full_attention" else None

    def forward(self, hidden_states, layout: TokenLayout | None = None, past_key_values=None, score_query=None):
        """`score_query=(query_index, key_valid)`: instead of running the block, return its attention-guided
        selection scores for `hidden_states` (one row, see `TokenCompressor.score`). Going through the block's own
        call lets wrappers that shard parameters per block (FSDP) gather them first."""
        if score_query is not None:
            return self.attention.last_query_scores(hidden_states, *score_query)
        residual = hidden_states
        hidden_states = self.norm(hidden_states.to(self.norm.weight.dtype))
        if self.block_type == "linear_attention":
            return self._mamba(hidden_states, layout.valid, past_key_values, residual)
        if self.block_type == "full_attention":
            return residual + self.mixer(hidden_states, layout, past_key_values)
        return run_in_chunks(self.mixer, hidden_states, self.sequence_chunk_size, residual=residual)

    def _mamba(self, hidden_states, valid, cache, residual):
        """residual + the mixer run over sequence chunks, the recurrent state carried exactly from one chunk to the
        next."""
        state = cache.mamba_state(self.layer_idx) if cache is not None else None
        outputs = ChunkedOutput(hidden_states.shape[1], residual=residual)
        for start in range(0, hidden_states.shape[1], self.sequence_chunk_size):
            part = slice(start, start + self.sequence_chunk_size)
            out, state = self.mixer(hidden_states[:, part], None if valid is None else valid[:, part], state)
            outputs.add(out)
        if cache is not None:
            cache.set_mamba_state(self.layer_idx, state)
        return outputs.result()


class TimeViperQwen2Layer(GradientCheckpointingLayer):
    """Qwen2 decoder layer: attention and SwiGLU MLP, each pre-normed with a residual."""

    block_type = "full_attention"

    def __init__(self, config, layer_idx: int, sequence_chunk_size: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.sequence_chunk_size = sequence_chunk_size
        self.input_layernorm = TimeViperRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = TimeViperAttention(config, layer_idx)
        self.post_attention_layernorm = TimeViperRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = TimeViperMLP(config)

    @property
    def attention(self) -> TimeViperAttention:
        return self.self_attn

    def forward(self, hidden_states, layout: TokenLayout | None = None, past_key_values=None, score_query=None):
        """`score_query`: see `TimeViperHybridBlock.forward`."""
        if score_query is not None:
            return self.attention.last_query_scores(hidden_states, *score_query)
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), layout, past_key_values)
        return run_in_chunks(lambda h: self.mlp(self.post_attention_layernorm(h)), hidden_states,
                             self.sequence_chunk_size, residual=hidden_states)


# Token compression (dropping + TransV)


def select_uniform(num_tokens: int, num_keep: int, device=None) -> torch.Tensor:
    """Evenly spaced keep indices, exactly the reference's integer linspace (global over all frames)."""
    return torch.linspace(0, num_tokens - 1, num_keep, dtype=torch.long, device=device)


@dataclass
class SequenceState:
    """The token sequence as it flows through the compression stages of one forward pass."""

    hidden_states: torch.Tensor | None  # (b, l, d); None for the layout alone (chunked prefill)
    valid: torch.Tensor  # (b, l) bool
    vision: torch.Tensor  # (b, l) bool: holds a vision embedding
    positions: torch.Tensor  # (b, l) index in the input sequence, -1 for padding
    num_vision: torch.Tensor  # (b,) vision tokens in the input (ratios are relative to this)
    query_positions: torch.Tensor  # (b,) input index of the token that queries attention-guided selection


def input_state(hidden_states, valid, vision_mask, query_positions) -> SequenceState:
    """The input sequence before any stage: positions, vision tokens and the attention-guided query of each row."""
    batch, length = valid.shape
    positions = torch.arange(length, device=valid.device).expand(batch, -1).masked_fill(~valid, -1)
    vision = vision_mask & valid if vision_mask is not None else torch.zeros_like(valid)
    if query_positions is None:
        query_positions = positions.max(dim=-1).values
    return SequenceState(hidden_states, valid, vision, positions, vision.sum(-1), query_positions.to(valid.device))


def kept_layout(state: SequenceState, keeps: list[torch.Tensor], hidden_states) -> SequenceState:
    """The sequence after a stage: each row's kept token indices `keeps`, left-padded to the longest row."""
    new_length = max(len(keep) for keep in keeps)

    def gather(tensor, value):
        return torch.stack([left_pad(tensor[b, keep], new_length, value) for b, keep in enumerate(keeps)])

    return replace(state, hidden_states=hidden_states, valid=gather(state.valid, False),
                   vision=gather(state.vision, False), positions=gather(state.positions, -1))


def last_vision_index(state: SequenceState, b: int) -> int:
    """Row b's last vision token: the tokens after it are the text that TransV enriches."""
    return int(state.vision[b].nonzero().max())


def left_pad(tensor: torch.Tensor, length: int, value) -> torch.Tensor:
    """Pad dim 0 of `tensor` on the left up to `length`."""
    pad = length - tensor.shape[0]
    return F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (pad, 0), value=value)


class TokenCompressor:
    """One compression stage: which vision tokens each row keeps (`select`), what the text after the vision span
    absorbs of the dropped ones (`transfer`, TransV) and the kept sequence (`compress`). It holds no weights but
    reads the text model's blocks and TransV modules when called, so that wrappers replacing them (FSDP) count."""

    def __init__(self, text_model: "TimeViperTextModel", stage_index: int):
        self.text_model, self.stage_index = text_model, stage_index
        self.stage = text_model.stages[stage_index]

    def select(self, state: SequenceState, b: int):
        """Row b's kept token indices and its dropped-token mask (None when the stage keeps every vision token).
        Uniform selection reads only the token layout; attention-guided selection reads the hidden states."""
        valid, vision = state.valid[b], state.vision[b]
        vision_index = vision.nonzero().squeeze(1)
        num_present = vision_index.numel()
        num_keep = min(num_present, int(int(state.num_vision[b]) * self.stage.keep_ratio))
        if num_keep == num_present:
            return valid.nonzero().squeeze(1), None
        if self.stage.method == "uniform":
            selected = select_uniform(num_present, num_keep, vision.device)
        else:
            # the highest-scoring tokens, in their original order
            selected = self.score(state, b)[vision_index].topk(num_keep).indices.sort().values
        dropped_mask = vision.clone()
        dropped_mask[vision_index[selected]] = False
        return (valid & ~dropped_mask).nonzero().squeeze(1), dropped_mask

    def score(self, state: SequenceState, b: int) -> torch.Tensor:
        """Row b's attention-guided scores: the stage block's attention of the query token over the tokens before
        it, through the block's own call (see `TimeViperHybridBlock.forward`)."""
        query_index = int((state.positions[b] == state.query_positions[b]).nonzero().max())
        block = self.text_model.layers[self.stage.layer_idx]
        return block(state.hidden_states[b], score_query=(query_index, state.valid[b]))

    @property
    def transv(self) -> TimeViperTransV:
        return self.text_model.merge_modules[str(self.stage_index)]

    def memory(self, hidden: torch.Tensor, index: torch.Tensor):
        """TransV keys/values of the tokens hidden[index], `sequence_chunk_size` at a time: never one gathered copy
        of all dropped tokens, which can be most of an hour-long video."""
        parts = index.split(self.text_model.sequence_chunk_size)
        if len(parts) == 1:
            return self.transv.memory(hidden[index])
        # Written part by part into the result: a list of parts and their concatenation would hold the memory twice.
        key = hidden.new_empty(self.transv.num_kv_heads, index.numel(), self.transv.head_dim)
        value = torch.empty_like(key)
        start = 0
        for part in parts:
            key[:, start : start + part.numel()], value[:, start : start + part.numel()] = self.transv.memory(hidden[part])
            start += part.numel()
        return key, value

    def transfer(self, text: torch.Tensor, key, value, mask=None) -> torch.Tensor:
        """text (b, t, d) after absorbing the dropped tokens' memory through the gated TransV."""
        return text + self.transv.gate(text) * self.transv(text, key, value, mask)

    def transfer_to_new_tokens(self, hidden_states: torch.Tensor, cache) -> torch.Tensor:
        """Tokens after the cached ones also lie after the vision span: they absorb the cached dropped tokens
        exactly as they would in a full recomputation."""
        if self.stage_index not in cache.transfer_memory:
            return hidden_states
        return self.transfer(hidden_states, *cache.transfer_memory[self.stage_index])

    def compress(self, state: SequenceState, cache: TimeViperHybridCache | None) -> SequenceState:
        """Drop vision tokens per sample (transferring them with TransV), then re-pad the rows on the left."""
        rows = [self._compress_row(state, b) for b in range(state.valid.shape[0])]
        keeps = [keep for _, keep, _ in rows]
        new_length = max(len(keep) for keep in keeps)
        hidden = torch.stack([left_pad(row, new_length, 0.0) for row, _, _ in rows])
        if cache is not None:
            cache.store_transfer_memory(self.stage_index, [memory for _, _, memory in rows])
        return kept_layout(state, keeps, hidden)

    def _compress_row(self, state: SequenceState, b: int):
        """Returns the kept hidden states of row b (TransV applied), their indices, and the TransV memory."""
        hidden = state.hidden_states[b]
        keep, dropped_mask = self.select(state, b)
        row = hidden[keep]
        if dropped_mask is None or not self.stage.transfer:
            return row, keep, None
        memory = self.memory(hidden, dropped_mask.nonzero().squeeze(1))
        # Every token after the vision span absorbs the dropped tokens (in training that includes the answer).
        num_text = int((keep > last_vision_index(state, b)).sum())
        if num_text > 0:
            text = self.transfer(row[None, -num_text:], memory[0][None], memory[1][None])[0]
            row = torch.cat([row[:-num_text], text])
        return row, keep, memory


class TimeViperTextModel(nn.Module):
    """The LLM body. Parameter names follow the native checkpoints (Nemotron-H: `embeddings`, `layers.i.norm/mixer`,
    `norm_f`; Qwen2: `embed_tokens`, `layers.i.*`, `norm`), plus `merge_modules.{stage}` for TransV."""

    # Mamba / MLP work is split along the sequence beyond this many tokens (bounds activation memory).
    sequence_chunk_size = 16384

    def __init__(self, config: TimeViperConfig):
        super().__init__()
        text_config = config.text_config
        self.is_qwen = text_config.model_type == "qwen2"
        self.layer_types = text_layer_types(text_config)
        self.stages = config.compression_stages
        self.stage_at_layer = {stage.layer_idx: index for index, stage in enumerate(self.stages)}
        self.compressors = [TokenCompressor(self, index) for index in range(len(self.stages))]
        embeddings = nn.Embedding(text_config.vocab_size, text_config.hidden_size, text_config.pad_token_id)
        if self.is_qwen:
            self.embed_tokens = embeddings
            self.layers = nn.ModuleList(
                TimeViperQwen2Layer(text_config, i, self.sequence_chunk_size) for i in range(len(self.layer_types))
            )
            self.norm = TimeViperRMSNorm(text_config.hidden_size, text_config.rms_norm_eps)
            self.rotary_emb = Qwen2RotaryEmbedding(text_config)
        else:
            self.embeddings = embeddings
            self.layers = nn.ModuleList(
                TimeViperHybridBlock(text_config, i, self.sequence_chunk_size) for i in range(len(self.layer_types))
            )
            self.norm_f = TimeViperRMSNorm(text_config.hidden_size, text_config.layer_norm_epsilon)
            self.rotary_emb = None
        transfer_stages = [index for index, stage in enumerate(self.stages) if stage.transfer]
        self.transfer_slot = {stage_index: slot for slot, stage_index in enumerate(transfer_stages)}
        if transfer_stages:
            self.merge_modules = nn.ModuleDict({str(i): TimeViperTransV(text_config) for i in transfer_stages})

    @property
    def embed(self) -> nn.Embedding:
        return self.embed_tokens if self.is_qwen else self.embeddings

    @property
    def final_norm(self) -> TimeViperRMSNorm:
        return self.norm if self.is_qwen else self.norm_f

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                vision_mask: torch.Tensor | None = None, past_key_values: TimeViperHybridCache | None = None,
                compression_query_positions: torch.Tensor | None = None, output_hidden_states: bool = False):
        """Returns the final-normed hidden states, the input index of every kept position (None for tokens after
        cached ones) and, with `output_hidden_states`, every block's input and the final output."""
        cache = past_key_values
        decoding = cache is not None and cache.is_prefilled
        valid = input_validity(inputs_embeds, attention_mask, decoding)
        if decoding and cache.resume is not None:
            if output_hidden_states:
                raise ValueError("output_hidden_states is not available for a question asked of a video state")
            return resume_after_video(self, inputs_embeds, valid, cache, compression_query_positions), None, None
        all_hidden_states = [] if output_hidden_states else None
        if decoding:
            if len(cache) != len(self.stages) + 1:
                raise ValueError("the cache was filled by a model with a different compression schedule")
            hidden_states = self.continue_layers(inputs_embeds, valid, cache, len(self.layers), all_hidden_states)
            kept_positions = None
        else:
            state = input_state(inputs_embeds, valid, vision_mask, compression_query_positions)
            hidden_states, kept_positions = self.prefill(state, cache, all_hidden_states)
        hidden_states = self.final_norm(hidden_states)
        return hidden_states, kept_positions, None if all_hidden_states is None else (*all_hidden_states, hidden_states)

    def prefill(self, state: SequenceState, cache: TimeViperHybridCache | None, all_hidden_states: list | None):
        """Every block on the whole prompt, compressing at each stage. Returns the last block's output and the
        input index of every kept position."""
        if cache is not None:
            cache.add_prompt_tokens(state.valid.shape[1])
        layout = self.segment_layout(state, cache)
        for layer in self.layers:
            if layer.layer_idx in self.stage_at_layer:
                state = self.compressors[self.stage_at_layer[layer.layer_idx]].compress(state, cache)
                layout = self.segment_layout(state, cache)
            if all_hidden_states is not None:
                all_hidden_states.append(state.hidden_states)
            state.hidden_states = layer(state.hidden_states, layout, past_key_values=cache)
        return state.hidden_states, state.positions

    def segment_layout(self, state: SequenceState, cache: TimeViperHybridCache | None) -> TokenLayout:
        """The token layout of the compression segment that starts with `state`, opened in the cache."""
        if cache is not None:
            cache.open_segment(state.valid)
        layout = TokenLayout.from_key_validity(state.valid, state.valid.shape[1])
        return layout.with_rope(self.rotary_emb, state.hidden_states)

    def continue_layers(self, hidden_states, valid, cache: TimeViperHybridCache, stop: int, all_hidden_states=None):
        """Blocks [0, stop) on new tokens after the cached ones (a decode step, or the question after a video
        state; several new tokens are causal among themselves): Mamba states carry on, attention appends, and the
        tokens absorb each TransV stage's cached memory as the prompt's text did."""
        static = cache.has_static_buffers
        segments = cache.append_tokens(valid)
        length = valid.shape[1]
        layouts = [TokenLayout.static_step(s) if static else TokenLayout.from_key_validity(s, length) for s in segments]
        layout = layouts[0].with_rope(self.rotary_emb, hidden_states)
        for layer in self.layers[:stop]:
            stage_index = self.stage_at_layer.get(layer.layer_idx)
            if stage_index is not None:
                hidden_states = self.compressors[stage_index].transfer_to_new_tokens(hidden_states, cache)
                layout = layouts[stage_index + 1].with_rope(self.rotary_emb, hidden_states)
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states = layer(hidden_states, layout, past_key_values=cache)
        if static:
            cache.end_static_step(length)
        return hidden_states

    def prefill_in_chunks(self, embed_columns, valid: torch.Tensor, vision_mask: torch.Tensor | None,
                          past_key_values: TimeViperHybridCache, chunk_size: int,
                          compression_query_positions: torch.Tensor | None = None, keep_last: int | None = None):
        """The prefill of `forward`, `chunk_size` tokens at a time (`ChunkedPrefill`); embed_columns(start, end)
        gives the input embeddings of positions [start, end)."""
        if torch.is_grad_enabled():
            raise ValueError(
                "prefill_chunk_size is an inference setting: run it under torch.no_grad() (generate() does)"
            )
        if past_key_values is None or past_key_values.is_prefilled:
            raise ValueError("chunked prefill fills a new cache: pass an empty TimeViperHybridCache")
        if chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1, got {chunk_size}")
        state = input_state(None, valid, vision_mask, compression_query_positions)
        past_key_values.add_prompt_tokens(valid.shape[1])
        return ChunkedPrefill(self, past_key_values, chunk_size, keep_last).run(embed_columns, state)


def transfer_init_sources(config: TimeViperConfig) -> dict[str, str | None]:
    """{TransV parameter: source parameter} to start TransV without trained weights: q/k/v/o from the first attention
    block at or after the stage's layer, and the gate `alpha` 0 (source None), so the stage starts as plain dropping."""
    text_config = config.text_config
    layer_types = text_layer_types(text_config)
    attention = "self_attn" if text_config.model_type == "qwen2" else "mixer"
    with torch.device("meta"):
        names = list(TimeViperTransV(text_config).state_dict())
    attention_blocks = attention_layers(layer_types)
    sources = {}
    for stage_index, stage in enumerate(config.compression_stages):
        if not stage.transfer:
            continue
        layer = next((i for i in attention_blocks if i >= stage.layer_idx), None)
        if layer is None:
            raise ValueError(
                f"no attention block at or after layer {stage.layer_idx} to initialise TransV stage {stage_index} "
                f"from; attention blocks are at {attention_blocks}"
            )
        for name in names:
            source = None if name == "alpha" else f"layers.{layer}.{attention}.{name}"
            sources[f"merge_modules.{stage_index}.{name}"] = source
    return sources


def input_validity(inputs: torch.Tensor, attention_mask: torch.Tensor | None, decoding: bool) -> torch.Tensor:
    """(batch, length) bool validity of the new tokens; `inputs`: their ids or embeddings."""
    batch, length = inputs.shape[:2]
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=inputs.device)
    if decoding:  # generate() passes the mask of the whole sequence so far; only the new tokens' part is new
        return attention_mask[:, -length:].bool()
    if attention_mask.shape != (batch, length):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the inputs {(batch, length)}")
    return attention_mask.bool()


# Chunked prefill: the prompt consumed a chunk of tokens at a time


class ChunkedPrefill:
    """Prefill of a long prompt in chunks of `chunk_size` tokens, giving what the one-shot forward gives.

    The blocks between two compression stages form a segment. A segment runs chunk by chunk: the Mamba blocks carry
    their conv/SSM state from one chunk to the next and the attention blocks append to their cached keys/values,
    so only one chunk's activations exist at a time. Between segments, a stage selects among ALL vision tokens of a
    row, so what it holds depends on what the selection reads:

    - uniform (`StreamedStage`): the kept tokens follow from the token layout alone, so the next segment's layout is
      known before any hidden state and kept tokens flow on chunk by chunk. Held: the stage inputs that arrived
      but are not yet complete for a next-segment chunk (about one chunk; in a padded batch whose rows differ in
      length, up to the difference of their kept lengths). With TransV also the dropped tokens' keys/values, which
      the cache keeps anyway for decoding.
    - attention-guided (`HeldStage`): the scores need the query token, which comes after the video, so the stage
      holds its whole input, (batch, segment length, hidden), until the last chunk has arrived, then runs the
      one-shot `compress` on it; the next segment runs chunk by chunk over the kept tokens (kept length x hidden).
    """

    def __init__(self, text_model: "TimeViperTextModel", cache: TimeViperHybridCache, chunk_size: int,
                 keep_last: int | None, stop_stage: int | None = None):
        self.model, self.cache, self.chunk_size, self.keep_last = text_model, cache, chunk_size, keep_last
        # A video state's prefix stops at its first question-dependent stage and keeps that stage's input (`held`).
        self.stop_stage, self.held = stop_stage, None
        stage_layers = [stage.layer_idx for stage in text_model.stages]
        self.bounds = [0, *stage_layers, len(text_model.layers)]  # segment s runs blocks [bounds[s], bounds[s+1])
        self.segments: list[SegmentLayout] = []
        self.stages: list[StreamedStage | HeldStage] = []
        self.output: ChunkedOutput | None = None  # the last segment's final hidden states from `output_start` on
        self.output_start = 0

    @property
    def last_segment(self) -> int:
        return len(self.bounds) - 2

    def run(self, embed_columns, state: SequenceState):
        """The final-normed hidden states of the last `keep_last` positions (all if None) and the input index of
        every kept position; embed_columns(start, end) -> (batch, end - start, hidden) input embeddings."""
        self.consume(embed_columns, state)
        return self.output.result(), self.segments[-1].state.positions

    def consume(self, embed_columns, state: SequenceState) -> None:
        """Pushes every input position through the segments, a chunk at a time."""
        self.open_segment(state)
        length = state.valid.shape[1]
        for start in range(0, length, self.chunk_size):
            self.push(0, embed_columns(start, min(start + self.chunk_size, length)), start)
        self.close(0)

    def open_segment(self, state: SequenceState) -> None:
        index = len(self.segments)
        segment = SegmentLayout(state)
        self.segments.append(segment)
        layers = self.model.layers[self.bounds[index] : self.bounds[index + 1]]
        self.cache.open_segment(state.valid, [layer.layer_idx for layer in layers if layer.attention is not None])
        if index == self.last_segment:
            keep = segment.length if self.keep_last is None else min(self.keep_last, segment.length)
            self.output_start = segment.length - keep
            self.output = ChunkedOutput(keep)
            return
        stage = self.model.stages[index]
        if stage.method == "uniform":
            streamed = StreamedStage(self.model, index, state, self.chunk_size)
            self.stages.append(streamed)
            self.open_segment(streamed.next_state)
        else:
            self.stages.append(HeldStage(state))

    def push(self, index: int, hidden_states: torch.Tensor, start: int) -> None:
        """Runs segment `index` on its positions [start, start + chunk) and passes the result on."""
        hidden_states = self.run_blocks(index, hidden_states, start)
        if index < self.last_segment:
            for chunk, chunk_start in self.stages[index].feed(hidden_states, start):
                self.push(index + 1, chunk, chunk_start)
            return
        first = max(self.output_start - start, 0)
        if first < hidden_states.shape[1]:
            self.output.add(self.model.final_norm(hidden_states[:, first:]))

    def close(self, index: int) -> None:
        """Segment `index` has received all its positions: finish the stage after it, then the next segment."""
        if index == self.last_segment:
            return
        if index == self.stop_stage:
            self.held = self.stages[index].take()
            return
        stage = self.stages[index]
        if isinstance(stage, HeldStage):
            state = self.model.compressors[index].compress(stage.take(), self.cache)
            hidden_states, state.hidden_states = state.hidden_states, None
            self.open_segment(state)
            for start in range(0, hidden_states.shape[1], self.chunk_size):
                self.push(index + 1, hidden_states[:, start : start + self.chunk_size], start)
            del hidden_states
        else:
            for chunk, chunk_start in stage.finish(self.cache):
                self.push(index + 1, chunk, chunk_start)
        self.close(index + 1)

    def run_blocks(self, index: int, hidden_states: torch.Tensor, start: int) -> torch.Tensor:
        layout = self.segments[index].chunk(start, hidden_states.shape[1])
        layout = layout.with_rope(self.model.rotary_emb, hidden_states)
        for layer in self.model.layers[self.bounds[index] : self.bounds[index + 1]]:
            hidden_states = layer(hidden_states, layout, past_key_values=self.cache)
        return hidden_states

    def resume(self, stage_index: int, state: SequenceState) -> torch.Tensor:
        """A question's prefill after a video state, from stage `stage_index` on, given that stage's whole input
        over prefix + question."""
        self.segments = [None] * (stage_index + 1)  # (filled before: only their count matters from here on)
        self.stages = [None] * stage_index + [HeldStage(state)]
        self.close(stage_index)
        return self.output.result()


class SegmentLayout:
    """The token layout of one compression segment, cut into chunk layouts."""

    def __init__(self, state: SequenceState):
        self.state = state
        self.length = state.valid.shape[1]
        self.all_valid = bool(state.valid.all())
        self.position_ids = (state.valid.long().cumsum(-1) - 1).clamp(min=0)
        self.row_spans = contiguous_spans(state.valid)
        if self.row_spans is None:
            raise ValueError(
                "chunked prefill needs each row's tokens in one run (left or right padding); the attention_mask has "
                "padding between tokens"
            )

    def chunk(self, start: int, length: int) -> TokenLayout:
        end = start + length
        valid = None if self.all_valid else self.state.valid[:, start:end]
        return TokenLayout(valid, None, True, self.position_ids[:, start:end], self.row_spans, start)


class StreamedStage:
    """A uniform stage in a chunked prefill: the kept tokens are known from the layout, so each chunk of the next
    segment is gathered as soon as the stage inputs it needs have arrived (see `ChunkedPrefill`)."""

    def __init__(self, text_model: "TimeViperTextModel", stage_index: int, state: SequenceState, chunk_size: int):
        self.compressor, self.chunk_size = text_model.compressors[stage_index], chunk_size
        stage = self.compressor.stage
        rows = [self.compressor.select(state, b) for b in range(state.valid.shape[0])]
        keeps = [keep for keep, _ in rows]
        self.next_state = kept_layout(state, keeps, None)
        self.length = self.next_state.valid.shape[1]
        # source[b, c]: the stage-input position of the next segment's position c (-1 for padding).
        self.source = torch.stack([left_pad(keep, self.length, -1) for keep in keeps])
        kept = self.source >= 0
        # Next-segment positions [0, c] need stage inputs up to needed[c]; from position c on, none before first[c].
        self.needed = self.source.max(dim=0).values.cummax(dim=0).values.tolist()
        first = torch.where(kept, self.source, state.valid.shape[1]).min(dim=0).values
        self.first_needed = first.flip(0).cummin(dim=0).values.flip(0).tolist()
        # TransV: the dropped tokens' memory, and the kept positions after each row's vision span that absorb it.
        self.dropped = [dropped if stage.transfer else None for _, dropped in rows]
        # Row b's TransV keys/values, written as its dropped tokens arrive (allocated at the first of them).
        self.memories: list[tuple[torch.Tensor, torch.Tensor] | None] = [None for _ in rows]
        self.memory_filled = [0 for _ in rows]
        self.absorbs = torch.zeros_like(kept)
        for b, dropped in enumerate(self.dropped):
            if dropped is not None:
                self.absorbs[b] = kept[b] & (self.source[b] > last_vision_index(state, b))
        self.pending, self.pending_start, self.received, self.emitted = None, 0, 0, 0

    def feed(self, hidden_states: torch.Tensor, start: int) -> list[tuple[torch.Tensor, int]]:
        """Stage inputs [start, start + n) arrive (in order); returns the next-segment chunks now complete."""
        end = start + hidden_states.shape[1]
        for b, dropped in enumerate(self.dropped):
            if dropped is not None and bool(dropped[start:end].any()):
                index = dropped[start:end].nonzero().squeeze(1)
                self.add_memory(b, *self.compressor.memory(hidden_states[b], index))
        if self.pending is None:
            self.pending, self.pending_start = hidden_states, start
        else:
            self.pending = torch.cat([self.pending, hidden_states], dim=1)
        self.received = end
        return self.emit()

    def emit(self) -> list[tuple[torch.Tensor, int]]:
        chunks = []
        while self.emitted < self.length:
            end = min(self.emitted + self.chunk_size, self.length)
            if self.needed[end - 1] >= self.received:
                break
            chunks.append((self.gather(self.emitted, end), self.emitted))
            self.emitted = end
            if end < self.length:
                # (the next needed input may not have arrived yet: keep the buffer aligned with what has)
                drop = min(self.first_needed[end], self.received) - self.pending_start
                if drop > 0:
                    self.pending, self.pending_start = self.pending[:, drop:], self.pending_start + drop
            else:
                self.pending = None
        return chunks

    def gather(self, start: int, end: int) -> torch.Tensor:
        source = self.source[:, start:end]
        index = (source - self.pending_start).clamp(min=0)
        out = self.pending.gather(1, index[..., None].expand(-1, -1, self.pending.shape[-1]))
        out = out.masked_fill(~(source >= 0)[..., None], 0.0)
        absorbs = self.absorbs[:, start:end]
        for b in range(out.shape[0]):
            if bool(absorbs[b].any()):  # all of row b's dropped tokens precede its text: its memory is complete
                key, value = self.memories[b]
                out[b, absorbs[b]] = self.compressor.transfer(out[b, absorbs[b]][None], key[None], value[None])[0]
        return out

    def add_memory(self, b: int, key: torch.Tensor, value: torch.Tensor) -> None:
        if self.memories[b] is None:
            # Preallocated for all of the row's dropped tokens: parts joined at the end would hold it twice.
            total = int(self.dropped[b].sum())
            self.memories[b] = (key.new_empty(key.shape[0], total, key.shape[2]),
                                value.new_empty(value.shape[0], total, value.shape[2]))
        start = self.memory_filled[b]
        self.memories[b][0][:, start : start + key.shape[1]] = key
        self.memories[b][1][:, start : start + key.shape[1]] = value
        self.memory_filled[b] = start + key.shape[1]

    def finish(self, cache: TimeViperHybridCache) -> list[tuple[torch.Tensor, int]]:
        """All stage inputs have arrived: the remaining chunks; the TransV memory goes into the cache."""
        chunks = self.emit()
        memories = [self.memories[b] if dropped is not None else None for b, dropped in enumerate(self.dropped)]
        cache.store_transfer_memory(self.compressor.stage_index, memories)
        return chunks


class HeldStage:
    """An attention-guided stage in a chunked prefill: holds its whole input until the query token has arrived."""

    def __init__(self, state: SequenceState):
        self.state = state
        self.hidden_states: torch.Tensor | None = state.hidden_states  # (given whole when a question resumes)

    def feed(self, hidden_states: torch.Tensor, start: int) -> list:
        if self.hidden_states is None:
            batch, _, width = hidden_states.shape
            self.hidden_states = hidden_states.new_empty(batch, self.state.valid.shape[1], width)
        self.hidden_states[:, start : start + hidden_states.shape[1]] = hidden_states
        return []

    def take(self) -> SequenceState:
        state, self.state = self.state, None
        state.hidden_states, self.hidden_states = self.hidden_states, None
        return state


# Video state: a video prefilled once, then any number of questions about it

VIDEO_STATE_FORMAT = 1
VIDEO_STATE_TENSORS = "video_state.safetensors"
VIDEO_STATE_METADATA = "video_state.json"


def first_question_stage(stages: list[TimeViperCompressionStage]) -> int | None:
    """The first stage whose result depends on the text after the video: attention-guided selection scores with the
    question's last token. A uniform stage (with its TransV) treats a question like decoded tokens."""
    return next((index for index, stage in enumerate(stages) if stage.method != "uniform"), None)


@dataclass
class VideoStateResume:
    """Where a question's prefill picks up a video state: the first question-dependent stage (None: none) and its
    input over the prefix, which it selects from once the question's last token is known."""

    stage_index: int | None
    held: SequenceState | None
    chunk_size: int


def resume_after_video(text_model: "TimeViperTextModel", inputs_embeds, valid, cache: TimeViperHybridCache,
                       query_positions):
    """The final-normed hidden states of the question after a video state: its tokens run through the blocks before
    the first question-dependent stage, which then selects among the held prefix inputs + the question's, and the
    blocks after it run on what it keeps (`ChunkedPrefill.resume`)."""
    resume = cache.take_resume()
    batch, length = valid.shape
    if batch != 1 or not bool(valid.all()):
        raise ValueError(
            f"a video state answers one question at a time: got a batch of {batch} with padding "
            f"{not bool(valid.all())}; pass input_ids of shape (1, length) without padding"
        )
    prefix_length = cache.seen_tokens
    stop = len(text_model.layers) if resume.stage_index is None else text_model.stages[resume.stage_index].layer_idx
    hidden_states = text_model.continue_layers(inputs_embeds, valid, cache, stop)
    if resume.stage_index is None:
        return text_model.final_norm(hidden_states)
    held = resume.held
    positions = torch.arange(prefix_length, prefix_length + length, device=valid.device)[None]
    query = positions[:, -1] if query_positions is None else query_positions.to(valid.device)
    state = SequenceState(
        hidden_states=torch.cat([held.hidden_states, hidden_states], dim=1),
        valid=torch.cat([held.valid, valid], dim=1),
        vision=torch.cat([held.vision, torch.zeros_like(valid)], dim=1),
        positions=torch.cat([held.positions, positions], dim=1),
        num_vision=held.num_vision,
        query_positions=query,
    )
    # Text tokens are never dropped: the question's tokens are the last `length` kept positions.
    return ChunkedPrefill(text_model, cache, resume.chunk_size, keep_last=length).resume(resume.stage_index, state)


def state_fingerprint(model: "TimeViperForConditionalGeneration") -> dict:
    """What a saved video state must match to be loaded into `model`: the compression schedule, a hash of the
    configuration (private and version fields left out), the dtype, and a probe of the weights (8 evenly spaced
    elements of every parameter, hashed: cheap, and different for any other checkpoint)."""

    def public(value):
        if isinstance(value, dict):
            ignored = {"transformers_version", "dtype", "torch_dtype", "architectures", "auto_map"}
            return {str(k): public(v) for k, v in value.items() if not str(k).startswith("_") and k not in ignored}
        return value

    config_json = json.dumps(public(model.config.to_dict()), sort_keys=True, default=str)
    samples = []
    for _, parameter in sorted(model.named_parameters()):
        flat = parameter.detach().flatten()
        count = min(8, flat.numel())  # (integer steps: float linspace rounds past the end of a 500M-element weight)
        index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
        samples.append(flat[index].float())
    probe = torch.cat(samples).cpu().numpy().tobytes()
    return {
        "schedule": model.config.compression_schedule,
        "config_hash": hashlib.sha256(config_json.encode()).hexdigest(),
        "weights_probe": hashlib.sha256(probe).hexdigest(),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, a copy where one shares memory with an earlier one (safetensors refuses shared
    storage; the held stage input's validity is the cache's segment validity, for instance)."""
    seen, out = set(), {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


class TimeViperVideoState:
    """A video and the prompt before it, prefilled once, answering any number of questions that follow it
    (`TimeViperForConditionalGeneration.encode_video_state`).

    It holds the cache of the prefix (the prompt up to the video's last placeholder) for the blocks before the
    first question-dependent stage (`first_question_stage`) and, when there is one, that stage's input over the
    prefix (`resume.held`), which the stage selects from with each question's last token. A question runs on a
    fork that shares the prefix's keys/values and copies the Mamba states, so the state serves any number of
    questions; the result equals the full prompt's one-shot forward.
    """

    def __init__(self, cache: TimeViperHybridCache, prefix_ids: torch.Tensor, resume: VideoStateResume,
                 num_frames: int, fingerprint: dict):
        self.cache, self.prefix_ids, self.resume = cache, prefix_ids, resume
        self.num_frames, self.fingerprint = num_frames, fingerprint

    @property
    def prefix_length(self) -> int:
        return self.prefix_ids.shape[1]

    @classmethod
    @torch.no_grad()
    def prefill(cls, model: "TimeViperForConditionalGeneration", input_ids, video_features, pixel_values_videos,
                chunk_size: int) -> "TimeViperVideoState":
        config = model.config
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"encode_video_state takes the input_ids of one prompt, (1, length), got {tuple(input_ids.shape)}")
        if bool((input_ids == config.image_token_id).any()):
            raise ValueError("encode_video_state reuses a video; the prompt has image placeholders")
        video = (input_ids[0] == config.video_token_id).nonzero()
        if video.numel() == 0:
            raise ValueError(f"input_ids hold no video placeholder (id {config.video_token_id})")
        if (video_features is None) == (pixel_values_videos is None):
            raise ValueError("pass exactly one of video_features or pixel_values_videos")
        if chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1, got {chunk_size}")
        prefix_ids = input_ids[:, : int(video.max()) + 1]
        vision = model.model.embed_with_vision(prefix_ids, None, pixel_values_videos, video_features)
        stop = first_question_stage(config.compression_stages)
        cache = TimeViperHybridCache()
        cache.add_prompt_tokens(prefix_ids.shape[1])
        prefill = ChunkedPrefill(model.model.language_model, cache, chunk_size, keep_last=1, stop_stage=stop)
        prefill.consume(vision.embed_columns, input_state(None, torch.ones_like(vision.mask), vision.mask, None))
        num_frames = int(vision.mask.sum()) // config.vision_tokens_per_frame
        resume = VideoStateResume(stop, prefill.held, chunk_size)
        return cls(cache, prefix_ids, resume, num_frames, state_fingerprint(model))

    def fork(self) -> TimeViperHybridCache:
        """A cache whose next forward call takes the tokens after the prefix (see the class docstring)."""
        return self.cache.fork(resume=self.resume)

    def check_prompt(self, input_ids: torch.Tensor) -> None:
        """A prompt can be asked of this state if it starts with the prefix and continues after it."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"a video state answers one prompt at a time, (1, length); got {tuple(input_ids.shape)}")
        if input_ids.shape[1] <= self.prefix_length:
            raise ValueError(
                f"the prompt has {input_ids.shape[1]} tokens; the video state's prefix alone has {self.prefix_length}: "
                "the question must follow the video"
            )
        if not torch.equal(input_ids[:, : self.prefix_length].cpu(), self.prefix_ids.cpu()):
            raise ValueError(
                f"the prompt's first {self.prefix_length} tokens differ from the video state's prefix (another "
                "video, frame count or text before the video): build the state from this prompt"
            )

    def question_inputs(self, input_ids: torch.Tensor) -> dict:
        """Keyword arguments of the model's forward for the whole prompt `input_ids` on a fresh fork: its first
        call computes only the question's part (the logits of the tokens after the prefix)."""
        self.check_prompt(input_ids)
        return {
            "input_ids": input_ids[:, self.prefix_length :],
            "attention_mask": torch.ones_like(input_ids),
            "past_key_values": self.fork(),
        }

    def memory_bytes(self) -> int:
        """Bytes of the tensors a question reads: cached states, keys/values, TransV memory, held stage input."""
        held = self.resume.held
        return self.cache.memory_bytes() + (0 if held is None else held.hidden_states.nbytes)

    def save(self, directory) -> Path:
        """Writes `video_state.safetensors` and `video_state.json` (what the state must match to be loaded)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"prefix_ids": self.prefix_ids, **self.cache.named_tensors()}
        if self.resume.held is not None:
            tensors.update({f"held.{name}": tensor for name, tensor in vars(self.resume.held).items()})
        save_file(unshared(tensors), directory / VIDEO_STATE_TENSORS)
        metadata = {
            "format": VIDEO_STATE_FORMAT,
            **self.fingerprint,
            "num_frames": self.num_frames,
            "prefix_length": self.prefix_length,
            "stage_index": self.resume.stage_index,
            "prefill_chunk_size": self.resume.chunk_size,
            "memory_bytes": self.memory_bytes(),
            "bytes_per_frame": self.memory_bytes() / self.num_frames,
        }
        (directory / VIDEO_STATE_METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory, model: "TimeViperForConditionalGeneration") -> "TimeViperVideoState":
        """Reads a state written by `save` onto `model`'s device; refuses one made with another configuration,
        schedule, dtype or weights (its questions would not equal a full run)."""
        directory = Path(directory)
        metadata_path, tensors_path = directory / VIDEO_STATE_METADATA, directory / VIDEO_STATE_TENSORS
        for path in (metadata_path, tensors_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: not a video state folder (TimeViperVideoState.save)")
        metadata = json.loads(metadata_path.read_text())
        if metadata.get("format") != VIDEO_STATE_FORMAT:
            raise ValueError(f"{metadata_path}: video state format {metadata.get('format')!r}, expected {VIDEO_STATE_FORMAT}")
        expected = state_fingerprint(model)
        for key, what in (("schedule", "compression schedule"), ("dtype", "dtype"),
                          ("config_hash", "configuration (hash)"), ("weights_probe", "weights (probe hash)")):
            if metadata.get(key) != expected[key]:
                raise ValueError(
                    f"{metadata_path}: the video state was made by a model with {what} {metadata.get(key)!r}, this "
                    f"model has {expected[key]!r}; encode the video again with this model"
                )
        tensors = load_file(tensors_path, device=str(model.device))
        prefix_ids = tensors.pop("prefix_ids").cpu()
        held = {name.removeprefix("held."): tensors.pop(name) for name in list(tensors) if name.startswith("held.")}
        cache = TimeViperHybridCache()
        cache.load_named_tensors(tensors, prefix_ids.shape[1])
        resume = VideoStateResume(
            metadata["stage_index"], SequenceState(**held) if held else None, metadata["prefill_chunk_size"]
        )
        return cls(cache, prefix_ids, resume, metadata["num_frames"], expected)


# Pretrained wrappers


def is_legacy_gate_key(key: str) -> bool:
    return key == "language_model.alpha" or key.endswith(".language_model.alpha")


def read_legacy_gates(path, hub_kwargs: dict) -> tuple[str, torch.Tensor]:
    """(key, tensor) of the legacy gate vector in the safetensors weights of a local folder or Hub repo."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    hub = {name: hub_kwargs[name] for name in ("cache_dir", "force_download", "local_files_only", "token", "revision",
                                                 "subfolder") if name in hub_kwargs}
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub)
    files = ["model.safetensors"]
    if index is not None:
        with open(index) as file:
            files = sorted(set(json.load(file)["weight_map"].values()))
    for name in files:
        with safe_open(cached_file(path, name, **hub), framework="pt") as weights:
            for key in weights.keys():
                if is_legacy_gate_key(key):
                    return key, weights.get_tensor(key)
    raise ValueError(f"{path}: the legacy TransV gate key was reported but is in none of {files}")


@torch.no_grad()
def load_legacy_gates(model, gates: torch.Tensor, key: str) -> list[str]:
    """Copy entry j of the legacy vector into the gate of the j-th transfer stage; returns the parameter names."""
    text_model = next(module for module in model.modules() if isinstance(module, TimeViperTextModel))
    if not text_model.transfer_slot and gates.dim() == 1:
        if bool(gates.any()):
            raise ValueError(
                f"{key} holds open TransV gates {gates.tolist()}, but token_compression has no transfer stage: the "
                "checkpoint was trained with TransV; load it with the token_compression it was trained with"
            )
        logger.warning("%s: the legacy TransV gates are all closed and token_compression has no transfer stage; "
                       "ignoring them", key)
        return []
    if gates.shape != (len(text_model.transfer_slot),):
        raise ValueError(
            f"{key} has shape {tuple(gates.shape)}, but token_compression has {len(text_model.transfer_slot)} "
            "transfer stages"
        )
    filled = []
    for stage_index, slot in text_model.transfer_slot.items():
        gate = text_model.merge_modules[str(stage_index)].alpha
        if hasattr(gate, "ds_numel"):  # a DeepSpeed ZeRO-3 partition holds none of the gate's values here
            raise ValueError(f"{key}: re-save this folder once without DeepSpeed ZeRO-3 to load it under ZeRO-3")
        gate.copy_(gates[slot : slot + 1])
        filled.append(f"merge_modules.{stage_index}.alpha")
    return filled


class TimeViperPreTrainedModel(PreTrainedModel):
    config_class = TimeViperConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TimeViperHybridBlock", "TimeViperQwen2Layer", "SiglipEncoderLayer"]
    _supports_sdpa = True
    _is_stateful = True
    _can_compile_fullgraph = False

    @torch.no_grad()
    def save_pretrained(self, *args, **kwargs):
        if self._auto_class is None:  # transformers copies the code files only for a registered class
            type(self).register_for_auto_class(self.default_auto_class)
        return super().save_pretrained(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, plus the TransV gates of folders written before each TransV module held
        its own: one vector `model.language_model.alpha` (entry j: the j-th transfer stage)."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        if any(is_legacy_gate_key(key) for key in info["unexpected_keys"]):
            key, gates = read_legacy_gates(pretrained_model_name_or_path, kwargs)
            filled = load_legacy_gates(model, gates, key)
            info["unexpected_keys"] = type(info["unexpected_keys"])(
                k for k in info["unexpected_keys"] if not is_legacy_gate_key(k)
            )
            info["missing_keys"] = type(info["missing_keys"])(
                k for k in info["missing_keys"] if not any(k.endswith(name) for name in filled)
            )
            if filled:
                logger.warning(
                    "read the TransV gates from the legacy key %r; save_pretrained stores them as "
                    "merge_modules.<stage>.alpha", key,
                )
        return (model, info) if output_loading_info else model

    def _init_weights(self, module):
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, TimeViperMamba2Mixer):
            # Mamba-2 recipe: A = -[1..heads], D = 1, dt log-uniform in [dt_min, dt_max] through inverse softplus.
            text_config = self.config.text_config
            init.copy_(module.A_log, torch.log(torch.arange(1, module.num_heads + 1, dtype=torch.float32)))
            init.ones_(module.D)
            log_dt = torch.rand(module.num_heads) * (
                math.log(text_config.time_step_max) - math.log(text_config.time_step_min)
            ) + math.log(text_config.time_step_min)
            dt = log_dt.exp().clamp(min=text_config.time_step_floor)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
        elif isinstance(module, TimeViperTransV):
            init.zeros_(module.alpha)  # TransV starts as plain dropping; its projections are Linear (below)
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (TimeViperRMSNorm, TimeViperRMSNormGated)):
            init.ones_(module.weight)
        elif isinstance(module, Qwen2RotaryEmbedding):
            inv_freq, _ = module.compute_default_rope_parameters(module.config)  # later releases than 5.17 take no device
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)


def build_vision_tower(config: TimeViperConfig) -> SiglipVisionModel:
    """SigLIP up to the block whose output TimeViper reads (`config.vision_layers_used`): the blocks after it and the
    post-layernorm would never run, so they are not built."""
    vision_config = copy.deepcopy(config.vision_config)
    vision_config.num_hidden_layers = config.vision_layers_used
    tower = SiglipVisionModel(vision_config)
    tower.post_layernorm = None
    return tower


def fusable_siglip_blocks(vision: SiglipVisionModel) -> bool:
    """Whether `siglip_blocks_inference` computes what the tower's own blocks would: SDPA attention (eager is what
    one picks to read attention weights), and blocks built of the plain modules SigLIP makes, with no hooks. The
    fused path reads the LayerNorms' and q/k/v's weights itself, so a peft adapter or a quantised layer in
    their place, accelerate's offload hooks or a compiled block would be bypassed; such towers run block by block."""
    if vision.config._attn_implementation != "sdpa":
        return False
    for layer in vision.encoder.layers:
        if type(layer) is not SiglipEncoderLayer:  # e.g. a torch.compile'd block
            return False
        bypassed = (layer.layer_norm1, layer.layer_norm2, layer.self_attn.q_proj, layer.self_attn.k_proj,
                    layer.self_attn.v_proj)
        if any(type(module) not in (nn.LayerNorm, nn.Linear) for module in bypassed):
            return False
        if any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in layer.modules()):
            return False
    return True


def siglip_blocks_inference(layers, hidden_states: torch.Tensor) -> torch.Tensor:
    """SigLIP encoder blocks without autograd, the same math in fewer passes over the activations (at 256 frames a
    chunk, one pass over the residual stream moves 0.86 GB): every residual add happens inside the LayerNorm kernel
    that follows it (one pass reads both summands and writes the sum and its normalised copy), and q, k and v come
    out of one matmul."""
    update = None  # the last sublayer's output, added to the residual stream by the next LayerNorm
    for layer in layers:
        normed, hidden_states = add_layer_norm(update, hidden_states, layer.layer_norm1)
        update = siglip_self_attention(layer.self_attn, normed)
        normed, hidden_states = add_layer_norm(update, hidden_states, layer.layer_norm2)
        update = layer.mlp(normed)
    return hidden_states if update is None else hidden_states + update


def add_layer_norm(update: torch.Tensor | None, residual: torch.Tensor, norm: nn.LayerNorm):
    """(norm(residual + update), residual + update) in one kernel pass; the LayerNorm is taken of the float32 sum,
    before it is rounded to the residual's dtype (PyTorch normalises the rounded sum: within a rounding step)."""
    if update is None:
        return layernorm_kernel(residual, norm.weight, norm.bias, eps=norm.eps), residual
    return layernorm_kernel(update, norm.weight, norm.bias, residual=residual, prenorm=True, eps=norm.eps)


def siglip_self_attention(attention, hidden_states: torch.Tensor) -> torch.Tensor:
    """SigLIP's attention with q, k and v from one matmul over their concatenated weights (8 MB a block at so400m:
    copied per call, next to 0.4 GB of activations a projection reads)."""
    batch, length, width = hidden_states.shape
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    qkv = F.linear(hidden_states, torch.cat([p.weight for p in projections]), torch.cat([p.bias for p in projections]))
    query, key, value = qkv.view(batch, length, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
    attended = F.scaled_dot_product_attention(query, key, value, scale=attention.scale)
    return attention.out_proj(attended.transpose(1, 2).reshape(batch, length, width))


class TimeViperModel(TimeViperPreTrainedModel):
    default_auto_class = "AutoModel"

    def __init__(self, config: TimeViperConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config)
        # Checkpoints of the whole SigLIP tower (converted ones, older folders) hold the parts left unbuilt.
        unbuilt = [str(i) for i in range(config.vision_layers_used, config.vision_config.num_hidden_layers)]
        self._keys_to_ignore_on_load_unexpected = [r"vision_tower\.(vision_model\.)?post_layernorm\."] + (
            [rf"vision_tower\.(vision_model\.)?encoder\.layers\.({'|'.join(unbuilt)})\."] if unbuilt else []
        )
        self.multi_modal_projector = TimeViperMultiModalProjector(config)
        self.language_model = TimeViperTextModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embed

    def set_input_embeddings(self, value):
        setattr(self.language_model, "embed_tokens" if self.language_model.is_qwen else "embeddings", value)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """(f, 3, h, w) -> (f, tokens_per_frame, llm_hidden)."""
        features = self.encode_patches(frames)
        if self.config.projector_type == "tome_mlp":
            features = merge_tokens(features, self.config.tokens_per_frame)
        return self.multi_modal_projector(features)

    def encode_patches(self, frames: torch.Tensor) -> torch.Tensor:
        """(f, 3, h, w) -> (f, patches, vision_hidden): the output of the SigLIP block TimeViper reads."""
        vision = self.vision_tower
        features = vision.embeddings(frames.to(vision.embeddings.patch_embedding.weight.dtype))
        # SigLIP's embeddings come out as a transposed view of the patch conv; made contiguous once here, every
        # residual add and LayerNorm of the tower runs on the contiguous fast path.
        features = features.contiguous()
        # Inference on CUDA: the same blocks in fewer passes over the activations (see siglip_blocks_inference).
        if features.is_cuda and layernorm_kernel is not None and not torch.is_grad_enabled() and \
                fusable_siglip_blocks(vision):
            features = siglip_blocks_inference(vision.encoder.layers, features)
        else:
            for layer in vision.encoder.layers:
                features = layer(features, None)
        return features

    def get_video_features(self, pixel_values_videos: torch.Tensor, name: str = "pixel_values_videos") -> torch.Tensor:
        """(frames, 3, h, w) or (videos, frames, 3, h, w) -> (frames, tokens, hidden), `vision_chunk_size` frames at a
        time so that 10k frames never hold all patch activations at once."""
        size = self.config.vision_config.image_size
        if pixel_values_videos.dim() not in (4, 5) or pixel_values_videos.shape[-3:] != (3, size, size):
            raise ValueError(
                f"pixel values must have shape (frames, 3, {size}, {size}) or (videos, frames, 3, {size}, {size}), "
                f"got {tuple(pixel_values_videos.shape)}; the TimeViper processor produces them"
            )
        if not torch.isfinite(pixel_values_videos).all():
            # A NaN or Inf pixel turns every logit into NaN and greedy decoding into token 0, without a word.
            raise ValueError(
                f"{name} holds {int((~torch.isfinite(pixel_values_videos)).sum())} NaN/Inf values; check the frames "
                "and their preprocessing"
            )
        frames = pixel_values_videos.flatten(0, -4)
        chunks = frames.split(self.config.vision_chunk_size)
        return torch.cat([self.encode_frames(chunk) for chunk in chunks])

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images are encoded as single frames."""
        return self.get_video_features(pixel_values, name="pixel_values")

    def streamed_video_features(self, streams) -> "StreamedVideoFeatures":
        """`video_features` for `generate()` that encode each video while the prefill consumes it (`VideoStream`s,
        in the order of the videos' placeholders): only one chunk of frames and features exists at a time."""
        videos = [(stream.pixel_chunks(self.device, self.dtype), stream.num_frames) for stream in streams]
        return StreamedVideoFeatures(
            self.get_video_features, videos, self.config.vision_tokens_per_frame, self.config.text_config.hidden_size
        )

    @torch.no_grad()
    def encode_video(self, pixel_chunks, num_frames: int | None = None, features_device=None) -> torch.Tensor:
        """Streaming `get_video_features` over pixel chunks (f, 3, h, w) as they come (`VideoStream.pixel_chunks`),
        keeping only the features on `features_device` (default: the model's), for `generate(video_features=...)`."""
        device = torch.device(features_device) if features_device is not None else self.device
        features, seen = ChunkedOutput(num_frames, dim=0), 0
        for pixels in pixel_chunks:
            part = self.get_video_features(pixels.to(self.device)).to(device)
            seen += part.shape[0]
            if num_frames is not None and seen > num_frames:
                raise ValueError(f"encode_video: the chunks hold more than num_frames={num_frames} frames")
            features.add(part)
        if num_frames is not None and seen != num_frames:
            raise ValueError(f"encode_video: the chunks held {seen} frames, num_frames={num_frames}")
        if seen == 0:
            raise ValueError("encode_video got no frames")
        return features.result()

    def get_placeholder_mask(self, input_ids: torch.Tensor, token_id: int, features: torch.Tensor, name: str):
        mask = input_ids == token_id
        num_tokens, num_features = int(mask.sum()), features.shape[0] * features.shape[1]
        if num_tokens != num_features:
            raise ValueError(
                f"{name}: the text has {num_tokens} placeholder tokens (id {token_id}) but the {name} give "
                f"{features.shape[0]} frames x {features.shape[1]} tokens = {num_features} embeddings. Build the "
                f"inputs with the TimeViper processor, which expands each frame into {self.config.vision_tokens_per_frame} "
                "placeholders."
            )
        return mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: TimeViperHybridCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        compression_query_positions: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        video_features: torch.FloatTensor | None = None,
        prefill_chunk_size: int | None = None,
        keep_last: int | None = None,
        cache: TimeViperHybridCache | None = None,
    ) -> TimeViperModelOutputWithPast:
        r"""
        video_features: projected frame features (`encode_video`) in place of `pixel_values_videos`; they may stay
            on another device (the host) and move a chunk at a time.
        prefill_chunk_size: run the prefill this many tokens at a time: the same result, with activation memory for
            one chunk instead of the whole prompt.
        keep_last: with `prefill_chunk_size`, return the hidden states of only the last N positions.
        past_key_values / cache: the `TimeViperHybridCache`, under either name (transformers >= 5.24 passes `cache`).
        """
        cache = resolve_cache_argument(past_key_values, cache)
        decoding = cache is not None and cache.is_prefilled
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if video_features is not None and pixel_values_videos is not None:
            raise ValueError("pass either pixel_values_videos or video_features, not both")
        if pixel_values is not None or pixel_values_videos is not None or video_features is not None:
            if decoding:
                raise ValueError("pixel values can only be given with the first (prefill) call of a cache")
            if input_ids is None:
                raise ValueError("pixel values need input_ids to locate the placeholder tokens")
        if input_ids is None or decoding:
            embeds = inputs_embeds if input_ids is None else self.get_input_embeddings()(input_ids)
            vision = VisionInputs(lambda start, end: embeds[:, start:end], None, video_features, None)
        else:
            vision = self.embed_with_vision(input_ids, pixel_values, pixel_values_videos, video_features)
        all_hidden_states = None
        if prefill_chunk_size is not None and not decoding:
            if output_hidden_states:
                raise ValueError("output_hidden_states is not available with prefill_chunk_size")
            valid = input_validity(input_ids if input_ids is not None else inputs_embeds, attention_mask, False)
            hidden_states, kept_positions = self.language_model.prefill_in_chunks(
                vision.embed_columns, valid, vision.mask, cache, prefill_chunk_size,
                compression_query_positions=compression_query_positions, keep_last=keep_last,
            )
        else:
            length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            hidden_states, kept_positions, all_hidden_states = self.language_model(
                vision.embed_columns(0, length), attention_mask=attention_mask, vision_mask=vision.mask,
                past_key_values=cache, compression_query_positions=compression_query_positions,
                output_hidden_states=bool(output_hidden_states),
            )
        return TimeViperModelOutputWithPast(
            last_hidden_state=hidden_states, kept_positions=kept_positions, **{CACHE_NAME: cache},
            hidden_states=all_hidden_states, video_hidden_states=vision.video_features,
            image_hidden_states=vision.image_features,
        )

    def embed_with_vision(self, input_ids, pixel_values, pixel_values_videos, video_features) -> "VisionInputs":
        """The prompt's input embeddings with the frame / image features in place of their placeholder tokens."""
        config = self.config
        placeholders = (input_ids == config.video_token_id) | (input_ids == config.image_token_id)
        has_placeholders = bool(placeholders.any())
        if has_placeholders and pixel_values is None and pixel_values_videos is None and video_features is None:
            raise ValueError("input_ids contain video/image placeholder tokens but no pixel values were given")
        vision_inputs, image_features = [], None  # (placeholder mask, features)
        if pixel_values_videos is not None:
            video_features = self.get_video_features(pixel_values_videos)
        if video_features is not None:
            mask = self.get_placeholder_mask(input_ids, config.video_token_id, video_features, "videos")
            vision_inputs.append((mask, video_features))
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
            mask = self.get_placeholder_mask(input_ids, config.image_token_id, image_features, "images")
            vision_inputs.append((mask, image_features))
        embed_columns = PlaceholderEmbedder(self.get_input_embeddings(), input_ids, placeholders, vision_inputs)
        return VisionInputs(embed_columns, placeholders if has_placeholders else None, video_features, image_features)


@dataclass
class VisionInputs:
    """A forward call's input embeddings and what they hold of the vision inputs."""

    embed_columns: "PlaceholderEmbedder"  # (start, end) -> (batch, end - start, hidden) input embeddings
    mask: torch.Tensor | None  # (batch, length) bool: the vision placeholder tokens, None if there are none
    video_features: torch.Tensor | None
    image_features: torch.Tensor | None


class PlaceholderEmbedder:
    """Input embeddings of any range of positions, each placeholder replaced by its feature row (in row-major
    order). Features may live on another device; only the asked rows move. Rows are written through a boolean mask,
    not `masked_scatter`, which builds an int64 index per element of the embeddings on CUDA."""

    def __init__(self, embeddings: nn.Embedding, input_ids, placeholders, vision_inputs):
        self.embeddings, self.input_ids, self.placeholders = embeddings, input_ids, placeholders
        self.sources = []
        for mask, features in vision_inputs:
            counts = mask.sum(-1)
            row_offset = counts.cumsum(0) - counts  # features before each row's first placeholder
            index = mask.long().cumsum(-1) - 1 + row_offset[:, None]
            if not isinstance(features, StreamedVideoFeatures):
                features = features.reshape(-1, features.shape[-1])
            self.sources.append((mask, index, features))

    def __call__(self, start: int, end: int) -> torch.Tensor:
        ids = self.input_ids[:, start:end]
        # Placeholder ids may lie beyond the embedding table; they are overwritten below anyway.
        embeds = self.embeddings(ids.masked_fill(self.placeholders[:, start:end], 0))
        if not self.sources:
            return embeds
        embeds = embeds.clone()
        for mask, index, features in self.sources:
            mask = mask[:, start:end]
            if not bool(mask.any()):
                continue
            rows = index[:, start:end][mask]
            if isinstance(features, StreamedVideoFeatures):
                features = features.take(rows)
            elif rows.numel() < features.shape[0]:  # (the whole range takes every row in order: no gathered copy)
                features = features[rows.to(features.device)]
            embeds[mask] = features.to(embeds.device, embeds.dtype)
        return embeds


class StreamedVideoFeatures:
    """Video features computed while the prefill consumes them (`TimeViperModel.streamed_video_features`): each
    video's frames are encoded a chunk at a time when the prefill reaches their placeholders and dropped once it
    has passed them, so neither the pixels nor the features of a whole video exist at once; consumable once.
    `encode`: pixels (f, 3, h, w) -> features (f, tokens, hidden); `videos`: per video, (pixel chunks, frame count)."""

    def __init__(self, encode, videos, tokens_per_frame: int, hidden_size: int):
        self.encode = encode
        self.chunks = [iter(chunks) for chunks, _ in videos]
        frames = [int(num_frames) for _, num_frames in videos]
        self.shape = (sum(frames), tokens_per_frame, hidden_size)
        self.bounds = torch.tensor([0, *frames]).cumsum(0) * tokens_per_frame  # each video's rows
        self.buffers: list[tuple[int, torch.Tensor | None]] = [(0, None) for _ in videos]  # (first row, rows)

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The feature rows `rows` (ascending, flattened over videos and their frames' tokens)."""
        rows = rows.cpu()
        video_of = torch.searchsorted(self.bounds, rows, right=True) - 1
        parts = []
        for video in video_of.unique().tolist():
            local = rows[video_of == video] - self.bounds[video]
            if int(local.min()) < self.buffers[video][0]:
                raise ValueError(
                    f"video {video} of the streamed features is asked for rows it has already passed on: streamed "
                    "features can be consumed once, in order"
                )
            start, buffer = self.fill(video, int(local.max()) + 1)
            parts.append(buffer[(local - start).to(buffer.device)])
            # Later calls ask for later rows only: drop the ones handed out.
            keep_from = int(local.max()) + 1
            self.buffers[video] = (keep_from, buffer[keep_from - start :])
        return torch.cat(parts)

    def fill(self, video: int, needed: int) -> tuple[int, torch.Tensor]:
        start, buffer = self.buffers[video]
        have = start + (0 if buffer is None else buffer.shape[0])
        while have < needed:
            pixels = next(self.chunks[video], None)
            if pixels is None:
                raise ValueError(
                    f"video {video} of the streamed features ended after {have // self.shape[1]} frames, before its "
                    "placeholders did"
                )
            features = self.encode(pixels).flatten(0, 1)
            buffer = features if buffer is None else torch.cat([buffer, features])
            have += features.shape[0]
        self.buffers[video] = (start, buffer)
        return start, buffer


def kept_for_logits(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions whose logits are computed: the last N (an int N > 0), the given indices (a tensor), or all."""
    if isinstance(logits_to_keep, torch.Tensor):
        return hidden_states[:, logits_to_keep]
    return hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states


def first_supervised_query(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Per row, the input index just before the first supervised label (the attention-guided selection query at
    training time); rows without supervision fall back to their last valid token."""
    batch, length = labels.shape
    index = torch.arange(length, device=labels.device).expand(batch, -1)
    supervised = labels != -100
    first = torch.where(supervised, index, length).min(dim=-1).values - 1
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(supervised)
    last_valid = index.masked_fill(~valid, -1).max(dim=-1).values
    return torch.where(supervised.any(-1) & (first >= 0), first, last_valid)


class TimeViperForConditionalGeneration(TimeViperPreTrainedModel, TimeViperGenerationMixin):
    # The Trainer passes `num_items_in_batch` (the supervised-token count over all accumulation steps) to models that
    # say they take it; forward() names it explicitly rather than behind a **kwargs.
    accepts_loss_kwargs = True
    default_auto_class = "AutoModelForImageTextToText"

    def __init__(self, config: TimeViperConfig):
        super().__init__(config)
        self.model = TimeViperModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def get_video_features(self, pixel_values_videos):
        return self.model.get_video_features(pixel_values_videos)

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values)

    def encode_video(self, pixel_chunks, num_frames: int | None = None, features_device=None):
        return self.model.encode_video(pixel_chunks, num_frames, features_device)

    def streamed_video_features(self, streams):
        return self.model.streamed_video_features(streams)

    def encode_video_state(self, input_ids, video_features=None, pixel_values_videos=None,
                           prefill_chunk_size: int = 16384) -> TimeViperVideoState:
        """Prefills the prompt up to the video's last placeholder once, for any number of questions after it
        (`TimeViperVideoState`). `input_ids`: (1, length), a prompt with the video (the text after the video is
        ignored); the video as `video_features` (`encode_video`, `streamed_video_features`) or pixel values."""
        return TimeViperVideoState.prefill(self, input_ids, video_features, pixel_values_videos, prefill_chunk_size)

    @torch.no_grad()
    def init_transfer_from_nearest_attention(self) -> None:
        """Initialise every TransV module by `transfer_init_sources`, so that TransV starts as plain dropping."""
        parameters = dict(self.model.language_model.named_parameters())
        for target, source in transfer_init_sources(self.config).items():
            parameters[target].copy_(parameters[source] if source is not None else torch.zeros_like(parameters[target]))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: TimeViperHybridCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        compression_query_positions: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        video_features: torch.FloatTensor | None = None,
        prefill_chunk_size: int | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        cache: TimeViperHybridCache | None = None,
    ) -> TimeViperCausalLMOutputWithPast:
        r"""
        position_ids: ignored; positions follow from `attention_mask` and are renumbered after each compression.
        labels: (batch, seq) next-token targets at the input positions, -100 where unsupervised; shifted at the input
            positions, then following the tokens that compression keeps.
        logits_to_keep: logits of the last N positions only (full-vocabulary logits of a long video would be tens of
            GB); 0 keeps all. Ignored with `labels`.
        compression_query_positions: (batch,) input index of the query token of attention-guided selection.
            Default: the token before the first supervised label when `labels` are given, else the last token.
        output_attentions: only False: attention weights are never materialised (O(L^2) for hour-long videos).
        num_items_in_batch: the loss is summed and divided by this (the Trainer's count over all gradient
            accumulation steps) instead of averaged over this batch's supervised tokens.
        Other arguments: see `TimeViperModel.forward`.
        """
        past_key_values = resolve_cache_argument(past_key_values, cache)
        if output_attentions:
            raise ValueError("output_attentions=True is not supported: TimeViper never materialises attention weights")
        if past_key_values is not None and past_key_values.is_static and past_key_values.is_prefilled:
            check_static_step_inputs(
                input_ids, pixel_values=pixel_values, pixel_values_videos=pixel_values_videos,
                inputs_embeds=inputs_embeds, labels=labels, output_hidden_states=output_hidden_states or None,
            )
            return TimeViperCausalLMOutputWithPast(
                logits=self.static_decode_step(input_ids, past_key_values), **{CACHE_NAME: past_key_values}
            )
        if prefill_chunk_size is not None and labels is not None:
            raise ValueError("prefill_chunk_size is an inference setting; it does not take labels")
        if past_key_values is None and (prefill_chunk_size is not None or (use_cache and not self.training)):
            past_key_values = TimeViperHybridCache()
        if compression_query_positions is None and labels is not None:
            compression_query_positions = first_supervised_query(labels, attention_mask)
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, pixel_values_videos=pixel_values_videos,
            attention_mask=attention_mask, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
            compression_query_positions=compression_query_positions, output_hidden_states=output_hidden_states,
            video_features=video_features, prefill_chunk_size=prefill_chunk_size,
            keep_last=logits_to_keep if isinstance(logits_to_keep, int) and logits_to_keep > 0 else None,
        )
        logits = self.lm_head(kept_for_logits(outputs.last_hidden_state, 0 if labels is not None else logits_to_keep))
        loss = None if labels is None else self.kept_token_loss(logits, labels, outputs.kept_positions, num_items_in_batch)
        output = TimeViperCausalLMOutputWithPast(
            loss=loss, logits=logits, kept_positions=outputs.kept_positions, **{CACHE_NAME: past_key_values},
            hidden_states=outputs.hidden_states, video_hidden_states=outputs.video_hidden_states,
            image_hidden_states=outputs.image_hidden_states,
        )
        return output if return_dict is not False else output.to_tuple()

    def kept_token_loss(self, logits, labels, kept_positions, num_items_in_batch) -> torch.Tensor:
        """Next-token loss of the kept positions: labels are shifted at the input positions, then gathered."""
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
        shift_labels = shift_labels.gather(1, kept_positions.clamp(min=0)).masked_fill(kept_positions < 0, -100)
        return ForCausalLMLoss(
            logits, None, self.config.text_config.vocab_size, shift_labels=shift_labels,
            num_items_in_batch=num_items_in_batch,
        )


# Pipeline


class TimeViperImageTextToTextPipeline(ImageTextToTextPipeline):
    """`pipeline("image-text-to-text")` for TimeViper (the config's `custom_pipelines` names this class).

    The stock batching pads dim 1 of every tensor as if it were the sequence, which would cut the processor's flat
    (frames, 3, H, W) tensor to one frame. Here each sample's frames travel as (1, frames, 3, H, W), are padded
    along the frames, and each row's own frames are taken back out before generate()."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Batched generation appends after the prompt: rows are padded on the left (transformers >= 5.25 does this
        # for every decoder-only model, older releases leave the tokenizer's side).
        if self.tokenizer is not None:
            self.tokenizer.padding_side = "left"

    def preprocess(self, *args, **kwargs):
        model_inputs = super().preprocess(*args, **kwargs)
        if model_inputs.get("pixel_values_videos") is not None:
            model_inputs["pixel_values_videos"] = model_inputs["pixel_values_videos"][None]
        return model_inputs

    def _forward(self, model_inputs, generate_kwargs=None):
        frames = model_inputs.get("pixel_values_videos")
        if frames is not None:
            model_inputs["pixel_values_videos"] = self.unpad_frames(model_inputs["input_ids"], frames)
        return super()._forward(model_inputs, generate_kwargs)

    def unpad_frames(self, input_ids: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """(rows, max frames, 3, H, W) padded per row on the tokenizer's padding side -> the flat (frames, 3, H, W)."""
        config = self.model.config
        counts = ((input_ids == config.video_token_id).sum(dim=1) // config.vision_tokens_per_frame).tolist()
        if frames.shape[0] != len(counts) or max(counts) > frames.shape[1]:
            raise ValueError(
                f"pixel_values_videos of shape {tuple(frames.shape)} do not hold {counts} frames for the batch rows"
            )
        left = self.tokenizer.padding_side == "left"
        rows = [row[row.shape[0] - count :] if left else row[:count] for row, count in zip(frames, counts)]
        return torch.cat(rows)


__all__ = [
    "TimeViperForConditionalGeneration",
    "TimeViperHybridCache",
    "TimeViperModel",
    "TimeViperPreTrainedModel",
    "TimeViperVideoState",
]
