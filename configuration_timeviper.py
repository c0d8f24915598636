"""Configuration of TimeViper, a hybrid Mamba-Transformer video-language model.

The model is SigLIP (vision) -> ToMe token merging -> MLP projector -> a hybrid Nemotron-H LLM (or a Qwen2.5
transformer), with optional in-LLM token compression (dropping and TransV) described by `token_compression`.
"""

import json
from dataclasses import asdict, dataclass

import transformers
from packaging.specifiers import SpecifierSet

# The transformers releases this code is proven on (tests/compat runs the oldest, one middle and the newest). Outside
# them an import below can fail with a message about something else, or worse, the model can load and compute
# something else, so importing any of the remote-code files stops with this range instead.
SUPPORTED_TRANSFORMERS = ">=5.13,<5.26"


def check_transformers_version() -> None:
    installed = transformers.__version__
    if not SpecifierSet(SUPPORTED_TRANSFORMERS).contains(installed, prereleases=True):
        raise ImportError(
            f"TimeViper's model code works with transformers{SUPPORTED_TRANSFORMERS.replace(',', ', ')}; this "
            f"environment has transformers {installed}. Install a supported release: "
            f'pip install "transformers{SUPPORTED_TRANSFORMERS}"'
        )


check_transformers_version()

from transformers import AutoConfig, PretrainedConfig  # noqa: E402  (after the guard: older releases lack some)
from transformers.models.nemotron_h import NemotronHConfig  # noqa: E402
from transformers.models.qwen2 import Qwen2Config  # noqa: E402
from transformers.models.siglip import SiglipVisionConfig  # noqa: E402

# The Auto classes of every folder this code writes, whichever class saved it and however it was loaded.
AUTO_MAP = {
    "AutoConfig": "configuration_timeviper.TimeViperConfig",
    "AutoModel": "modeling_timeviper.TimeViperModel",
    "AutoModelForImageTextToText": "modeling_timeviper.TimeViperForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_timeviper.TimeViperForConditionalGeneration",
}

# pipeline("image-text-to-text") runs TimeViper's own pipeline class, which batches the flat frame tensor correctly.
CUSTOM_PIPELINES = {
    "image-text-to-text": {
        "impl": "modeling_timeviper.TimeViperImageTextToTextPipeline",
        "pt": ["AutoModelForImageTextToText"],
        "type": "multimodal",
    }
}

COMPRESSION_METHODS = ("uniform", "attention")
PROJECTOR_TYPES = ("tome_mlp", "mlp")
TEXT_CONFIG_CLASSES = {"nemotron_h": NemotronHConfig, "qwen2": Qwen2Config}

# NVIDIA-Nemotron-Nano-9B-v2: 27 Mamba-2 (M), 4 attention (*) and 25 squared-ReLU MLP (-) blocks.
NANO_9B_V2_PATTERN = "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-"


def nano_9b_v2_text_config(**overrides) -> NemotronHConfig:
    """The text config of NVIDIA-Nemotron-Nano-9B-v2(-Base), the backbone of the released TimeViper."""
    defaults = dict(
        vocab_size=131072,
        hidden_size=4480,
        hybrid_override_pattern=NANO_9B_V2_PATTERN,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=15680,
        mlp_hidden_act="relu2",
        mamba_num_heads=128,
        mamba_head_dim=80,
        ssm_state_size=128,
        n_groups=8,
        conv_kernel=4,
        chunk_size=128,
        layer_norm_epsilon=1e-5,
        time_step_limit=(0.0, float("inf")),
        max_position_embeddings=131072,
        eos_token_id=12,
        bos_token_id=1,
        pad_token_id=0,
    )
    return NemotronHConfig(**(defaults | overrides))


def so400m_vision_config(**overrides) -> SiglipVisionConfig:
    """SigLIP(2) so400m/14 at 384 px, with the exact GELU that timm uses (HF's default is the tanh approximation)."""
    defaults = dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    return SiglipVisionConfig(**(defaults | overrides))


