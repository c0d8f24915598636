"""The model wrapper: training signals, checkpointing, attention implementations, saving/loading, bad input."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VIDEO_TOKEN_ID, open_transfer_gates, tiny_config, tiny_model

from transformers import SiglipVisionConfig, SiglipVisionModel

import timeviper.modeling_timeviper as modeling
from inference.tiny_default import tiny_vision_config
from timeviper.modeling_timeviper import TimeViperForConditionalGeneration


def batch(frame_counts=(2, 3)):
    rows = [[5, 6] + [VIDEO_TOKEN_ID] * (4 * f) + [7, 8, 9, 10] for f in frame_counts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # right padding, as in training
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    labels[ids == VIDEO_TOKEN_ID] = -100
    labels[:, :2] = -100
    pixels = torch.randn(sum(frame_counts), 3, 28, 28, generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values_videos=pixels)


def gradients(model, inputs):
    model.zero_grad()
    model(**inputs).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
def test_loss_and_gradients_reach_projector_and_llm_not_a_frozen_vision_tower(backbone):
    model = tiny_model(backbone, token_compression="uni_1_0.5").train()
    model.model.vision_tower.requires_grad_(False)
    grads = gradients(model, batch())
    assert all(not name.startswith("model.vision_tower.") for name in grads)
    assert grads["model.multi_modal_projector.linear_1.weight"].abs().sum() > 0
    assert any(name.startswith("model.language_model.layers.") and g.abs().sum() > 0 for name, g in grads.items())
    assert grads["lm_head.weight"].abs().sum() > 0


@pytest.mark.numerics
@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
def test_gradient_checkpointing_gives_the_same_gradients(backbone):
    model = tiny_model(backbone, token_compression="uni_1_0.5-attn_2_0.25").train()
    open_transfer_gates(model, 0.3)
    inputs = batch()
    plain = gradients(model, inputs)
    model.gradient_checkpointing_enable()
    checkpointed = gradients(model, inputs)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.numerics
@pytest.mark.parametrize("backbone", ["nemotron_h", "qwen2"])
def test_eager_attention_equals_sdpa(backbone):
    sdpa = tiny_model(backbone, token_compression="uni_1_0.5-attn_2_0.25")
    eager = TimeViperForConditionalGeneration(tiny_config(backbone, token_compression="uni_1_0.5-attn_2_0.25", attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert eager.config.text_config._attn_implementation == "eager"
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(eager(**inputs).logits, sdpa(**inputs).logits, atol=1e-5, rtol=0)


@pytest.mark.numerics
def test_save_and_load_with_auto_classes_in_a_fresh_process(tmp_path):
    model = tiny_model(token_compression="uni_1_0.5-attn_2_0.25")
    open_transfer_gates(model, 0.4)
    model.save_pretrained(tmp_path / "ckpt")
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.save(model(**inputs).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoConfig, AutoModelForImageTextToText
        config = AutoConfig.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert "timeviper" not in sys.modules, "the installed package must not be needed"
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            logits = model(**inputs).logits
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        print(config.model_type, float((logits - expected).abs().max()))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    model_type, diff = result.stdout.split()
    # The fresh process computes with its own thread count (and, on another machine, maybe other kernels), which
    # reorders fp32 reductions: rounding moves these logits (|x| < 1) by ~1e-7 (8.9e-8 seen on an AMD EPYC). What the
    # test guards against is 100x larger: the TransV gate left closed moves them by 1.8e-3, one norm weight that did
    # not load by 0.2.
    assert model_type == "timeviper" and float(diff) < 1e-5, diff
    assert "AutoModelForImageTextToText" in json.loads((tmp_path / "ckpt" / "config.json").read_text())["auto_map"]


@pytest.mark.numerics
def test_loading_in_bfloat16_gives_the_saved_model_cast_to_bfloat16(tmp_path):
    """from_pretrained(dtype=bf16) must hold every parameter as .to(bf16) would (Mamba's A_log included): training
    engines cast that way, so otherwise a reloaded checkpoint computes differently from the model that was saved."""
    model = tiny_model(token_compression="uni_1_0.5-attn_2_0.25")
    with torch.no_grad():
        for parameter in model.parameters():  # values with mantissa bits bf16 lacks, so rounding shows
            parameter.add_(torch.randn_like(parameter) * 1e-3)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = TimeViperForConditionalGeneration.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16).eval()
    cast = model.to(torch.bfloat16)
    expected = dict(cast.named_parameters())
    assert {name: p.dtype for name, p in loaded.named_parameters()} == {name: p.dtype for name, p in expected.items()}
    assert all(torch.equal(p, expected[name]) for name, p in loaded.named_parameters())
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, cast(**inputs).logits)


def test_bad_pixel_shapes_are_clear_errors():
    model = tiny_model()
    inputs = batch((2,))
    with pytest.raises(ValueError, match=r"pixel values must have shape \(frames, 3, 28, 28\).*got \(2, 3, 32, 32\)"):
        model(input_ids=inputs["input_ids"], pixel_values_videos=torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="got \\(2, 28, 28\\)"):
        model(input_ids=inputs["input_ids"], pixel_values_videos=torch.randn(2, 28, 28))


def test_attention_scoring_memory_is_linear_in_the_sequence_length():
    """20k tokens: an L x L float32 score matrix would be 1.6 GB. Scoring + compression must stay far below."""
    script = textwrap.dedent(
        """
        import resource, torch
        from tiny_models import tiny_model
        from timeviper.modeling_timeviper import SequenceState
        model = tiny_model(token_compression="attn_2_0.1")
        text_model = model.model.language_model
        length = 20_000
        hidden = torch.randn(1, length, 48)
        valid = torch.ones(1, length, dtype=torch.bool)
        vision = valid.clone(); vision[0, :2] = False; vision[0, -4:] = False
        positions = torch.arange(length)[None]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.no_grad():
            state = text_model.compressors[0].compress(SequenceState(hidden, valid, vision, positions, vision.sum(-1), positions[:, -1]), None)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(state.hidden_states.shape[1], grown)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=__import__("pathlib").Path(__file__).parent, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    kept, grown_kib = map(int, result.stdout.split())
    assert kept == 2 + int(19_994 * 0.1) + 4
    assert grown_kib < 300 * 1024  # far below the 1.6 GB an L x L matrix would take


@pytest.mark.parametrize("gates, error", [((0.0, 0.0), None), ((0.0, 0.4), "open TransV gates")])
def test_legacy_gate_vector_of_a_schedule_without_transfer_stages(tmp_path, gates, error, caplog):
    """Folders of drop-only schedules written before each TransV module held its gate carry a legacy vector
    `model.language_model.alpha` of closed gates: it loads with a warning. An open gate means the checkpoint was
    trained with TransV, which this schedule would silently lose: an error."""
    from safetensors.torch import load_file, save_file

    model = tiny_model(token_compression="unidrop_1_0.5-unidrop_2_0.25")
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.language_model.alpha"] = torch.tensor(gates)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    if error is not None:
        with pytest.raises(ValueError, match=error):
            TimeViperForConditionalGeneration.from_pretrained(tmp_path)
        return
    with caplog.at_level("WARNING"):
        loaded, info = TimeViperForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert "ignoring them" in caplog.text
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def attention_inputs(device_type, key_len):
    """Stand-ins with what `sdpa_backend_order` reads of the query and key: the device and the key length."""
    from types import SimpleNamespace

    return SimpleNamespace(is_cuda=device_type == "cuda"), SimpleNamespace(shape=(1, 2, key_len, 8))


@pytest.mark.parametrize(
    "device_type, key_len, masked, causal, grad, cudnn_first",
    [
        ("cuda", 65536, False, True, False, True),  # a whole causal prefill: cuDNN first
        ("cuda", 524288, False, True, False, True),  # the longest length cuDNN was run at
        ("cuda", 524289, False, True, False, False),  # past it: FlashAttention-2
        ("cuda", 32768, False, True, False, True),  # the shortest at which cuDNN's per-length plan pays
        ("cuda", 32767, False, True, False, False),
        ("cuda", 65536, True, True, False, False),  # a mask (padding, TransV memory): not cuDNN
        ("cuda", 65536, False, False, False, False),  # not causal
        ("cuda", 65536, False, True, True, False),  # training keeps the backward it was verified with
    ],
)
def test_sdpa_backend_order(device_type, key_len, masked, causal, grad, cudnn_first):
    query, key = attention_inputs(device_type, key_len)
    with torch.set_grad_enabled(grad):
        order = modeling.sdpa_backend_order(query, key, object() if masked else None, causal)
    cudnn_first = cudnn_first and modeling.CAN_PRIORITIZE_SDPA  # torch < 2.6 cannot put cuDNN first
    assert order == (modeling.CUDNN_FIRST_BACKENDS if cudnn_first else modeling.NON_CUDNN_BACKENDS)


def test_sdpa_backend_order_leaves_cpu_to_pytorch():
    assert modeling.sdpa_backend_order(*attention_inputs("cpu", 64), None, True) is None


def test_squared_relu_kernel_gives_relu_squared():
    """The MLP's one-pass Triton squared ReLU (CUDA only), run here by Triton's CPU interpreter: every element of a
    length that is not a multiple of the kernel's block, float32 exactly. The interpreter truncates when it rounds
    to bfloat16 (the GPU rounds to nearest, as PyTorch does), so bfloat16 is held to one bfloat16 step here; the
    GPU equality is checked by benchmarks/llm_prefill.py."""
    pytest.importorskip("triton", reason="Triton comes with the CUDA build of torch the suite installs")
    script = textwrap.dedent(
        """
        import torch
        from timeviper.modeling_timeviper import squared_relu_
        torch.manual_seed(0)
        x = 3 * torch.randn(3, 4097)
        assert torch.equal(squared_relu_(x.clone()), torch.relu(x).square())
        x = x.bfloat16()
        expected = torch.relu(x).square().float()
        step = expected.abs() * 2.0**-7  # one bfloat16 step at each value (8 significant bits)
        assert bool(((squared_relu_(x.clone()).float() - expected).abs() <= step).all())
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # read when the kernel is defined, so in a fresh process
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.split() == ["ok"], result.stderr


def layer_norm_kernel_stand_in(x, weight, bias, residual=None, prenorm=False, eps=1e-6):
    """mamba-ssm's `layer_norm_fn` contract (a CUDA-only Triton kernel) in PyTorch: the float32 sum of `x` and
    `residual` is normalised; with `prenorm` the sum comes back too, in the residual's dtype."""
    total = x.float() if residual is None else x.float() + residual.float()
    normed = F.layer_norm(total, weight.shape, weight.float(), bias.float(), eps).to(x.dtype)
    return (normed, total.to(x.dtype if residual is None else residual.dtype)) if prenorm else normed


def tiny_siglip(**overrides):
    torch.manual_seed(0)
    config = SiglipVisionConfig(**{**tiny_vision_config(), **overrides})
    return SiglipVisionModel(config).eval()


def test_fused_siglip_blocks_compute_what_the_blocks_do(monkeypatch):
    """The fused inference path of the vision tower (CUDA only) with a PyTorch stand-in for its Triton add +
    LayerNorm (benchmarks/vision_tower.py checks the kernel on the GPU), against the tower's own blocks: residual
    adds moved into the next LayerNorm, q/k/v from one matmul. float32: the same sums in another order, so equal to
    float32 rounding."""
    monkeypatch.setattr(modeling, "layernorm_kernel", layer_norm_kernel_stand_in)
    vision = tiny_siglip()
    layers = vision.encoder.layers
    hidden = torch.randn(3, 49, vision.config.hidden_size)
    with torch.no_grad():
        expected = hidden
        for layer in layers:
            expected = layer(expected, None)
        fused = modeling.siglip_blocks_inference(layers, hidden)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_fused_siglip_blocks_only_for_plain_sdpa_blocks():
    """The fused path reads weights itself, so anything that would change a bypassed module's output keeps the
    towers' own blocks: an adapter, a hook, a compiled block, eager attention."""
    from peft import LoraConfig, get_peft_model

    assert modeling.fusable_siglip_blocks(tiny_siglip())
    assert not modeling.fusable_siglip_blocks(tiny_siglip(attn_implementation="eager"))
    hooked = tiny_siglip()
    hooked.encoder.layers[1].layer_norm2.register_forward_hook(lambda module, args, output: output * 2)
    assert not modeling.fusable_siglip_blocks(hooked)
    adapted = get_peft_model(tiny_siglip(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert not modeling.fusable_siglip_blocks(adapted.base_model.model)
    compiled = tiny_siglip()
    compiled.encoder.layers[0] = torch.compile(compiled.encoder.layers[0])  # compiles lazily: nothing runs here
    assert not modeling.fusable_siglip_blocks(compiled)
