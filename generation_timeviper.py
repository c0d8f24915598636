"""TimeViper's generation state and its generate() integration.

`TimeViperHybridCache` holds everything a generation carries from one forward call to the next; the generation mixin
picks the cache generate() runs on, passes a chunked prefill through, and decodes a static cache's steps as CUDA-graph
replays (`DecodeStepGraph`).
"""

from .configuration_timeviper import check_transformers_version  # noqa: F401  isort: skip

import torch
import torch.nn.functional as F
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache from `past_key_values` to `cache`: its generate() passes `cache=` to forward()
# and reads `outputs["cache"]`, and its ModelOutput turns a `past_key_values=` keyword into `cache=`. Older releases
# use `past_key_values` throughout. forward() takes either spelling; the outputs declare the installed release's.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

MAMBA_STORES = ("conv_states", "ssm_states")
KV_STORES = ("keys", "values")


class TimeViperHybridCache(Cache):
    """Generation state of the hybrid LLM.

    - Mamba blocks: `conv_states[i]` (batch, conv_dim, kernel-1) and `ssm_states[i]` (batch, heads, head_dim, state),
      constant in the sequence length.
    - Attention blocks: `keys[i]` / `values[i]` (batch, kv_heads, length_i, head_dim); length_i is the sequence
      length of the compression segment the block sits in, so it differs between blocks.
    - `segment_valid[s]`: (batch, length_s) token validity of segment s (segment 0 is the input, segment s > 0 what
      stage s-1 kept, left-padded). Decode steps extend every segment, and read masks and positions from them.
    - `transfer_memory[stage]`: keys, values and mask of the vision tokens a TransV stage dropped, so that decoded
      tokens absorb them as the prompt's text did.
    - `seen_tokens`: input tokens consumed so far (uncompressed), which `generate()` uses to slice new inputs.

    The methods below are the only writers of this state. It derives from `Cache` for generate()'s checks, not from
    transformers' per-layer caches: attention blocks here hold keys of different lengths, a Mamba state is no
    key/value pair, and the cache-layer interface changed within transformers 5.13-5.25.
    """

    is_compileable = False

    # Decode steps append into buffers with this many spare tokens, so `keys[i]` / `values[i]` become views of
    # them: re-concatenating at every step would move twice the whole cache per token.
    KV_SPARE_TOKENS = 256

    def __init__(self, max_length: int | None = None):
        """max_length: None grows the cache as tokens come. An int makes it static: at the first decode step every
        growing tensor moves into a buffer of room for `max_length` tokens, written in place from then on, so that
        a decode step on CUDA can be captured once as a CUDA graph and replayed (`DecodeStepGraph`)."""
        super().__init__(layers=[])
        self.max_length = max_length
        self.conv_states: dict[int, torch.Tensor] = {}
        self.ssm_states: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.transfer_memory: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.segment_valid: list[torch.Tensor] = []
        self.seen_tokens = 0
        self._kv_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # see update()
        # Chunked prefill knows each attention block's final prompt length up front: its first update allocates
        # that much at once instead of regrowing (copying) the keys/values at every chunk.
        self._reserved_lengths: dict[int, int] = {}
        # Static decoding, once the buffers exist: prompt length of every segment and attention block (where decode
        # step t writes, at base + t), t itself as a device tensor (a CUDA graph reads it), and the captured step.
        self.segment_base: list[int] | None = None
        self.kv_base: dict[int, int] = {}
        self.decode_step: torch.Tensor | None = None
        self.decode_graph: DecodeStepGraph | None | bool = None  # False: capture failed, decode eagerly
        # A cache forked from a `TimeViperVideoState`: its next forward call is the question after the video.
        self.resume = None

    def __len__(self):
        return len(self.segment_valid)

    @property
    def is_prefilled(self) -> bool:
        return self.seen_tokens > 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def add_prompt_tokens(self, length: int) -> None:
        self.seen_tokens += length

    def open_segment(self, valid: torch.Tensor, attention_layers=()) -> None:
        """The prefill reaches compression segment `len(self)`, of token validity `valid`. `attention_layers`: the
        attention blocks of the segment whose keys/values a chunked prefill appends (their room is reserved)."""
        self.segment_valid.append(valid)
        # A static cache later needs room for the generated tokens after the prompt: reserved now, it is not a copy.
        room = max(self.max_length - self.seen_tokens, 0) if self.is_static else 0
        for layer_idx in attention_layers:
            self._reserved_lengths[layer_idx] = valid.shape[1] + room

    def append_tokens(self, valid: torch.Tensor) -> list[torch.Tensor]:
        """New tokens after the cached ones (a decode step, or a question after a video state), of validity `valid`
        (batch, length): returns every segment's key validity for them. A static cache marks the step's slot in
        its buffers (the slots after it stay invalid)."""
        self.seen_tokens += valid.shape[1]
        if self.has_static_buffers:
            for base, segment in zip(self.segment_base, self.segment_valid):
                segment.index_fill_(1, self.decode_step + base, True)
        else:
            self.segment_valid = [torch.cat([segment, valid], dim=1) for segment in self.segment_valid]
        return self.segment_valid

    def take_resume(self):
        """Where a fork of a video state resumes (see `TimeViperVideoState`): given once, to its first call."""
        resume, self.resume = self.resume, None
        return resume

    def store_transfer_memory(self, stage_index: int, memories: list) -> None:
        """Per-row TransV memories (key, value) of different lengths, or None for a row that dropped nothing."""
        if any(memory is not None for memory in memories):
            self.transfer_memory[stage_index] = stack_memories(memories)

    def mamba_state(self, layer_idx: int):
        if layer_idx not in self.ssm_states:
            return None
        return self.conv_states[layer_idx], self.ssm_states[layer_idx]

    def set_mamba_state(self, layer_idx: int, state) -> None:
        if not self.has_static_buffers:
            self.conv_states[layer_idx], self.ssm_states[layer_idx] = state
            return
        for store, new in zip((self.conv_states, self.ssm_states), state):
            if new is not store[layer_idx]:  # the fused kernel already updated the SSM state in place
                store[layer_idx].copy_(new)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        """Appends (or, on a static cache's decode step, writes in place) a block's new keys/values; returns all of
        them. `cache_kwargs` is the `Cache.update` argument transformers' attention layers pass; none is needed."""
        if self.has_static_buffers:
            index = self.decode_step + self.kv_base[layer_idx]
            self.keys[layer_idx].index_copy_(2, index, key_states)
            self.values[layer_idx].index_copy_(2, index, value_states)
            return self.keys[layer_idx], self.values[layer_idx]
        if layer_idx not in self.keys:
            if layer_idx not in self._reserved_lengths:
                self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
                return key_states, value_states
            self.keys[layer_idx], self.values[layer_idx] = key_states[..., :0, :], value_states[..., :0, :]
        old_keys, old_values = self.keys[layer_idx], self.values[layer_idx]
        length, new = old_keys.shape[-2], key_states.shape[-2]
        buffers = self._kv_buffers.get(layer_idx)
        if buffers is None or buffers[0].data_ptr() != old_keys.data_ptr() or buffers[0].shape[-2] < length + new:
            capacity = max(length + new + self.KV_SPARE_TOKENS, self._reserved_lengths.pop(layer_idx, 0))
            buffers = tuple(old.new_empty(*old.shape[:-2], capacity, old.shape[-1]) for old in (old_keys, old_values))
            buffers[0][..., :length, :] = old_keys
            buffers[1][..., :length, :] = old_values
            self._kv_buffers[layer_idx] = buffers
        buffers[0][..., length : length + new, :] = key_states
        buffers[1][..., length : length + new, :] = value_states
        self.keys[layer_idx] = buffers[0][..., : length + new, :]
        self.values[layer_idx] = buffers[1][..., : length + new, :]
        return self.keys[layer_idx], self.values[layer_idx]

    @property
    def is_static(self) -> bool:
        return self.max_length is not None

    @property
    def has_static_buffers(self) -> bool:
        return self.decode_step is not None

    def begin_static_step(self) -> None:
        """Host-side checks of a static decode step; allocates the buffers at the first one."""
        if not self.has_static_buffers:
            self._allocate_static_buffers()
        if self.seen_tokens >= self.max_length:
            raise ValueError(
                f"the static cache is full: it was made for {self.max_length} tokens (prompt + generated); "
                "generate() sizes it from max_new_tokens / max_length"
            )

    def end_static_step(self, length: int) -> None:
        self.decode_step.add_(length)

    def _allocate_static_buffers(self) -> None:
        room = self.max_length - self.seen_tokens
        if room < 1:
            raise ValueError(
                f"the static cache holds {self.max_length} tokens but the prompt already has {self.seen_tokens}"
            )
        self.segment_base = [valid.shape[1] for valid in self.segment_valid]
        self.segment_valid = [F.pad(valid, (0, room), value=False) for valid in self.segment_valid]
        for which, store in enumerate((self.keys, self.values)):
            for layer_idx, tensor in store.items():
                self.kv_base[layer_idx] = tensor.shape[-2]
                store[layer_idx] = self._with_room(layer_idx, which, tensor, room)
        self._kv_buffers = {}  # never keep a second copy of the cache alive
        self.decode_step = torch.zeros(1, dtype=torch.long, device=self.segment_valid[0].device)

    def _with_room(self, layer_idx: int, which: int, tensor: torch.Tensor, room: int) -> torch.Tensor:
        """`tensor` followed by `room` zeros: in place when it is the start of a buffer that has the room (a chunked
        prefill reserves it), else a padded copy (twice the block's keys/values at that moment). Zero-filled:
        unwritten slots are masked, but a NaN there would still poison `probabilities @ values`."""
        buffers = self._kv_buffers.get(layer_idx)
        length = tensor.shape[-2]
        if buffers is not None and buffers[which].data_ptr() == tensor.data_ptr():
            if buffers[which].shape[-2] >= length + room:
                grown = buffers[which][..., : length + room, :]
                grown[..., length:, :].zero_()
                return grown
        return F.pad(tensor, (0, 0, 0, room))

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state under a stable name (a saved video state's file uses these names)."""
        named = {f"{store}.{i}": t for store in (*MAMBA_STORES, *KV_STORES) for i, t in getattr(self, store).items()}
        named.update({f"segment_valid.{s}": valid for s, valid in enumerate(self.segment_valid)})
        for stage_index, memory in self.transfer_memory.items():
            named.update({f"transfer_memory.{stage_index}.{i}": tensor for i, tensor in enumerate(memory)})
        return named

    def load_named_tensors(self, named: dict[str, torch.Tensor], seen_tokens: int) -> None:
        """Replaces the state by `named` (as `named_tensors` gives it) after `seen_tokens` input tokens."""
        for store in (*MAMBA_STORES, *KV_STORES):
            setattr(self, store, {})
        memory: dict[int, list] = {}
        segments = {}
        for name, tensor in named.items():
            store, _, index = name.partition(".")
            if store == "segment_valid":
                segments[int(index)] = tensor
            elif store == "transfer_memory":
                stage_index, part = index.split(".")
                memory.setdefault(int(stage_index), [None] * 3)[int(part)] = tensor
            else:
                getattr(self, store)[int(index)] = tensor
        self.segment_valid = [segments[s] for s in range(len(segments))]
        self.transfer_memory = {stage_index: tuple(parts) for stage_index, parts in memory.items()}
        self.seen_tokens = seen_tokens
        self._kv_buffers = {}

    def fork(self, resume=None) -> "TimeViperHybridCache":
        """A dynamic cache that continues from this one: it shares the keys/values, validity and TransV memory, which
        it never writes in place, and copies the Mamba states, which a fused decode kernel updates in place.
        `resume`: see `TimeViperVideoState`."""
        fork = TimeViperHybridCache()
        mamba = tuple(f"{store}." for store in MAMBA_STORES)
        named = {name: t.clone() if name.startswith(mamba) else t for name, t in self.named_tensors().items()}
        fork.load_named_tensors(named, self.seen_tokens)
        fork.resume = resume
        return fork

    def memory_bytes(self) -> int:
        tensors = [t for store in (*MAMBA_STORES, *KV_STORES) for t in getattr(self, store).values()]
        tensors += [t for memory in self.transfer_memory.values() for t in memory[:2]]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _map_tensors(self, fn) -> None:
        if not self.has_static_buffers:
            self.load_named_tensors({name: fn(t) for name, t in self.named_tensors().items()}, self.seen_tokens)
            return
        # Beam reordering of a static cache: same shapes, same addresses (a captured decode step keeps working).
        for tensor in self.named_tensors().values():
            mapped = fn(tensor)
            # Batch surgery changes every tensor's batch alike, so a refusal comes at the first one, before any copy.
            if mapped.shape != tensor.shape:
                raise ValueError(
                    "a static cache keeps its batch size once decoding has started; to change the batch in the "
                    "middle of generation, use a dynamic cache (generate(..., cache_implementation='dynamic'))"
                )
            tensor.copy_(mapped)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_tensors(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_tensors(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_tensors(lambda t: t[indices])

    def crop(self, max_length: int) -> None:
        raise ValueError("TimeViperHybridCache cannot be cropped: Mamba states cannot be rewound to an earlier token")

    def reset(self) -> None:
        self.__init__(self.max_length)


def stack_memories(memories):
    """Per-row TransV memories (key, value) of different lengths, or None -> padded key, value (b, kv_heads, m,
    head_dim) and a (b, 1, 1, m) mask. A row without memory attends to one zero key/value, i.e. adds nothing."""
    if len(memories) == 1 and memories[0] is not None:  # one row: views, no padded copy of a memory of many GB
        key, value = memories[0]
        return key[None], value[None], torch.ones(1, 1, 1, key.shape[1], dtype=torch.bool, device=key.device)
    reference = next(memory[0] for memory in memories if memory is not None)
    kv_heads, _, head_dim = reference.shape
    length = max(1, max(memory[0].shape[1] for memory in memories if memory is not None))
    keys, values, masks = [], [], []
    for memory in memories:
        key, value = memory if memory is not None else (reference.new_zeros(kv_heads, 0, head_dim),) * 2
        pad = length - key.shape[1]
        keys.append(F.pad(key, (0, 0, 0, pad)))
        values.append(F.pad(value, (0, 0, 0, pad)))
        mask = torch.arange(length, device=key.device) < key.shape[1]
        masks.append(mask if key.shape[1] > 0 else torch.ones_like(mask))
    return torch.stack(keys), torch.stack(values), torch.stack(masks)[:, None, None, :]


def resolve_cache_argument(past_key_values, cache):
    """The cache a forward() call was given, under either name (see CACHE_NAME)."""
    if past_key_values is not None and cache is not None:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`, not both")
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, TimeViperHybridCache):
        raise TypeError(
            f"the cache must be a TimeViperHybridCache, got {type(cache).__name__}; generate() creates one, or pass "
            "TimeViperHybridCache() yourself"
        )
    return cache


# Static decoding: one decode step captured as a CUDA graph


def check_static_step_inputs(input_ids, **others) -> None:
    """A static cache takes one new token id per row and step; anything else needs a dynamic cache."""
    given = [name for name, value in others.items() if value is not None]
    if input_ids is not None and input_ids.shape[1] == 1 and not given:
        return
    got = ", ".join(given) if given else f"input_ids of shape {None if input_ids is None else tuple(input_ids.shape)}"
    raise ValueError(
        f"a static cache decodes one new token id per row and step, got {got}; for more, use a dynamic cache: "
        "TimeViperHybridCache() or generate(..., cache_implementation='dynamic')"
    )


class DecodeStepGraph:
    """One decode step of a static cache, captured as a CUDA graph and replayed for every later token.

    Eager decoding issues thousands of small kernels per token from Python, whose launch time exceeds the GPU work;
    a replay launches them all at once. The graph reads and writes only the static cache's fixed buffers, the
    input-id buffer below and the step counter on the device. Capture needs one eager step of the same shapes before
    it (Triton compilation, cuBLAS workspaces): `first_step`."""

    def __init__(self, model, cache: TimeViperHybridCache, input_ids):
        self.cache = cache
        self.input_ids = input_ids.clone()
        self.graph = torch.cuda.CUDAGraph()
        seen_tokens = cache.seen_tokens
        try:
            with torch.cuda.graph(self.graph):
                self.logits = model.eager_decode_step(self.input_ids, cache)
        finally:
            cache.seen_tokens = seen_tokens  # capture ran the step's Python (the count) but none of its kernels

    @staticmethod
    def first_step(model, cache: TimeViperHybridCache, input_ids):
        """The first decode step, run eagerly on a side stream (where warm-up before a capture belongs)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = model.eager_decode_step(input_ids, cache)
        torch.cuda.current_stream().wait_stream(stream)
        return logits

    def __call__(self, input_ids: torch.LongTensor) -> torch.Tensor:
        if input_ids.shape != self.input_ids.shape:
            raise ValueError(
                f"this static cache decodes a batch of shape {tuple(self.input_ids.shape)}, got {tuple(input_ids.shape)}"
            )
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        self.cache.seen_tokens += input_ids.shape[1]
        return self.logits.clone()  # the graph's output buffer is overwritten by the next replay


# generate()


class TimeViperGenerationMixin(GenerationMixin):
    """generate() for TimeViper: its own cache, chunked prefill, static decode steps as CUDA-graph replays, and
    questions asked of a prefilled video (`TimeViperVideoState`)."""

    def generate_from_video_state(self, state, input_ids, **generate_kwargs):
        """`generate()` for the whole prompt `input_ids` (1, length), which starts with the state's prefix: only
        the question's part is prefilled. Returns generate()'s output (the prompt followed by the new tokens)."""
        inputs = state.question_inputs(input_ids)
        return self.generate(
            input_ids=input_ids, attention_mask=inputs["attention_mask"], **{CACHE_NAME: inputs["past_key_values"]},
            **generate_kwargs,
        )

    def static_decode_step(self, input_ids: torch.LongTensor, cache: TimeViperHybridCache) -> torch.Tensor:
        """Logits (b, 1, vocab) of one decode step on a static cache: a CUDA-graph replay on CUDA (captured at the
        first step of this cache), the same computation run eagerly elsewhere. Every new token counts as valid, as
        in generate(), which extends the attention mask with ones."""
        cache.begin_static_step()
        if not input_ids.is_cuda or cache.decode_graph is False:
            return self.eager_decode_step(input_ids, cache)
        if cache.decode_graph is not None:
            return cache.decode_graph(input_ids)
        logits = DecodeStepGraph.first_step(self, cache, input_ids)
        try:
            cache.decode_graph = DecodeStepGraph(self, cache, input_ids)
        except RuntimeError as err:  # the output stays right, only slower: say so once, decode eagerly
            logger.warning("CUDA-graph capture of the decode step failed (%s); decoding eagerly instead", err)
            cache.decode_graph = False
        return logits

    def eager_decode_step(self, input_ids: torch.LongTensor, cache: TimeViperHybridCache) -> torch.Tensor:
        return self.lm_head(self.model(input_ids=input_ids, past_key_values=cache).last_hidden_state)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        """generate()'s cache: static (CUDA-graph decode steps) by default on CUDA or with
        `cache_implementation="static"`; dynamic elsewhere or with `cache_implementation="dynamic"`, which a returned
        cache needs to take a multi-token continuation."""
        user_cache = resolve_cache_argument(model_kwargs.pop("past_key_values", None), model_kwargs.pop("cache", None))
        implementation = generation_config.cache_implementation
        if implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported by TimeViper: use 'dynamic' (default) or "
                "'static' (preallocated, CUDA-graph decoding)"
            )
        if user_cache is None and generation_config.use_cache is not False:
            static = implementation == "static" or (implementation is None and self.device.type == "cuda")
            user_cache = TimeViperHybridCache(max_cache_length if static else None)
        if user_cache is not None:
            model_kwargs[CACHE_NAME] = user_cache

    def prepare_inputs_for_generation(self, input_ids, **model_kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, **model_kwargs)
        # Positions follow from the attention mask and are renumbered after each compression stage.
        model_inputs.pop("position_ids", None)
        cache = model_inputs.get(CACHE_NAME)
        if cache is not None and cache.is_prefilled:
            # The frames were encoded at prefill; decode steps feed only the new tokens (transformers < 5.15 passes
            # every generate() keyword to every step).
            for name in ("pixel_values", "pixel_values_videos", "video_features"):
                model_inputs.pop(name, None)
        return model_inputs

    def _prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        """generate(..., prefill_chunk_size=N): transformers would call forward on slices of the prompt, but a
        compression stage selects among all of a row's vision tokens, so one forward call chunks the prefill inside
        (`ChunkedPrefill`), with the same result as an unchunked prefill."""
        chunk_size = generation_config.prefill_chunk_size
        if chunk_size is None:
            return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
        generation_config.prefill_chunk_size = None
        try:
            model_kwargs = {**model_kwargs, "prefill_chunk_size": chunk_size}
            return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
        finally:
            generation_config.prefill_chunk_size = chunk_size
