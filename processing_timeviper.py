# Copyright 2026 The TimeViper authors. Licensed under the Apache License, Version 2.0.
"""The TimeViper processor: prompts and chat templates, placeholder expansion and labels, on transformers'
`ProcessorMixin` (which merges the kwargs, tokenises and pads). A Hub remote-code file; it re-exports the video and
image processors of video_processing_timeviper.
"""

import os

import torch

# First: the configuration's transformers version guard, before the imports an unsupported release may lack.
from .configuration_timeviper import check_transformers_version  # noqa: F401  isort: skip

from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, TextKwargs
from transformers.video_processing_utils import BaseVideoProcessor

from .video_processing_timeviper import (  # noqa: F401  re-exported: one import path for the processing API
    SAMPLING_KEYS, TimeViperImageProcessor, TimeViperVideoMetadata, TimeViperVideoProcessor,
    TimeViperVideoProcessorKwargs, VideoDecodeError, VideoStream, decode_video_pyav, reference_eval_indices,
    rescale_and_normalize, sample_frame_indices, transform_frames, uniform_indices, _check_known, _source_and_options,
)


IGNORE_INDEX = -100

# Prompts (the reference implementation's templates and evaluation prompts)

MCQ_ANSWER_PROMPT = "Best Option: ("
MCQ_INSTRUCTION = "Please provide your answer by stating the letter followed by the full option."
GROUNDING_PREAMBLE = "The video lasts for {} seconds, and {} frames are uniformly sampled from it."

