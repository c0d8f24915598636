"""Would an FP8 vision tower pay? The SigLIP so400m tower's linear shapes on one 256-frame chunk (186,624 tokens), one
GPU: bf16 cuBLAS against FP8 e4m3 `torch._scaled_mm`, with a scale per row of the activation and per output channel
of the weight (rowwise) and with one scale per tensor (tensorwise), plus the cost of quantising the activation
(amax, scale, cast; eager and torch.compile'd) and each product's error against bf16. `per_chunk` adds the shapes up
over the tower's 26 layers (q, k, v as one 1152 x 3456 product).

    source benchmarks/gpu_setup.sh
    python benchmarks/vision_fp8.py --out benchmarks/results/vision_fp8.json
"""

import argparse
import os
import sys
from statistics import median_high

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import log, meta, save, timed  # noqa: E402

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
# (input features, output features) of so400m's qkv, out_proj, fc1 and fc2.
SHAPES = ((1152, 3456), (1152, 1152), (1152, 4304), (4304, 1152))
LAYERS = 26  # the tower's blocks up to the second-to-last


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/vision_fp8.json")
    p.add_argument("--tokens", type=int, default=256 * 729, help="rows of the activation (256 frames x 729 patches)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-cap-gib", type=float, default=79.0, help="as in long_video.py (H200 -> 80 GB H100)")
    return p.parse_args(argv)


def quantize_rows(tensor):
    """float8 e4m3 of `tensor` with one float32 scale per row (amax / 448), and the scales (rows, 1)."""
    scale = tensor.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (tensor.float() / scale).to(torch.float8_e4m3fn), scale


def quantize_tensor(tensor):
    """float8 e4m3 of `tensor` with one float32 scale, and the scale (a 0-d tensor)."""
    scale = tensor.abs().amax().float().clamp(min=1e-12) / E4M3_MAX
    return (tensor.float() / scale).to(torch.float8_e4m3fn), scale


def median_seconds(device, fn, repeats):
    times = [timed(device, fn)[0] for _ in range(repeats + 1)]
    return median_high(times[1:])


def relative_error(approx, exact):
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()


def measure_shape(device, tokens, in_features, out_features, repeats, quantize_rows_compiled):
    torch.manual_seed(0)
    activation = torch.randn(tokens, in_features, device=device, dtype=torch.bfloat16)
    weight = 0.03 * torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16)
    bias = 0.01 * torch.randn(out_features, device=device, dtype=torch.bfloat16)
    exact = F.linear(activation, weight, bias)
    a_rows, a_row_scale = quantize_rows(activation)
    w_rows, w_row_scale = quantize_rows(weight)
    a_tensor, a_scale = quantize_tensor(activation)
    w_tensor, w_scale = quantize_tensor(weight)

    def rowwise():
        return torch._scaled_mm(a_rows, w_rows.t(), scale_a=a_row_scale, scale_b=w_row_scale.reshape(1, -1),
                                bias=bias, out_dtype=torch.bfloat16)

    def tensorwise():
        return torch._scaled_mm(a_tensor, w_tensor.t(), scale_a=a_scale, scale_b=w_scale, bias=bias,
                                out_dtype=torch.bfloat16)

    record = {"in": in_features, "out": out_features,
              "bf16_s": median_seconds(device, lambda: F.linear(activation, weight, bias), repeats),
              "quantize_rows_eager_s": median_seconds(device, lambda: quantize_rows(activation), repeats),
              "quantize_rows_compiled_s": median_seconds(device, lambda: quantize_rows_compiled(activation), repeats),
              "quantize_tensor_eager_s": median_seconds(device, lambda: quantize_tensor(activation), repeats)}
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


def per_chunk(shapes):
    """The tower's linear time per chunk in bf16 and in FP8 including the activation's quantisation (compiled)."""
    totals = {"bf16_s": 0.0, "fp8_rowwise_with_quantization_s": 0.0, "fp8_tensorwise_gemm_only_s": 0.0}
    for record in shapes:
        totals["bf16_s"] += LAYERS * record["bf16_s"]
        totals["fp8_rowwise_with_quantization_s"] += LAYERS * (record.get("fp8_rowwise_s", float("nan"))
                                                               + record["quantize_rows_compiled_s"])
        totals["fp8_tensorwise_gemm_only_s"] += LAYERS * record.get("fp8_tensorwise_s", float("nan"))
    return totals


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda")
    torch.set_grad_enabled(False)
    results = {"meta": meta(device, args), "tokens": args.tokens, "layers": LAYERS}
    quantize_rows_compiled = torch.compile(quantize_rows, dynamic=False, fullgraph=True)
    results["shapes"] = [measure_shape(device, args.tokens, i, o, args.repeats, quantize_rows_compiled)
                         for i, o in SHAPES]
    results["per_chunk"] = per_chunk(results["shapes"])
    log("per chunk", results["per_chunk"])
    save(results, args)


if __name__ == "__main__":
    main()