@dataclass(frozen=True)
class TimeViperCompressionStage:
    """One in-LLM compression stage: before block `layer_idx` runs, each sample's vision tokens are reduced to
    `keep_ratio` of the ORIGINAL number of vision tokens (not of the previous stage), chosen by `method`. With
    `transfer=True` the text after the vision span absorbs the dropped tokens through a gated cross-attention
    (TransV). The paper writes drop rates (a `drop_ratio` key in `from_dict`), the reference code's strings keep ratios.
    """

    layer_idx: int
    keep_ratio: float
    method: str = "uniform"
    transfer: bool = True

    def __post_init__(self):
        if isinstance(self.layer_idx, bool) or not isinstance(self.layer_idx, int) or self.layer_idx < 0:
            raise ValueError(f"compression stage layer_idx must be a non-negative int, got {self.layer_idx!r}")
        if not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(f"compression stage keep_ratio must lie in (0, 1], got {self.keep_ratio!r}")
        if self.method not in COMPRESSION_METHODS:
            raise ValueError(f"compression stage method must be one of {COMPRESSION_METHODS}, got {self.method!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "TimeViperCompressionStage":
        values = dict(values)
        if "drop_ratio" in values:
            if "keep_ratio" in values:
                raise ValueError(f"give either keep_ratio or drop_ratio for a compression stage, not both: {values}")
            drop_ratio = values.pop("drop_ratio")
            if not 0.0 <= float(drop_ratio) < 1.0:
                raise ValueError(f"drop_ratio must lie in [0, 1), got {drop_ratio!r}")
            values["keep_ratio"] = 1.0 - float(drop_ratio)
        unknown = set(values) - {"layer_idx", "keep_ratio", "method", "transfer"}
        if unknown:
            raise ValueError(f"unknown compression stage fields {sorted(unknown)} in {values}")
        return cls(**values)

    def to_reference_string(self) -> str:
        kind = ("uni" if self.method == "uniform" else "attn") + ("" if self.transfer else "drop")
        return f"{kind}_{self.layer_idx}_{self.keep_ratio:g}"


def parse_compression_string(spec: str) -> list[TimeViperCompressionStage]:
    """Parse the reference code's schedule string, e.g. `uni_7_0.5-attn_39_0.05` or `unidrop_7_0.5`: stages
    `type_layer_keepratio`, where a `drop` type drops without TransV and the ratios are KEEP fractions."""
    stages = []
    for part in spec.split("-"):
        fields = part.split("_")
        if len(fields) != 3:
            raise ValueError(f"compression stage {part!r} in {spec!r} must be 'type_layer_keepratio', e.g. 'uni_7_0.5'")
        kind, layer, ratio = fields
        if not kind.startswith(("uni", "attn")):
            raise ValueError(f"compression stage type {kind!r} in {spec!r} must start with 'uni' or 'attn'")
        if kind.removeprefix("attn").removeprefix("uni") not in ("", "drop"):
            raise ValueError(f"compression stage type {kind!r} in {spec!r} is not one of uni, attn, unidrop, attndrop")
        try:
            layer_idx, keep_ratio = int(layer), float(ratio)
        except ValueError:
            raise ValueError(f"compression stage {part!r} in {spec!r} needs an integer layer and a float ratio") from None
        method = "attention" if kind.startswith("attn") else "uniform"
        stages.append(TimeViperCompressionStage(layer_idx, keep_ratio, method, transfer="drop" not in kind))
    return stages


def normalize_compression(value) -> list[TimeViperCompressionStage]:
    """The list of stages from None, a list of stages / stage dicts, or text: '' or 'none' (any case) for no stages,
    the reference's string (`uni_7_0.5-attn_39_0.05`), or JSON of one stage dict or a list of them (the forms a
    command line passes)."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "none"):
            return []
        if text[0] not in "[{":
            return parse_compression_string(text)
        value = compression_json(text)
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"token_compression must be a string, a list of stages or None, got {type(value).__name__}")
    stages = []
    for stage in value:
        if isinstance(stage, dict):
            stage = TimeViperCompressionStage.from_dict(stage)
        elif not isinstance(stage, TimeViperCompressionStage):
            raise ValueError(f"a compression stage must be a dict or a TimeViperCompressionStage, got {stage!r}")
        stages.append(stage)
    return stages


def compression_json(text: str) -> list:
    """The stage dicts of a JSON token_compression (one dict or a list)."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"token_compression {text!r} is not valid JSON: {error}") from None
    return [parsed] if isinstance(parsed, dict) else parsed


def text_layer_types(text_config) -> list[str]:
    """Per-block mixer type of the LLM: `linear_attention` (Mamba-2), `full_attention` or `mlp`; a Qwen2 decoder
    layer (attention and MLP together) counts as one `full_attention` block."""
    if text_config.model_type == "qwen2":
        return ["full_attention"] * text_config.num_hidden_layers
    return list(text_config.layer_types)


def attention_layers(layer_types: list[str]) -> list[int]:
    return [i for i, kind in enumerate(layer_types) if kind == "full_attention"]


def validate_compression(stages: list[TimeViperCompressionStage], layer_types: list[str]) -> None:
    previous_layer, previous_ratio = -1, 1.0
    for stage in stages:
        if stage.layer_idx >= len(layer_types):
            raise ValueError(
                f"compression stage at layer {stage.layer_idx} is out of range: the LLM has {len(layer_types)} blocks"
            )
        if stage.layer_idx <= previous_layer:
            raise ValueError(f"compression stages must have increasing layer indices, got {stage.layer_idx} after {previous_layer}")
        if previous_layer >= 0 and stage.keep_ratio >= previous_ratio:
            raise ValueError(
                f"compression keep ratios must decrease, got {stage.keep_ratio} at layer {stage.layer_idx} after {previous_ratio}"
            )
        if stage.method == "attention" and layer_types[stage.layer_idx] != "full_attention":
            raise ValueError(
                f"attention-guided compression needs an attention block; block {stage.layer_idx} is "
                f"{layer_types[stage.layer_idx]!r}. Attention blocks: {attention_layers(layer_types)}"
            )
        previous_layer, previous_ratio = stage.layer_idx, stage.keep_ratio


class TimeViperConfig(PretrainedConfig):
    r"""
    Args:
        vision_config (`SiglipVisionConfig` or dict, *optional*): the vision tower; defaults to SigLIP so400m/14-384.
        text_config (`NemotronHConfig`, `Qwen2Config` or dict, *optional*): the LLM; defaults to Nemotron-Nano-9B-v2.
        projector_type (`str`, defaults to `"tome_mlp"`): `"tome_mlp"` merges each frame's patches to
            `tokens_per_frame` tokens with ToMe before the MLP; `"mlp"` keeps every patch.
        tokens_per_frame (`int`, defaults to 16): ToMe output tokens per frame (`tome_mlp` only).
        vision_feature_layer (`int`, defaults to -2): index into the vision tower's hidden states
            (-2 = output of the second-to-last block, no post-layernorm).
        vision_chunk_size (`int`, defaults to 256): frames encoded at once, bounding vision activation memory.
        projector_hidden_act (`str`, defaults to `"gelu"`): activation between the two projector linears.
        video_token_id / image_token_id (`int`): placeholder ids; each placeholder receives one vision embedding.
        token_compression (str or list, *optional*): in-LLM compression stages, see `TimeViperCompressionStage`.
    """

    model_type = "timeviper"
    sub_configs = {"text_config": AutoConfig, "vision_config": SiglipVisionConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        projector_type="tome_mlp",
        tokens_per_frame=16,
        vision_feature_layer=-2,
        vision_chunk_size=256,
        projector_hidden_act="gelu",
        video_token_id=131073,
        image_token_id=131072,
        token_compression=None,
        tie_word_embeddings=False,
        **kwargs,
    ):
        if vision_config is None:
            vision_config = so400m_vision_config()
        elif isinstance(vision_config, dict):
            vision_config = SiglipVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        if text_config is None:
            text_config = nano_9b_v2_text_config()
        elif isinstance(text_config, dict):
            text_config = dict(text_config)
            model_type = text_config.pop("model_type", "nemotron_h")
            if model_type not in TEXT_CONFIG_CLASSES:
                raise ValueError(f"text_config.model_type must be one of {sorted(TEXT_CONFIG_CLASSES)}, got {model_type!r}")
            text_config = TEXT_CONFIG_CLASSES[model_type](**text_config)
        if text_config.model_type not in TEXT_CONFIG_CLASSES:
            raise ValueError(f"text_config must be one of {sorted(TEXT_CONFIG_CLASSES)}, got {text_config.model_type!r}")
        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {projector_type!r}")
        patches = self._patches_per_frame(vision_config)
        if projector_type == "tome_mlp" and not 1 <= tokens_per_frame <= patches:
            raise ValueError(f"tokens_per_frame must lie in [1, {patches}] (patches per frame), got {tokens_per_frame}")
        if vision_chunk_size < 1:
            raise ValueError(f"vision_chunk_size must be >= 1, got {vision_chunk_size}")
        if not -vision_config.num_hidden_layers - 1 <= vision_feature_layer <= vision_config.num_hidden_layers:
            raise ValueError(f"vision_feature_layer {vision_feature_layer} is out of range for the vision tower")

        self.vision_config = vision_config
        self.text_config = text_config
        self.projector_type = projector_type
        self.tokens_per_frame = tokens_per_frame
        self.vision_feature_layer = vision_feature_layer
        self.vision_chunk_size = vision_chunk_size
        self.projector_hidden_act = projector_hidden_act
        self.video_token_id = video_token_id
        self.image_token_id = image_token_id
        stages = normalize_compression(token_compression)
        validate_compression(stages, text_layer_types(text_config))
        self.token_compression = [asdict(stage) for stage in stages]
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        # A Hub load prefixes each entry with the repo id and a load through one Auto class adds only that class;
        # the code files are saved next to config.json, so the plain names of all Auto classes are the right ones.
        self.auto_map = dict(AUTO_MAP)
        self.custom_pipelines = dict(CUSTOM_PIPELINES)
        type(self).register_for_auto_class()  # transformers copies this file next to config.json for registered classes
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @staticmethod
    def _patches_per_frame(vision_config) -> int:
        return (vision_config.image_size // vision_config.patch_size) ** 2

    @property
    def compression_stages(self) -> list[TimeViperCompressionStage]:
        # Parsed and checked on every read: `from_pretrained(..., token_compression=...)` sets the raw value.
        stages = normalize_compression(self.token_compression)
        validate_compression(stages, self.layer_types)
        return stages

    @property
    def compression_schedule(self) -> str:
        """The schedule in the reference's string form (stages joined by '-', e.g. "uni_7_0.5-attn_39_0.05"), or
        "none"."""
        return "-".join(stage.to_reference_string() for stage in self.compression_stages) or "none"

    @property
    def vision_tokens_per_frame(self) -> int:
        """Vision embeddings (= placeholder tokens) per frame, as the processor must expand them."""
        if self.projector_type == "tome_mlp":
            return self.tokens_per_frame
        return self._patches_per_frame(self.vision_config)

    @property
    def vision_layers_used(self) -> int:
        """The SigLIP blocks that feed the projector: the features are hidden state `vision_feature_layer` (0 = the
        embeddings; negative counts from the end, -2 = the second-to-last block's output)."""
        layer = self.vision_feature_layer
        return layer if layer >= 0 else self.vision_config.num_hidden_layers + 1 + layer

    @property
    def layer_types(self) -> list[str]:
        return text_layer_types(self.text_config)


__all__ = ["AUTO_MAP", "SUPPORTED_TRANSFORMERS", "TimeViperConfig", "TimeViperCompressionStage", "parse_compression_string"]