# Content items render in order with no separator: a video item is the single placeholder "<video>" (the processor
# expands it to frames x tokens_per_frame), an image item is "<image>", a text item is its text.
_RENDER_CONTENT_MACRO = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'video' -%}{{ '<video>' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- else -%}{{ raise_exception('Unsupported content type: ' ~ item['type']) }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

# Nemotron-Nano base (`nano_base`):
#   <SPECIAL_10>System\n{system}<SPECIAL_12>\n<SPECIAL_11>User\n{user}\n<SPECIAL_12>
#   <SPECIAL_11>Assistant\n{answer}\n<SPECIAL_12>          (no newlines between the lines shown here)
NEMOTRON_H_CHAT_TEMPLATE = (
    _RENDER_CONTENT_MACRO
    + "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = render_content(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system_text = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{ '<SPECIAL_10>System\\n' ~ system_text ~ '<SPECIAL_12>\\n' }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<SPECIAL_11>User\\n' ~ render_content(message['content']) ~ '\\n<SPECIAL_12>' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<SPECIAL_11>Assistant\\n' ~ render_content(message['content']) ~ '\\n<SPECIAL_12>' }}"
    "{%- else -%}{{ raise_exception('Unsupported role: ' ~ message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<SPECIAL_11>Assistant\\n' }}{%- endif -%}"
)

# Qwen2 (`qwen2`/`default`); turns are joined by "\n", and there is no newline after the last turn:
#   <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>
#   \n<|im_start|>assistant\n{answer}<|im_end|>          (no newlines between the lines shown here)
QWEN2_CHAT_TEMPLATE = (
    _RENDER_CONTENT_MACRO
    + "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = render_content(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system_text = 'You are a helpful assistant.' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{ '<|im_start|>system\\n' ~ system_text ~ '<|im_end|>' }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] in ['user', 'assistant'] -%}"
    "{{ '\\n<|im_start|>' ~ message['role'] ~ '\\n' ~ render_content(message['content']) ~ '<|im_end|>' }}"
    "{%- else -%}{{ raise_exception('Unsupported role: ' ~ message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n<|im_start|>assistant\\n' }}{%- endif -%}"
)

CHAT_TEMPLATES = {"nemotron_h": NEMOTRON_H_CHAT_TEMPLATE, "qwen2": QWEN2_CHAT_TEMPLATE}

# Token that closes every turn (as in the reference's label builder) -> the text starting a supervised assistant span.
_ASSISTANT_HEADERS = {"<SPECIAL_12>": "<SPECIAL_11>Assistant\n", "<|im_end|>": "\n<|im_start|>assistant\n"}


def get_chat_template(backbone: str) -> str:
    """Return the chat template of a language backbone: ``"nemotron_h"`` (Nemotron-Nano base) or ``"qwen2"``."""
    if backbone not in CHAT_TEMPLATES:
        raise ValueError(f"Unknown backbone {backbone!r}; expected one of {sorted(CHAT_TEMPLATES)}.")
    return CHAT_TEMPLATES[backbone]


def mcq_prompt(question: str, options: list[str], add_letters: bool | None = None) -> str:
    """The reference multiple-choice question text: the question, the options and `MCQ_INSTRUCTION`, one per line.
    Options get ``"A. "``, ``"B. "``, ... if ``add_letters``, or if None unless every option already starts with its
    letter and a dot (VideoMME style). Start the answer with `MCQ_ANSWER_PROMPT`."""
    if not options:
        raise ValueError("mcq_prompt needs at least one option.")
    letters = [chr(ord("A") + i) for i in range(len(options))]
    if add_letters is None:
        add_letters = not all(opt.startswith(f"{letter}.") for letter, opt in zip(letters, options))
    if add_letters:
        options = [f"{letter}. {opt}" for letter, opt in zip(letters, options)]
    return "\n".join([question, "\n".join(options), MCQ_INSTRUCTION])


def grounding_preamble(duration: float, num_frames: int) -> str:
    """The reference's time sentence for grounding prompts; ``duration`` formatted as given (``12`` -> ``"12"``)."""
    return GROUNDING_PREAMBLE.format(duration, num_frames)


# Labels


def build_labels(input_ids, separator_id: int, attention_mask=None, ignore_ids=(), ignore_index: int = IGNORE_INDEX):
    """Labels that supervise only assistant turns (the reference's ``_create_labels``) of a chat-template render: a
    system turn, then user and assistant turns, each closed by `separator_id`. With separator positions ``s_0, s_1,
    ...`` the tokens ``(s_i, s_{i+1}]`` for odd ``i`` are supervised; all else is ``ignore_index``, as are padding
    and ``ignore_ids``. `input_ids`: one sequence or a batch, lists or a tensor; the labels have its type and shape.
    """
    rows, single = _as_rows(input_ids)
    masks = [None] * len(rows) if attention_mask is None else _as_rows(attention_mask)[0]
    ignore = set(int(i) for i in ignore_ids if i is not None)
    labels = []
    for row, row_mask in zip(rows, masks):
        valid = [True] * len(row) if row_mask is None else [bool(m) for m in row_mask]
        seps = [p for p, (tok, ok) in enumerate(zip(row, valid)) if ok and tok == separator_id]
        row_labels = [ignore_index] * len(row)
        for i in range(1, len(seps) - 1, 2):
            for p in range(seps[i] + 1, seps[i + 1] + 1):
                if valid[p] and row[p] not in ignore:
                    row_labels[p] = row[p]
        labels.append(row_labels)
    labels = labels[0] if single else labels
    return torch.tensor(labels, dtype=torch.long) if isinstance(input_ids, torch.Tensor) else labels


def _as_rows(values) -> tuple[list[list], bool]:
    """One sequence or a batch (lists or a tensor) -> its rows as lists, and whether it was one sequence."""
    values = values.tolist() if isinstance(values, torch.Tensor) else values
    single = len(values) == 0 or not isinstance(values[0], (list, tuple))
    return ([list(values)] if single else [list(row) for row in values]), single


# Processor


class TimeViperProcessorKwargs(ProcessingKwargs, total=False):
    videos_kwargs: TimeViperVideoProcessorKwargs
    # No BOS and no token type ids, as the reference tokenises.
    _defaults = {"text_kwargs": {"add_special_tokens": False, "return_token_type_ids": False}}


class TimeViperProcessor(ProcessorMixin):
    r"""TimeViper processor: tokenizer + `TimeViperVideoProcessor` + `TimeViperImageProcessor` + chat template.

    Each ``<video>`` in the text is expanded to ``num_frames * tokens_per_frame`` copies, each ``<image>`` to
    ``tokens_per_frame`` (the model config's ``vision_tokens_per_frame``): one per vision embedding. The image
    processor defaults to the video processor's size; the tokenizer must know both placeholders as tokens;
    ``turn_separator`` (the token closing each turn, for labels) is inferred from the chat template when None.
    """

    valid_processor_kwargs = TimeViperProcessorKwargs

    def __init__(self, image_processor=None, video_processor=None, tokenizer=None, chat_template=None,
                 tokens_per_frame: int = 16, video_token: str = "<video>", image_token: str = "<image>",
                 turn_separator: str | None = None):
        if video_processor is None:
            video_processor = TimeViperVideoProcessor()
        if image_processor is None:
            size = video_processor.size
            image_processor = TimeViperImageProcessor(size={"height": size["height"], "width": size["width"]})
        if not isinstance(tokens_per_frame, int) or tokens_per_frame < 1:
            raise ValueError(f"tokens_per_frame must be a positive integer, got {tokens_per_frame!r}.")
        self.tokens_per_frame, self.video_token, self.image_token = tokens_per_frame, video_token, image_token
        if turn_separator is None and isinstance(chat_template, str):
            turn_separator = next((sep for sep in _ASSISTANT_HEADERS if sep in chat_template), None)
        self.turn_separator = turn_separator
        super().__init__(image_processor, video_processor, tokenizer, chat_template=chat_template)
        self.video_token_id = self._token_id(video_token)
        self.image_token_id = self._token_id(image_token)

    def check_argument_for_proper_class(self, argument_name, argument):
        # Without torchvision, `transformers.BaseVideoProcessor` is a dummy placeholder class, so the base check would
        # reject every video processor; check against the real base class instead.
        if argument_name == "video_processor":
            if not isinstance(argument, BaseVideoProcessor):
                raise TypeError(f"video_processor must be a BaseVideoProcessor, got {type(argument).__name__}.")
            return BaseVideoProcessor
        return super().check_argument_for_proper_class(argument_name, argument)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            raise ValueError(f"The tokenizer has no token {token!r}; add it with `tokenizer.add_special_tokens("
                             f"{{'additional_special_tokens': [{token!r}]}})` before building the processor (and size "
                             "the model's embeddings accordingly).")
        return token_id

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        # Every saved processor names its Auto classes and carries its files (transformers writes both only for
        # registered classes), as every saved TimeViper model does.
        for cls in (type(self), TimeViperVideoProcessor, TimeViperImageProcessor):
            cls.register_for_auto_class()
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def check_model_config(self, config) -> None:
        """Raise unless this processor expands each frame into ``config.vision_tokens_per_frame`` placeholders."""
        if self.tokens_per_frame != config.vision_tokens_per_frame:
            raise ValueError(f"The processor expands each frame into {self.tokens_per_frame} placeholder tokens, but "
                             f"the model embeds {config.vision_tokens_per_frame} per frame ({config.projector_type} "
                             "projector): the processor belongs to another model. Save it with "
                             "tokens_per_frame=config.vision_tokens_per_frame.")

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values_videos", "pixel_values"]

    # -- placeholder expansion (transformers' ProcessorMixin hooks) --------------------------------------------------

    # Newer releases pass the modality's kwargs along to these hooks; the expansion does not depend on them.
    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        num_frames = int(video_inputs["video_num_frames"][video_idx])
        return self.video_token * (num_frames * self.tokens_per_frame)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.tokens_per_frame

    def get_text_with_replacements(self, text, images_replacements=(), videos_replacements=(), audio_replacements=()):
        # The base class expands placeholders without checking that each stands for exactly one given video/image.
        for kind, token, given in (("video", self.video_token, len(videos_replacements)),
                                   ("image", self.image_token, len(images_replacements))):
            found = sum(sample.count(token) for sample in text)
            if found != given:
                raise ValueError(f"The text has {found} {token} placeholder(s) but {given} {kind}(s) were given; put "
                                 f"exactly one {token} in the text per {kind} (they are matched in order across the "
                                 "batch).")
        return super().get_text_with_replacements(text, list(images_replacements), list(videos_replacements),
                                                  list(audio_replacements))

    def _process_videos(self, videos, **kwargs):
        # One replacement per processed video: the base class counts the inputs with transformers' video helpers,
        # which do not know paths with per-video sampling dicts or nested per-sample lists.
        processed = self.video_processor(videos, **kwargs)
        return processed, [self.replace_video_token(processed, i) for i in range(len(processed["video_num_frames"]))]

    def _process_images(self, images, **kwargs):
        processed = self.image_processor(images, **kwargs)
        return processed, [self.replace_image_token(processed, i) for i in range(len(processed["pixel_values"]))]

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        # The base class's placeholder count (newer releases) flattens videos with transformers' helpers, which do
        # not know our inputs; `get_text_with_replacements` counts them once processed.
        if images is None and text is None and videos is None:
            raise ValueError("Pass at least one of `text`, `videos` or `images`.")
        if text is not None and not all(isinstance(sample, str) for sample in text):
            raise TypeError("`text` must be a string or a list of strings.")

    # -- main entry --------------------------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, videos=None, **kwargs) -> BatchFeature:
        r"""Process text with ``<video>``/``<image>`` placeholders and the videos and images they stand for (one per
        placeholder, in order across the batch; nested per-sample lists of videos are flattened).

        `kwargs`: the video processor's, the image processor's and the tokenizer's (``add_special_tokens`` defaults
        to False, as the reference), flat or grouped as ``text_kwargs``/``videos_kwargs``/``images_kwargs``; any
        other keyword is an error. ``return_labels=True`` adds ``labels`` (`build_labels`); ``return_metadata=True``
        adds ``video_metadata`` and ``video_num_frames``.
        """
        if text is None and isinstance(images, str) and "://" not in images and not os.path.isfile(images):
            images, text = None, images  # processor("some text"): a positional string is text, not an image
        unknown = set(kwargs) - self._call_kwargs()
        if unknown:  # transformers' kwargs merging would only log and drop them
            raise TypeError(f"Unexpected keyword argument(s) {sorted(unknown)} for {type(self).__name__}.__call__; "
                            "see its docstring for the video, image and tokenizer kwargs.")
        return_labels = kwargs.pop("return_labels", False)
        if return_labels and text is None:
            raise ValueError("`return_labels=True` needs `text`.")
        if text is not None:
            text = [text] if isinstance(text, str) else list(text)
        outputs = super().__call__(images=images, text=text, videos=videos, **kwargs)
        if not kwargs.get("return_metadata"):
            outputs.pop("video_num_frames", None)
        if return_labels:
            outputs["labels"] = self._labels_for(outputs["input_ids"], outputs.get("attention_mask"))
        return outputs

    def _call_kwargs(self) -> set[str]:
        """Every keyword `__call__` takes: the grouped dicts, each modality's kwargs and ``return_labels``."""
        keys = {"return_labels", *TimeViperProcessorKwargs.__annotations__, *TextKwargs.__annotations__}
        for processor in (self.video_processor, self.image_processor):
            keys.update(processor.valid_kwargs.__annotations__)
        return keys

    def encode_prompts(self, prompts: list[str], video_num_frames: list[int], **text_kwargs) -> BatchFeature:
        """Tokenise rendered prompts whose videos are sampled but not decoded here (`VideoStream`): each ``<video>``
        is expanded by its entry of `video_num_frames` (in order across the batch). `text_kwargs`: tokenizer kwargs
        (``padding``, ``padding_side``, ``return_tensors``, ...)."""
        _check_known(text_kwargs, TextKwargs.__annotations__, "tokenizer kwargs for encode_prompts")
        video_inputs = {"video_num_frames": list(video_num_frames)}
        replacements = [self.replace_video_token(video_inputs, i) for i in range(len(video_num_frames))]
        texts = self.get_text_with_replacements(list(prompts), [], replacements)[0]
        text_kwargs = self._merge_kwargs(TimeViperProcessorKwargs, text_kwargs=text_kwargs)["text_kwargs"]
        encoded = self.tokenizer(texts, **text_kwargs)
        self._check_special_mm_tokens(texts, encoded, modalities=["video"])
        return encoded

    # -- labels ------------------------------------------------------------------------------------------------------

    def _labels_for(self, input_ids, attention_mask):
        labels = self.build_labels(input_ids, attention_mask)
        for i, row_labels in enumerate(_as_rows(labels)[0]):
            if all(label == IGNORE_INDEX for label in row_labels):
                raise ValueError(f"Sample {i} has no complete assistant turn to supervise (labels requested). Add the "
                                 "assistant answer to the conversation, render without add_generation_prompt, and "
                                 "check that truncation did not cut it.")
        return labels

    def build_labels(self, input_ids, attention_mask=None):
        """Module-level `build_labels` with this processor's ``turn_separator``, ignoring the placeholders; raises
        ``ValueError`` unless every supervised span starts with the assistant header (e.g. without a system turn)."""
        if self.turn_separator is None:
            raise ValueError("Labels need the turn separator; build the processor with a TimeViper chat template or "
                             "pass `turn_separator` ('<SPECIAL_12>' for Nemotron-H, '<|im_end|>' for Qwen2).")
        placeholders = (self.video_token_id, self.image_token_id)
        labels = build_labels(input_ids, self._token_id(self.turn_separator), attention_mask, ignore_ids=placeholders)
        header = _ASSISTANT_HEADERS.get(self.turn_separator)
        if header is None:
            return labels
        for row_ids, row_labels in zip(_as_rows(input_ids)[0], _as_rows(labels)[0]):
            for span in _supervised_spans(row_ids, row_labels, placeholders):
                span_text = self.tokenizer.decode(span, skip_special_tokens=False)
                if not span_text.startswith(header):
                    raise ValueError(f"A supervised span starts with {span_text[:40]!r} instead of the assistant "
                                     f"header {header!r}: labels expect the chat-template layout (system turn, then "
                                     "alternating user/assistant turns).")
        return labels

    # -- chat template ----------------------------------------------------------------------------------------------

    def apply_chat_template(self, conversation, chat_template: str | None = None, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, tokenize: bool = False, return_dict: bool = False,
                            return_tensors=None, processor_kwargs: dict | None = None, return_labels: bool = False,
                            **template_kwargs):
        """Render conversations with the chat template and, with ``tokenize=True``, process them.

        Content items: ``{"type": "text", "text": ...}``, ``{"type": "video", "video"|"path"|"url": ..., <sampling
        options>}``, ``{"type": "image", "image"|"path"|"url": ...}``; videos are decoded by this package, not by
        transformers' loaders. Processor kwargs go in ``processor_kwargs`` or directly; others go to the template.
        """
        if template_kwargs.get("return_assistant_tokens_mask"):
            raise ValueError("Use `return_labels=True` for assistant-only labels with TimeViper templates.")
        processor_kwargs = dict(processor_kwargs or {})
        call_kwargs = self._call_kwargs()
        for key in [key for key in template_kwargs if key in call_kwargs]:
            processor_kwargs[key] = template_kwargs.pop(key)
        if return_labels:
            processor_kwargs["return_labels"] = True
        if return_tensors is not None:
            processor_kwargs["return_tensors"] = return_tensors
        prompt = super().apply_chat_template(
            conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tokenize=False, **template_kwargs,
        )
        if not tokenize:
            return prompt
        # The installed transformers decided what is a batch (its rule changed within 5.13-5.25): a list of prompts.
        is_batched = isinstance(prompt, list)
        videos, images = _conversation_media(conversation if is_batched else [conversation])
        out = self(text=prompt if is_batched else [prompt], videos=videos or None, images=images or None,
                   **processor_kwargs)
        return out if return_dict else out["input_ids"]


def _supervised_spans(row_ids, row_labels, placeholders) -> list[list[int]]:
    """The runs of supervised tokens of one row (placeholders inside a run belong to it)."""
    spans, current = [], []
    for token, label in zip(row_ids, row_labels):
        if label != IGNORE_INDEX or (current and token in placeholders):
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + [current] if current else spans


def _conversation_media(conversations) -> tuple[list, list]:
    """The video items and image sources of conversations, in order."""
    videos, images = [], []
    for conversation in conversations:
        for message in conversation.messages if hasattr(conversation, "messages") else conversation:
            content = message.get("content")
            for item in content if isinstance(content, (list, tuple)) else ():
                if not isinstance(item, dict):
                    continue
                if item.get("type") == "video":
                    _source_and_options(item)  # a video item without its source: an error before any decoding
                    videos.append(item)
                elif item.get("type") == "image":
                    keys = ("image", "path", "url", "base64")
                    source = next((item[key] for key in keys if item.get(key) is not None), None)
                    if source is None:
                        raise ValueError("An image item needs an 'image', 'path' or 'url' entry to be tokenized.")
                    images.append(source)
    return videos, images


def expand_video_placeholder(processor, text: str, num_frames: int) -> str:
    """`text` with its one ``<video>`` expanded for a video of `num_frames` sampled frames, as the processor expands
    it, through its public hooks only (which a checkpoint's own, older processing code has too)."""
    if text.count(processor.video_token) != 1:
        raise ValueError(f"expected one {processor.video_token} in the prompt (one video), found "
                         f"{text.count(processor.video_token)}: {text[:200]!r}")
    return text.replace(processor.video_token, processor.replace_video_token({"video_num_frames": [num_frames]}, 0))


def streaming_chat_inputs(processor, conversation, chunk_frames: int = 64, prefetch_chunks: int = 2,
                          add_generation_prompt: bool = True, **options):
    """`processor.apply_chat_template(..., tokenize=True)` for long videos: ``(inputs, streams)``, the prompts'
    ``input_ids`` and ``attention_mask`` as tensors and the videos opened as `VideoStream`s (in batch order) for
    `model.encode_video`. `options`: sampling and tokenizer options (a video item may override the sampling).
    """
    _check_known(options, {*SAMPLING_KEYS, *TextKwargs.__annotations__}, "keyword arguments for streaming_chat_inputs")
    sampling = {key: value for key, value in options.items() if key in SAMPLING_KEYS}
    text_kwargs = {key: value for key, value in options.items() if key not in SAMPLING_KEYS} | {"return_tensors": "pt"}
    prompts = processor.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    conversations, prompts = (conversation, prompts) if isinstance(prompts, list) else ([conversation], [prompts])
    videos, images = _conversation_media(conversations)
    if images:
        raise ValueError("streaming_chat_inputs streams videos; pass images through the processor.")
    streams = [VideoStream(video, processor.video_processor, chunk_frames, prefetch_chunks, **sampling)
               for video in videos]
    return processor.encode_prompts(prompts, [stream.num_frames for stream in streams], **text_kwargs), streams
