"""convert/: key maps, streamed writing, safety rules, and end-to-end conversions of tiny synthetic sources.

Sources are written in the exact upstream formats: an NVIDIA-style Nemotron-H folder (NVIDIA's config.json fields,
`backbone.*` safetensors in two shards with an index, tokenizer without placeholders, generation_config.json), a
Qwen2 folder (`model.*` keys), a timm SigLIP state dict (fused qkv, `attn_pool.*`), a transformers `SiglipModel`
folder, and a reference TimeViper checkpoint (one flat state dict with TransV tensors).
Oracles: transformers' `NemotronHForCausalLM` / `Qwen2ForCausalLM` / `SiglipVisionModel`, and a hand-written timm
ViT forward. Tolerance: 1e-5 in float32 (`--dtype fp32`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file

from timeviper import REMOTE_CODE_FILES

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `convert` is a folder of the repository, not part of the installed package
    sys.path.insert(0, str(REPO))

from convert import common  # noqa: E402
from convert.common import ConversionError, ConversionOptions, ConversionPlan, DictSource  # noqa: E402
from convert.convert_raw_to_hub import convert_raw_to_hub  # noqa: E402
from convert.convert_reference_checkpoint import convert_reference_checkpoint  # noqa: E402

ATOL = 1e-5  # float32 on both sides

VISION = dict(width=32, depth=3, heads=4, mlp=48, patch=4, grid=7)  # image 28 px
NANO_PATTERN = "M-*M-*M"  # attention blocks at 2 and 5
NANO_COMPRESSION = "uni_1_0.5-attn_2_0.25-uni_4_0.125"  # three transfer stages; TransV of stage 2 from block 5
QWEN_COMPRESSION = "uni_1_0.5-attndrop_2_0.25"  # one transfer stage, one pure drop


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic sources in upstream formats
# ---------------------------------------------------------------------------------------------------------------------


def nano_tokenizer():
    """NVIDIA-like: `<unk> <s> </s>`, reserved `<SPECIAL_k>` tokens, no `<image>`/`<video>` (the converter adds them)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] + [f"<SPECIAL_{i}>" for i in range(3, 16)]
    words = "the a video is of cat dog what describe in happens hello world frame time".split()
    vocab = {token: index for index, token in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def nvidia_config_json(vocab_size):
    """The field set of NVIDIA-Nemotron-Nano-9B-v2's config.json, with tiny sizes."""
    return {
        "architectures": ["NemotronHForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attention_head_dim": 8,
        "auto_map": {
            "AutoConfig": "configuration_nemotron_h.NemotronHConfig",
            "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM",
        },
        "bos_token_id": 1,
        "chunk_size": 8,
        "conv_kernel": 4,
        "eos_token_id": 12,
        "head_dim": 8,
        "hidden_dropout": 0.0,
        "hidden_size": 40,
        "hybrid_override_pattern": NANO_PATTERN,
        "initializer_range": 0.02,
        "intermediate_size": 56,
        "layer_norm_epsilon": 1e-05,
        "mamba_head_dim": 8,
        "mamba_hidden_act": "silu",
        "mamba_num_heads": 6,
        "mamba_proj_bias": False,
        "max_position_embeddings": 512,
        "mlp_bias": False,
        "mlp_hidden_act": "relu2",
        "model_type": "nemotron_h",
        "n_groups": 2,
        "num_attention_heads": 5,
        "num_hidden_layers": len(NANO_PATTERN),
        "num_key_value_heads": 1,
        "num_logits_to_keep": 1,
        "pad_token_id": 0,
        "rescale_prenorm_residual": True,
        "residual_in_fp32": False,
        "rms_norm_eps": 1e-05,
        "sliding_window": None,
        "ssm_state_size": 8,
        "tie_word_embeddings": False,
        "time_step_floor": 0.0001,
        "time_step_limit": [0.0, float("inf")],
        "time_step_max": 0.1,
        "time_step_min": 0.001,
        "time_step_rank": 8,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.48.0.dev0",
        "use_bias": False,
        "use_cache": True,
        "use_conv_bias": True,
        "use_mamba_kernels": True,
        "vocab_size": vocab_size,
    }


def randomize(model, seed):
    """Weights with O(1) logits (default init gives near-zero ones), keeping the SSM parameters in their range."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("A_log", "dt_bias", "D")) or not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if tensor.ndim == 1:  # norms and biases
                tensor.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
            else:
                tensor.copy_(noise / tensor.shape[-1] ** 0.5)
    return model


def write_shards(tensors: dict, folder: Path, num_shards: int = 2) -> None:
    names = sorted(tensors)
    weight_map = {}
    for index in range(num_shards):
        file = f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {name: tensors[name].contiguous() for name in names[index::num_shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_nano_folder(folder: Path) -> Path:
    from transformers import NemotronHConfig, NemotronHForCausalLM

    folder.mkdir(parents=True)
    tokenizer = nano_tokenizer()
    tokenizer.save_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps(nvidia_config_json(len(tokenizer)), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 12], "pad_token_id": 0}))
    model = randomize(NemotronHForCausalLM(NemotronHConfig.from_pretrained(str(folder))), seed=1)
    tensors = {}
    for name, tensor in model.state_dict().items():
        name = "backbone." + name.removeprefix("model.") if name.startswith("model.") else name
        tensors[name] = tensor.to(torch.bfloat16)  # NVIDIA publishes bf16
    write_shards(tensors, folder)
    return folder


def make_qwen_folder(folder: Path) -> Path:
    from inference.tiny_default import make_tiny_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = make_tiny_tokenizer("qwen2")
    config = Qwen2Config(
        vocab_size=len(tokenizer) + 3, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = randomize(Qwen2ForCausalLM(config), seed=2)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def timm_siglip_state_dict(seed: int = 3) -> dict[str, torch.Tensor]:
    """timm `VisionTransformer(global_pool='map', class_token=False)` keys and shapes, tiny."""
    generator = torch.Generator().manual_seed(seed)
    width, mlp, patch, grid = VISION["width"], VISION["mlp"], VISION["patch"], VISION["grid"]

    def rand(*shape, scale=None):
        return torch.randn(shape, generator=generator) * (scale if scale is not None else shape[-1] ** -0.5)

    state = {
        "patch_embed.proj.weight": rand(width, 3, patch, patch, scale=0.1),
        "patch_embed.proj.bias": rand(width, scale=0.1),
        "pos_embed": rand(1, grid * grid, width, scale=0.1),
    }
    for block in range(VISION["depth"]):
        prefix = f"blocks.{block}."
        state.update({
            prefix + "norm1.weight": 1 + rand(width, scale=0.1), prefix + "norm1.bias": rand(width, scale=0.1),
            prefix + "attn.qkv.weight": rand(3 * width, width), prefix + "attn.qkv.bias": rand(3 * width, scale=0.1),
            prefix + "attn.proj.weight": rand(width, width), prefix + "attn.proj.bias": rand(width, scale=0.1),
            prefix + "norm2.weight": 1 + rand(width, scale=0.1), prefix + "norm2.bias": rand(width, scale=0.1),
            prefix + "mlp.fc1.weight": rand(mlp, width), prefix + "mlp.fc1.bias": rand(mlp, scale=0.1),
            prefix + "mlp.fc2.weight": rand(width, mlp), prefix + "mlp.fc2.bias": rand(width, scale=0.1),
        })
    state.update({"norm.weight": 1 + rand(width, scale=0.1), "norm.bias": rand(width, scale=0.1)})
    state.update({
        "attn_pool.latent": rand(1, 1, width), "attn_pool.q.weight": rand(width, width), "attn_pool.q.bias": rand(width),
        "attn_pool.kv.weight": rand(2 * width, width), "attn_pool.kv.bias": rand(2 * width),
        "attn_pool.proj.weight": rand(width, width), "attn_pool.proj.bias": rand(width),
        "attn_pool.norm.weight": rand(width), "attn_pool.norm.bias": rand(width),
        "attn_pool.mlp.fc1.weight": rand(mlp, width), "attn_pool.mlp.fc1.bias": rand(mlp),
        "attn_pool.mlp.fc2.weight": rand(width, mlp), "attn_pool.mlp.fc2.bias": rand(width),
    })
    return state


def timm_features(state: dict, pixels: torch.Tensor, num_blocks: int, heads: int) -> torch.Tensor:
    """timm's ViT forward, by hand: patch conv + pos_embed, then pre-norm blocks with exact GELU; no final norm
    (the reference's `get_intermediate_layers` output of block `num_blocks - 1`)."""
    x = F.conv2d(pixels, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=VISION["patch"])
    x = x.flatten(2).transpose(1, 2) + state["pos_embed"]
    batch, tokens, width = x.shape
    for block in range(num_blocks):
        p = lambda name: state[f"blocks.{block}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (width,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        qkv = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(batch, tokens, 3, heads, width // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-1, -2) * (width // heads) ** -0.5, dim=-1) @ v
        x = x + F.linear(attention.transpose(1, 2).reshape(batch, tokens, width), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (width,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    return x


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    timm_state = timm_siglip_state_dict()
    torch.save(timm_state, root / "vit_siglip.pth")
    return {
        "root": root,
        "nano": make_nano_folder(root / "NVIDIA-Nemotron-Nano-tiny-Base"),
        "qwen": make_qwen_folder(root / "Qwen2.5-tiny"),
        "timm": root / "vit_siglip.pth",
        "timm_state": timm_state,
    }


def convert_raw(sources, output, llm=None, vision=None, projector=None, seed=None, **options):
    """`convert_raw_to_hub` of the Nemotron-H and timm sources (unless `llm` / `vision` say otherwise) in fp32, with
    `options` overriding this file's defaults."""
    defaults = dict(
        token_compression=NANO_COMPRESSION, projector_type="mlp", dtype="fp32", vision_num_heads=VISION["heads"],
        progress=False, verify=False,
    )
    return convert_raw_to_hub(
        llm or sources["nano"], vision or sources["timm"], output, projector, seed, ConversionOptions(**{**defaults, **options})
    )


def nano_reference(sources):
    from transformers import NemotronHForCausalLM

    model = NemotronHForCausalLM.from_pretrained(str(sources["nano"]), dtype=torch.float32).eval()
    return common.match_checkpoint_time_step_limit(model)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def no_leftovers(parent: Path) -> bool:
    return not [path for path in parent.iterdir() if ".partial-" in path.name or ".replaced-" in path.name]


# ---------------------------------------------------------------------------------------------------------------------
# Key maps
# ---------------------------------------------------------------------------------------------------------------------


def test_timm_qkv_split_matches_hand_computation():
    state = timm_siglip_state_dict()
    plan = common.plan_timm_siglip(DictSource(state, "timm"))
    x = torch.randn(5, VISION["width"])
    fused = (x @ state["blocks.1.attn.qkv.weight"].T + state["blocks.1.attn.qkv.bias"]).reshape(5, 3, VISION["width"])
    for index, projection in enumerate(("q_proj", "k_proj", "v_proj")):
        prefix = f"{common.VISION_PREFIX}encoder.layers.1.self_attn.{projection}."
        ours = x @ plan.tensors[prefix + "weight"].load().T + plan.tensors[prefix + "bias"].load()
        torch.testing.assert_close(ours, fused[:, index], rtol=0, atol=1e-6)
    position = plan.tensors[common.VISION_PREFIX + "embeddings.position_embedding.weight"]
    assert position.shape == (VISION["grid"] ** 2, VISION["width"])
    assert torch.equal(position.load(), state["pos_embed"][0])
    assert plan.tensors[common.VISION_PREFIX + "encoder.layers.2.self_attn.out_proj.weight"].load() is state["blocks.2.attn.proj.weight"]
    assert sorted(plan.skipped) == sorted(f"timm:{key}" for key in state if key.startswith("attn_pool."))
    assert all("unused by TimeViper" in reason for reason in plan.skipped.values())
    assert not plan.unexpected and not plan.conflicts


def test_timm_mapping_reproduces_timm_forward():
    """The mapped weights in transformers' SiglipVisionModel give timm's block outputs (hand-written oracle)."""
    from transformers import SiglipVisionModel

    state = timm_siglip_state_dict()
    source = DictSource(state, "timm")
    config = common.vision_config_from_timm(source, num_heads=VISION["heads"])
    assert (config.image_size, config.patch_size, config.num_hidden_layers, config.hidden_act) == (28, 4, 3, "gelu")
    tower = SiglipVisionModel(config).eval()
    tower.load_state_dict(common.vision_state_dict(common.plan_timm_siglip(source)), strict=True)
    pixels = torch.rand(2, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[-2], timm_features(state, pixels, VISION["depth"] - 1, VISION["heads"]), rtol=0, atol=ATOL)


def test_real_timm_siglip_loads_the_synthetic_checkpoint_and_matches_the_oracle():
    """timm itself: the synthetic state dict is exactly `vit_so400m_patch14_siglip_384`'s format (strict load), and
    the reference's feature call (`get_intermediate_layers(n={depth - 2})`, no final norm) equals the oracle that
    the conversion tests compare against."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_so400m_patch14_siglip_384", pretrained=False, num_classes=0, img_size=VISION["patch"] * VISION["grid"],
        patch_size=VISION["patch"], embed_dim=VISION["width"], depth=VISION["depth"], num_heads=VISION["heads"],
        mlp_ratio=VISION["mlp"] / VISION["width"],
    ).eval()
    state = timm_siglip_state_dict()
    model.load_state_dict(state, strict=True)
    pixels = torch.randn(2, 3, VISION["patch"] * VISION["grid"], VISION["patch"] * VISION["grid"])
    with torch.no_grad():
        (features,) = model.get_intermediate_layers(pixels, n={VISION["depth"] - 2})
    torch.testing.assert_close(features, timm_features(state, pixels, VISION["depth"] - 1, VISION["heads"]), rtol=0, atol=ATOL)


def test_timm_unknown_keys_are_rejected_by_name():
    state = timm_siglip_state_dict()
    state["cls_token"] = torch.zeros(1, 1, VISION["width"])
    state["blocks.0.ls1.gamma"] = torch.ones(VISION["width"])
    plan = common.plan_timm_siglip(DictSource(state, "timm"))
    assert set(plan.unexpected) == {"timm:cls_token", "timm:blocks.0.ls1.gamma"}


def test_hf_siglip_keys_map_with_and_without_the_vision_model_level():
    """`SiglipModel` checkpoints (and 4.x `SiglipVisionModel` ones) put the tower under `vision_model.`; a 5.x
    `SiglipVisionModel` saves it flat. Both give the model's (flat) names."""
    weight = torch.zeros(2, 2)
    for prefix in ("vision_model.", ""):
        plan = common.plan_hf_siglip(DictSource({f"{prefix}encoder.layers.0.mlp.fc1.weight": weight}, "siglip"))
        assert list(plan.tensors) == [common.VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight"]
        assert not plan.unexpected


def test_expected_shapes_are_the_model_state_dict():
    """The shapes the plan is checked against (the model built on the meta device) are those of a real model."""
    from tiny_models import tiny_config

    from timeviper.modeling_timeviper import TimeViperForConditionalGeneration

    for backbone, compression in (("nemotron_h", "uni_1_0.5-attn_2_0.25"), ("nemotron_h", "unidrop_0_0.5-uni_2_0.25"), ("qwen2", "uni_1_0.5")):
        config = tiny_config(backbone, token_compression=compression)
        model = TimeViperForConditionalGeneration(config)
        shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        assert list(common.expected_state_dict_shapes(config).items()) == list(shapes.items())
        # The key maps target a flat SigLIP tower: no supported transformers release nests it under `vision_model.`.
        assert not [name for name in shapes if name.startswith(common.VISION_PREFIX + "vision_model.")]


def test_fitted_plan_follows_the_state_dict_order():
    """The shards are written in the fitted plan's order: the model's state-dict order, whatever order the key maps
    planned the tensors in (as `save_pretrained` writes them)."""
    from tiny_models import tiny_model

    model = tiny_model()
    state = model.state_dict()
    plan = ConversionPlan()
    for name in reversed(list(state)):
        plan.add(name, state[name].shape, lambda name=name: state[name], [f"src:{name}"])
    assert list(common.fit_plan_to_model(plan, model.config).tensors) == list(state)


def test_siglip_parts_the_model_leaves_out_are_skipped():
    """SigLIP blocks after the feature layer and the final norm feed nothing the projector reads: a model built
    without them gets them reported as skipped. Any other tensor the model lacks stays an error."""
    from tiny_models import tiny_config

    config = tiny_config(projector_type="mlp")  # 3 SigLIP blocks, features = hidden state -2: blocks 0 and 1 used
    plan = common.plan_timm_siglip(DictSource(timm_siglip_state_dict(), "timm"))
    expected = {name: tensor.shape for name, tensor in plan.tensors.items()}
    unused = [name for name in expected if ".layers.2." in name or "post_layernorm" in name]
    for name in unused:
        del expected[name]
    fitted = common.skip_unused_vision_tensors(plan, expected, config.vision_layers_used)
    common.check_plan(fitted, expected)
    assert {"timm:norm.weight", "timm:blocks.2.attn.qkv.weight", "timm:blocks.2.mlp.fc2.bias"} <= set(fitted.skipped)
    assert "SigLIP's first 2 blocks" in fitted.skipped["timm:norm.weight"]
    assert len(unused) == 2 + 16 and set(fitted.tensors) == set(expected)  # the final norm's 2 tensors, block 2's 16
    del expected[common.VISION_PREFIX + "encoder.layers.1.mlp.fc1.weight"]
    with pytest.raises(ConversionError, match="unexpected tensor model.vision_tower.encoder.layers.1.mlp.fc1.weight"):
        common.check_plan(common.skip_unused_vision_tensors(plan, expected, 2), expected)


def test_parsers():
    assert common.parse_dtype("bf16") is torch.bfloat16 and common.parse_dtype("float32") is torch.float32
    assert common.parse_projector_type("tome_mlp-16") == ("tome_mlp", 16)
    assert common.parse_projector_type("gelu_mlp") == ("mlp", None)
    with pytest.raises(ValueError, match="fused"):
        common.parse_projector_type("fused_tome_mlp-16")


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


def test_streaming_writer_shards_and_casts(tmp_path):
    tensors = {f"layer.{i}.weight": torch.randn(64, 16) for i in range(5)}
    tensors["scalar"] = torch.tensor(3.5)
    plan = ConversionPlan()
    for name, tensor in tensors.items():
        plan.add(name, tensor.shape, lambda tensor=tensor: tensor, [f"src:{name}"])
    index = common.write_safetensors_shards(plan, tmp_path, torch.bfloat16, max_shard_size=64 * 16 * 2 * 2, progress=False)
    files = sorted(path.name for path in tmp_path.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text()) == index
    assert index["metadata"]["total_size"] == (5 * 64 * 16 + 1) * 2
    written = read_tensors(tmp_path)
    assert set(written) == set(tensors) and set(index["weight_map"]) == set(tensors)
    for name, tensor in tensors.items():
        assert written[name].dtype == torch.bfloat16 and torch.equal(written[name], tensor.to(torch.bfloat16))


def test_writer_reads_shard_sizes_as_save_pretrained_does(tmp_path):
    plan = ConversionPlan()
    for index in range(3):
        plan.add(f"w{index}", (32, 32), lambda: torch.ones(32, 32), [f"src:w{index}"])  # 2048 bytes in bf16
    index = common.write_safetensors_shards(plan, tmp_path, torch.bfloat16, "4.1KB", progress=False)
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["metadata"] == {"total_size": 3 * 2048, "total_parameters": 3 * 32 * 32}
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text()) == index
    with pytest.raises(ConversionError, match="cannot read the shard size '2MiB'"):
        common.write_safetensors_shards(plan, tmp_path, torch.bfloat16, "2MiB", progress=False)


def test_writer_holds_one_tensor_at_a_time(tmp_path):
    """Streaming: when a tensor is loaded, every earlier one has already been written and freed."""
    import weakref

    loaded = []

    def load():
        assert all(reference() is None for reference in loaded), "an earlier tensor is still alive"
        tensor = torch.randn(128, 128)
        loaded.append(weakref.ref(tensor))
        return tensor

    plan = ConversionPlan()
    for index in range(6):
        plan.add(f"w{index}", (128, 128), load, [f"src:w{index}"])
    common.write_safetensors_shards(plan, tmp_path, torch.float32, max_shard_size=3 * 128 * 128 * 4, progress=False)
    assert len(loaded) == 6 and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_writer_checks_loaded_shape(tmp_path):
    plan = ConversionPlan()
    plan.add("w", (4, 4), lambda: torch.zeros(4, 5), ["src:w"])
    with pytest.raises(ConversionError, match="planned shape"):
        common.write_safetensors_shards(plan, tmp_path, torch.float32, 10**9, progress=False)


def test_atomic_output_dir(tmp_path):
    output = tmp_path / "out"
    with common.atomic_output_dir(output) as folder:
        (folder / "a").write_text("1")
        assert not output.exists()
    assert (output / "a").read_text() == "1"
    with pytest.raises(ConversionError, match="--force"):
        with common.atomic_output_dir(output):
            pass
    with pytest.raises(RuntimeError):
        with common.atomic_output_dir(output, force=True) as folder:
            (folder / "b").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in output.iterdir()) == [common.OUTPUT_MARKER, "a"] and no_leftovers(tmp_path)
    with common.atomic_output_dir(output, force=True) as folder:
        (folder / "b").write_text("2")
    assert sorted(p.name for p in output.iterdir()) == [common.OUTPUT_MARKER, "b"] and no_leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------------

LOAD_SCRIPT = """
import sys, torch
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
ids = torch.tensor([[1, 17, 18, 19, 20, 21, 22, 23, 24, 25, 3, 4]])
pixels = torch.linspace(-1, 1, 2 * 3 * 28 * 28).reshape(2, 3, 28, 28)
frames = (torch.rand(3, 28, 28, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
prompt = processor.apply_chat_template(
    [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what happens in the video"}]}],
    add_generation_prompt=True,
)
inputs = processor(text=prompt, videos=[frames], return_tensors="pt")
# Two samples with 3 and 2 frames: padding needs the pad token the converter gave the tokenizer.
batch = processor(text=[prompt, prompt], videos=[frames, frames[:2]], padding=True, padding_side="left", return_tensors="pt")
with torch.no_grad():
    logits = model(input_ids=ids).logits
    # The tower is built up to the block whose output TimeViper reads: its last hidden state is that feature.
    tower = model.model.vision_tower
    features = tower.encoder(inputs_embeds=tower.embeddings(pixels)).last_hidden_state
    generated = model.generate(**inputs, max_new_tokens=3)
torch.save({"logits": logits, "features": features, "model_class": type(model).__name__,
            "prompt": prompt, "num_video_tokens": int((inputs["input_ids"] == model.config.video_token_id).sum()),
            "generated": generated[0, inputs["input_ids"].shape[1]:],
            "processor_class": type(processor).__name__, "video_processor_class": type(processor.video_processor).__name__,
            "video_token_id": processor.video_token_id, "config_video_token_id": model.config.video_token_id,
            "padded_positions": int((batch["attention_mask"] == 0).sum())}, out)
"""


def test_raw_nemotron_conversion_end_to_end(sources, tmp_path):
    output = tmp_path / "TimeViper-tiny"
    convert_raw(sources, verify=True, output=output, shard_size="20KB", verify_atol=ATOL)
    assert no_leftovers(tmp_path)

    # Files of a Hub-ready folder.
    names = {path.name for path in output.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "generation_config.json", "README.md", "tokenizer.json",
            "tokenizer_config.json", "processor_config.json", "chat_template.jinja"} <= names
    assert set(REMOTE_CODE_FILES) <= names
    for file in REMOTE_CODE_FILES:
        assert (output / file).read_bytes() == (REPO / file).read_bytes()
    assert len(list(output.glob("model-*-of-*.safetensors"))) > 1
    config = json.loads((output / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_timeviper.TimeViperConfig",
        "AutoModel": "modeling_timeviper.TimeViperModel",
        "AutoModelForImageTextToText": "modeling_timeviper.TimeViperForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_timeviper.TimeViperForConditionalGeneration",
    }
    assert config["token_compression"][1] == {"layer_idx": 2, "keep_ratio": 0.25, "method": "attention", "transfer": True}
    processor_config = json.loads((output / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_timeviper.TimeViperProcessor"
    tokenizer_vocab = json.loads((output / "tokenizer.json").read_text())["added_tokens"]
    added = {token["content"]: token["id"] for token in tokenizer_vocab}
    vocab_size = config["text_config"]["vocab_size"]
    assert (added["<image>"], added["<video>"]) == (vocab_size, vocab_size + 1)  # beyond the embeddings, as in Nano
    assert (config["image_token_id"], config["video_token_id"]) == (vocab_size, vocab_size + 1)
    generation = json.loads((output / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 12] and generation.get("do_sample", False) is False
    card = ModelCard.load(output / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.license == "other" and card.data.license_name == "nvidia-open-model-license"
    assert card.data.base_model[0].startswith("nvidia/") and {"timeviper", "mamba", "custom_code"} <= set(card.data.tags)
    assert "trust_remote_code=True" in card.text
    tokenizer = json.loads((output / "tokenizer_config.json").read_text())
    assert tokenizer["pad_token"] == "<unk>"  # Nano's pad_token_id 0: `padding=True` batches work

    # TransV initialised from the nearest attention block at or after each stage (blocks 2, 2, 5), alpha = 0.
    written = read_tensors(output)
    prefix = common.TEXT_PREFIX
    for stage, block in ((0, 2), (1, 2), (2, 5)):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(written[f"{prefix}merge_modules.{stage}.{name}.weight"], written[f"{prefix}layers.{block}.mixer.{name}.weight"])
    for stage in range(3):
        assert torch.equal(written[f"{prefix}merge_modules.{stage}.alpha"], torch.zeros(1))

    # The model's own initialiser agrees with the key-level one.
    model = common.load_converted_model(output)
    before = {k: v.clone() for k, v in model.state_dict().items() if "merge_modules" in k or k.endswith("alpha")}
    model.init_transfer_from_nearest_attention()
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key

    # Loading as a user would: AutoModel / AutoProcessor with trust_remote_code, in a fresh process.
    result_file = tmp_path / "result.pt"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(output), str(result_file)], check=True, env=env, cwd=tmp_path)
    result = torch.load(result_file)
    assert result["model_class"] == "TimeViperForConditionalGeneration"
    assert (result["processor_class"], result["video_processor_class"]) == ("TimeViperProcessor", "TimeViperVideoProcessor")
    assert result["video_token_id"] == result["config_video_token_id"] == vocab_size + 1
    assert result["padded_positions"] == VISION["grid"] ** 2  # the 2-frame sample: one frame's placeholders
    # A video prompt through the chat template, the processor, the compression stages (TransV) and generate().
    assert result["prompt"] == "<SPECIAL_10>System\n<SPECIAL_12>\n<SPECIAL_11>User\n<video>what happens in the video\n<SPECIAL_12><SPECIAL_11>Assistant\n"
    assert result["num_video_tokens"] == 3 * VISION["grid"] ** 2 and 1 <= len(result["generated"]) <= 3

    ids = torch.tensor([[1, 17, 18, 19, 20, 21, 22, 23, 24, 25, 3, 4]])
    with torch.no_grad():
        expected_logits = nano_reference(sources)(input_ids=ids).logits
    assert expected_logits.abs().max() > 0.5  # a meaningful comparison
    torch.testing.assert_close(result["logits"], expected_logits, rtol=0, atol=ATOL)
    pixels = torch.linspace(-1, 1, 2 * 3 * 28 * 28).reshape(2, 3, 28, 28)
    expected_features = timm_features(sources["timm_state"], pixels, VISION["depth"] - 1, VISION["heads"])
    torch.testing.assert_close(result["features"], expected_features, rtol=0, atol=ATOL)


def test_raw_qwen_conversion_with_hf_siglip_and_projector(sources, tmp_path):
    from transformers import Qwen2ForCausalLM, SiglipConfig, SiglipModel

    siglip_folder = tmp_path / "siglip-tiny"
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14)
    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=50,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(4)
    siglip = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
    siglip.save_pretrained(str(siglip_folder))

    # A stage-1 checkpoint of the reference: the full VLM state dict, of which only the projector is used.
    projector = {
        "projector.projector.0.weight": torch.randn(32, 32), "projector.projector.0.bias": torch.randn(32),
        "projector.projector.2.weight": torch.randn(32, 32), "projector.projector.2.bias": torch.randn(32),
        "vision_backbone.featurizer.norm.weight": torch.ones(32),
    }
    torch.save(projector, tmp_path / "stage1.bin")

    output = tmp_path / "qwen-out"
    convert_raw(
        sources, output, llm=sources["qwen"], vision=siglip_folder, projector=tmp_path / "stage1.bin",
        token_compression=QWEN_COMPRESSION, projector_type="tome_mlp-4", verify=True, verify_atol=ATOL,
    )
    config = json.loads((output / "config.json").read_text())
    assert (config["projector_type"], config["tokens_per_frame"]) == ("tome_mlp", 4)
    written = read_tensors(output)
    assert len(list(output.glob("*.safetensors"))) == 1 and not (output / "model.safetensors.index.json").exists()
    assert torch.equal(written["model.multi_modal_projector.linear_2.weight"], projector["projector.projector.2.weight"])
    # The feature is block 0's output (second-to-last hidden state of 2 blocks): block 1 and the post-norm are not kept.
    assert torch.equal(written["model.vision_tower.encoder.layers.0.mlp.fc2.weight"], siglip.vision_model.encoder.layers[0].mlp.fc2.weight)
    assert not any(".layers.1." in name or "post_layernorm" in name for name in written if "vision_tower" in name)
    # Stage 0 transfers (TransV from block 1, Qwen's own layer, biases included); stage 1 only drops.
    for name in ("q_proj.weight", "q_proj.bias", "v_proj.bias", "o_proj.weight"):
        assert torch.equal(written[f"model.language_model.merge_modules.0.{name}"], written[f"model.language_model.layers.1.self_attn.{name}"])
    assert not any("merge_modules.1" in name for name in written)
    assert written["model.language_model.merge_modules.0.alpha"].shape == (1,)

    model = common.load_converted_model(output)
    reference = Qwen2ForCausalLM.from_pretrained(str(sources["qwen"]), dtype=torch.float32).eval()
    ids = torch.randint(5, 200, (2, 9))  # ids 3 and 4 are the placeholders
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=ATOL)


def test_projector_from_our_hub_folder_and_tied_qwen(sources, tmp_path):
    """A stage-1 TimeViper Hub folder gives its projector; a tied Qwen (no lm_head.weight) gets a copy of its embeddings."""
    from inference.tiny_default import make_tiny_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # The vision tower may come from a reference checkpoint too (timm keys under vision_backbone.featurizer.).
    reference = tmp_path / "reference.bin"
    torch.save(reference_checkpoint(sources, ()), reference)
    first = tmp_path / "stage1"
    convert_raw(sources, seed=7, vision=reference, output=first)
    second = tmp_path / "stage2"
    convert_raw(sources, token_compression=None, projector=first, output=second)
    before, after = read_tensors(first), read_tensors(second)
    for name, tensor in read_tensors(second).items():
        if name.startswith("model.vision_tower."):  # the same timm tower, once bare and once under the prefix
            assert torch.equal(before[name], tensor), name
    for name in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"):
        assert torch.equal(after["model.multi_modal_projector." + name], before["model.multi_modal_projector." + name])
    assert not any("merge_modules" in name for name in after)

    tied = tmp_path / "Qwen2.5-tied"
    tokenizer = make_tiny_tokenizer("qwen2")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    randomize(Qwen2ForCausalLM(config), seed=8).save_pretrained(str(tied))
    tokenizer.save_pretrained(str(tied))
    with safe_open(str(tied / "model.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in handle.keys()
    output = tmp_path / "tied-out"
    convert_raw(sources, llm=tied, token_compression=None, verify=True, output=output, verify_atol=ATOL)
    written = read_tensors(output)
    assert torch.equal(written["lm_head.weight"], written["model.language_model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------------------------------------
# Safety
# ---------------------------------------------------------------------------------------------------------------------


def broken_nano_folder(sources, tmp_path, edit) -> Path:
    """A copy of the Nemotron-H source whose tensors went through `edit(dict)`."""
    folder = tmp_path / "broken-llm"
    folder.mkdir()
    for file in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / file).write_bytes((sources["nano"] / file).read_bytes())
    tensors = read_tensors(sources["nano"])
    edit(tensors)
    write_shards(tensors, folder)
    return folder


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda t: t.pop("backbone.layers.3.mixer.D"), ["missing tensor model.language_model.layers.3.mixer.D"]),
        (lambda t: t.update({"backbone.layers.1.mixer.gate_proj.weight": torch.zeros(56, 40)}),
         ["unexpected tensor model.language_model.layers.1.mixer.gate_proj.weight", "broken-llm:backbone.layers.1.mixer.gate_proj.weight"]),
        (lambda t: t.update({"mtp.layers.0.weight": torch.zeros(3)}), ["unexpected source tensor broken-llm:mtp.layers.0.weight"]),
        (lambda t: t.update({"backbone.layers.2.mixer.k_proj.weight": torch.zeros(16, 40)}),
         ["shape mismatch for model.language_model.layers.2.mixer.k_proj.weight: the model expects (8, 40)", "gives (16, 40)"]),
    ],
    ids=["missing", "unexpected-name", "unmapped-source", "shape-mismatch"],
)
def test_bad_sources_stop_before_writing(sources, tmp_path, edit, expected):
    llm = broken_nano_folder(sources, tmp_path, edit)
    output = tmp_path / "out"
    with pytest.raises(ConversionError) as error:
        convert_raw(sources, llm=llm, output=output)
    for text in expected:
        assert text in str(error.value)
    assert not output.exists() and no_leftovers(tmp_path)


def test_several_problems_are_listed_together(sources, tmp_path):
    def edit(tensors):
        tensors.pop("backbone.norm_f.weight")
        tensors.pop("lm_head.weight")
        tensors["backbone.layers.0.mixer.D"] = torch.zeros(7)

    with pytest.raises(ConversionError) as error:
        convert_raw(sources, llm=broken_nano_folder(sources, tmp_path, edit), output=tmp_path / "out")
    assert len(error.value.problems) == 3
    assert {"missing tensor model.language_model.norm_f.weight", "missing tensor lm_head.weight"} <= {
        line.split(" (")[0] for line in error.value.problems
    }


def test_output_never_replaces_a_source(sources, tmp_path):
    with pytest.raises(ConversionError, match="would replace the source"):
        convert_raw(sources, output=sources["nano"], force=True)
    with pytest.raises(ConversionError, match="would replace the source"):
        convert_raw(sources, output=sources["root"], force=True)
    assert (sources["nano"] / "model.safetensors.index.json").is_file()


def test_existing_output_needs_force(sources, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists; pass --force"):
        convert_raw(sources, output=output)
    with pytest.raises(ConversionError, match="only replaces a previous output of this converter"):
        convert_raw(sources, output=output, force=True)
    assert sorted(path.name for path in output.iterdir()) == ["keep.txt"]
    output = tmp_path / "converted"
    convert_raw(sources, output=output)
    (output / "config.json").write_text("{}")
    convert_raw(sources, output=output, force=True)
    assert json.loads((output / "config.json").read_text()) and no_leftovers(tmp_path)


def test_failure_midway_leaves_nothing(sources, tmp_path, monkeypatch):
    """A failure after some shards were written (here: in the tokenizer step) removes the partial folder and keeps
    the previous output untouched."""
    output = tmp_path / "out"
    convert_raw(sources, output=output)
    before = {path.name: path.read_bytes() for path in output.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(common, "write_processor", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_raw(sources, output=output, force=True)
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before and no_leftovers(tmp_path)


def test_verification_failure_leaves_nothing(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "round_trip_dtype", lambda module, dtype: _perturb(module))
    output = tmp_path / "out"
    with pytest.raises(ConversionError, match="does not reproduce the source"):
        convert_raw(sources, verify=True, output=output, verify_atol=ATOL)
    assert not output.exists() and no_leftovers(tmp_path)


def _perturb(module):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.01)
    return module


# ---------------------------------------------------------------------------------------------------------------------
# Reference checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def reference_checkpoint(sources, transfer_stages=(0, 1, 2), seed=5) -> dict[str, torch.Tensor]:
    """What the reference's `torch.save(vlm.state_dict())` holds for a Nano model trained with TransV."""
    generator = torch.Generator().manual_seed(seed)
    state = {f"vision_backbone.featurizer.{k}": v for k, v in sources["timm_state"].items()}
    hidden, width = 40, VISION["width"]
    state.update({
        "projector.projector.0.weight": torch.randn(hidden, width, generator=generator) / width**0.5,
        "projector.projector.0.bias": torch.randn(hidden, generator=generator),
        "projector.projector.2.weight": torch.randn(hidden, hidden, generator=generator) / hidden**0.5,
        "projector.projector.2.bias": torch.randn(hidden, generator=generator),
    })
    for key, value in read_tensors(sources["nano"]).items():
        name = "llm_backbone.llm." + key
        state[name] = value.float() + 0.01 * torch.randn(value.shape, generator=generator)  # "fine-tuned"
    shapes = {"q_proj": (40, 40), "k_proj": (8, 40), "v_proj": (8, 40), "o_proj": (40, 40)}
    for stage in transfer_stages:
        for name, shape in shapes.items():
            state[f"llm_backbone.llm.backbone.merge_modules.{stage}.{name}.weight"] = torch.randn(shape, generator=generator)
    if transfer_stages:
        state["llm_backbone.llm.backbone.alpha"] = torch.linspace(0.1, 0.3, len(transfer_stages))
    return state


def test_reference_checkpoint_round_trip(sources, tmp_path):
    state = reference_checkpoint(sources)
    torch.save(state, tmp_path / "pytorch_model.bin")
    output = tmp_path / "out"
    options = ConversionOptions(
        token_compression=NANO_COMPRESSION, projector_type="gelu_mlp", dtype="fp32", vision_num_heads=VISION["heads"],
        verify=True, verify_atol=ATOL, progress=False,
    )
    convert_reference_checkpoint(tmp_path / "pytorch_model.bin", sources["nano"], output, options)
    written = read_tensors(output)
    # The reference's one gate vector becomes each TransV module's own gate, entry j for the j-th transfer stage.
    gates = torch.cat([written[f"model.language_model.merge_modules.{stage}.alpha"] for stage in range(3)])
    assert torch.equal(gates, state["llm_backbone.llm.backbone.alpha"])
    for key, value in state.items():
        if "merge_modules" in key:
            assert torch.equal(written[key.replace("llm_backbone.llm.backbone.", "model.language_model.")], value)
    assert torch.equal(written["model.multi_modal_projector.linear_1.weight"], state["projector.projector.0.weight"])
    assert torch.equal(written["lm_head.weight"], state["llm_backbone.llm.lm_head.weight"])
    assert torch.equal(written["model.language_model.layers.4.mixer.up_proj.weight"], state["llm_backbone.llm.backbone.layers.4.mixer.up_proj.weight"])
    assert json.loads((output / "config.json").read_text())["projector_type"] == "mlp"
    # Loaded back, the model holds the same TransV values.
    model = common.load_converted_model(output)
    transfer = model.model.language_model.merge_modules
    gates = torch.cat([transfer[str(stage)].alpha.data for stage in range(3)])
    torch.testing.assert_close(gates, state["llm_backbone.llm.backbone.alpha"], rtol=0, atol=0)


def test_reference_safetensors_and_legacy_embedding_name(sources, tmp_path):
    state = reference_checkpoint(sources, transfer_stages=())
    state["llm_backbone.llm.backbone.embedding.weight"] = state.pop("llm_backbone.llm.backbone.embeddings.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    output = tmp_path / "out"
    options = ConversionOptions(
        token_compression="unidrop_1_0.5", projector_type="mlp", dtype="bf16", vision_num_heads=VISION["heads"],
        verify=True, progress=False,
    )
    convert_reference_checkpoint(tmp_path / "model.safetensors", sources["nano"], output, options)
    written = read_tensors(output)
    assert written["model.language_model.embeddings.weight"].dtype == torch.bfloat16
    assert torch.equal(written["model.language_model.embeddings.weight"], state["llm_backbone.llm.backbone.embedding.weight"].bfloat16())


@pytest.mark.parametrize(
    "transfer_stages, compression, expected",
    [
        ((0, 1, 2), "unidrop_1_0.5", ["llm_backbone.llm.backbone.merge_modules.0.", "alpha present but token_compression has no transfer stage"]),
        ((0, 1), NANO_COMPRESSION, ["transfer stage 2", "has no merge_modules.2.* tensors"]),
        ((), NANO_COMPRESSION, ["alpha is missing"]),
    ],
    ids=["transv-without-stages", "missing-stage", "stages-without-transv"],
)
def test_reference_transfer_mismatch_is_an_error(sources, tmp_path, transfer_stages, compression, expected):
    torch.save(reference_checkpoint(sources, transfer_stages), tmp_path / "ckpt.bin")
    with pytest.raises(ConversionError) as error:
        options = ConversionOptions(
            token_compression=compression, projector_type="mlp", dtype="fp32", vision_num_heads=VISION["heads"], progress=False
        )
        convert_reference_checkpoint(tmp_path / "ckpt.bin", sources["nano"], tmp_path / "out", options)
    for text in expected:
        assert text in str(error.value)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_reference_wrong_llm_family(sources, tmp_path):
    torch.save(reference_checkpoint(sources, ()), tmp_path / "ckpt.bin")
    with pytest.raises(ConversionError, match="holds a nemotron_h LLM"):
        options = ConversionOptions(vision_num_heads=4, progress=False)
        convert_reference_checkpoint(tmp_path / "ckpt.bin", sources["qwen"], tmp_path / "out", options)


# ---------------------------------------------------------------------------------------------------------------------
# CLIs
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_help():
    commands = {"--llm": "convert.convert_raw_to_hub", "--checkpoint": "convert.convert_reference_checkpoint"}
    running = {
        flag: subprocess.Popen([sys.executable, "-m", module, "--help"], cwd=REPO, stdout=subprocess.PIPE, text=True)
        for flag, module in commands.items()
    }
    for flag, process in running.items():
        stdout, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        assert flag in stdout and "--force" in stdout and "--token-compression" in stdout and "--verify" in stdout


def test_cli_reports_errors_without_traceback(sources, tmp_path, capsys):
    from convert.convert_raw_to_hub import main

    (tmp_path / "out").mkdir()
    code = main(["--llm", str(sources["nano"]), "--vision", str(sources["timm"]), "--output", str(tmp_path / "out"),
                 "--vision-num-heads", "4", "--no-progress"])
    assert code == 1 and "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("token_compression, expected", [
    ("none", []),
    (json.dumps([{"layer_idx": 1, "keep_ratio": 0.5}, {"layer_idx": 2, "keep_ratio": 0.25, "method": "attention"}]),
     [{"layer_idx": 1, "keep_ratio": 0.5, "method": "uniform", "transfer": True},
      {"layer_idx": 2, "keep_ratio": 0.25, "method": "attention", "transfer": True}]),
])
def test_python_api_reads_token_compression_as_the_cli_does(sources, tmp_path, token_compression, expected):
    """`ConversionOptions(token_compression=...)` takes the CLI's text forms ('none', a JSON list of stages) too."""
    convert_raw(sources, tmp_path / "python", token_compression=token_compression)
    assert json.loads((tmp_path / "python" / "config.json").read_text())["token_compression"] == expected
