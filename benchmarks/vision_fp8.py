"""Would an FP8 vision tower pay? The SigLIP so400m tower's linear shapes on one 256-frame chunk (186,624 tokens), one
GPU: bf16 cuBLAS against FP8 e4m3 `torch._scaled_mm`, with a scale per row of the activation and per output channel
of the weight (rowwise) and with one scale per tensor (tensorwise), plus the cost of quantising the activation
(amax, scale, cast; eager and torch.compile'd) and each product's error against bf16. `per_chunk` adds the shapes up
over the blocks the tower runs (q, k, v as one product). The shapes come from the package's so400m configuration.

    source benchmarks/gpu_setup.sh
    python benchmarks/vision_fp8.py --out benchmarks/results/vision_fp8.json
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import log, make_config, meta, median_seconds, save  # noqa: E402

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def tower_shapes():
    """(input, output features) of the tower's qkv (as one product), out_proj, fc1 and fc2; the blocks it runs; the
    patches per frame: from the package's so400m configuration."""
    config = make_config("a", tiny=False)
    vision = config.vision_config
    hidden, mlp = vision.hidden_size, vision.intermediate_size
    patches = (vision.image_size // vision.patch_size) ** 2
    return ((hidden, 3 * hidden), (hidden, hidden), (hidden, mlp), (mlp, hidden)), config.vision_layers_used, patches


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/vision_fp8.json")
    p.add_argument("--frames", type=int, default=256, help="frames per chunk: the activation has frames x patches rows")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-cap-gib", type=float, default=79.0, help="as in long_video.py (H200 -> 80 GB H100)")
    return p.parse_args(argv)


def quantize(tensor, rowwise):
    """float8 e4m3 of `tensor` and its float32 scales (amax / 448): one per row (rows, 1) or one (0-d)."""
    amax = tensor.abs().amax(dim=-1, keepdim=True) if rowwise else tensor.abs().amax()
    scale = amax.float().clamp(min=1e-12) / E4M3_MAX
    return (tensor.float() / scale).to(torch.float8_e4m3fn), scale


def relative_error(approx, exact):
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()


def measure_shape(device, tokens, in_features, out_features, repeats, quantize_compiled):
    torch.manual_seed(0)
    activation = torch.randn(tokens, in_features, device=device, dtype=torch.bfloat16)
    weight = 0.03 * torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16)
    bias = 0.01 * torch.randn(out_features, device=device, dtype=torch.bfloat16)
    exact = F.linear(activation, weight, bias)
    a_rows, a_row_scale = quantize(activation, rowwise=True)
    w_rows, w_row_scale = quantize(weight, rowwise=True)
    a_tensor, a_scale = quantize(activation, rowwise=False)
    w_tensor, w_scale = quantize(weight, rowwise=False)

    def rowwise():
        return torch._scaled_mm(a_rows, w_rows.t(), scale_a=a_row_scale, scale_b=w_row_scale.reshape(1, -1),
                                bias=bias, out_dtype=torch.bfloat16)

    def tensorwise():
        return torch._scaled_mm(a_tensor, w_tensor.t(), scale_a=a_scale, scale_b=w_scale, bias=bias,
                                out_dtype=torch.bfloat16)

    record = {"in": in_features, "out": out_features,
              "bf16_s": median_seconds(device, lambda: F.linear(activation, weight, bias), repeats),
              "quantize_rows_eager_s": median_seconds(device, lambda: quantize(activation, rowwise=True), repeats),
              "quantize_rows_compiled_s": median_seconds(
                  device, lambda: quantize_compiled(activation, rowwise=True), repeats),
              "quantize_tensor_eager_s": median_seconds(device, lambda: quantize(activation, rowwise=False), repeats)}
    for label, product in (("fp8_rowwise", rowwise), ("fp8_tensorwise", tensorwise)):
        try:
            record[f"{label}_s"] = median_seconds(device, product, repeats)
            record[f"{label}_relative_error"] = relative_error(product(), exact)
        except RuntimeError as err:
            record[f"{label}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    flops = 2 * tokens * in_features * out_features
    record["tflops"] = {k.removesuffix("_s"): flops / v / 1e12 for k, v in record.items()
                        if k.endswith("_s") and not k.startswith("quantize")}
    log(record)
    return record


def per_chunk(shapes, layers):
    """The tower's linear time per chunk in bf16 and in FP8 including the activation's quantisation (compiled)."""
    totals = {"bf16_s": 0.0, "fp8_rowwise_with_quantization_s": 0.0, "fp8_tensorwise_gemm_only_s": 0.0}
    for record in shapes:
        totals["bf16_s"] += layers * record["bf16_s"]
        totals["fp8_rowwise_with_quantization_s"] += layers * (record.get("fp8_rowwise_s", float("nan"))
                                                               + record["quantize_rows_compiled_s"])
        totals["fp8_tensorwise_gemm_only_s"] += layers * record.get("fp8_tensorwise_s", float("nan"))
    return totals


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda")
    torch.set_grad_enabled(False)
    shapes, layers, patches = tower_shapes()
    tokens = args.frames * patches
    results = {"meta": meta(device, args), "tokens": tokens, "layers": layers}
    quantize_compiled = torch.compile(quantize, dynamic=False, fullgraph=True)
    results["shapes"] = [measure_shape(device, tokens, i, o, args.repeats, quantize_compiled) for i, o in shapes]
    results["per_chunk"] = per_chunk(results["shapes"], layers)
    log("per chunk", results["per_chunk"])
    save(results, args)


if __name__ == "__main__":
    main()
