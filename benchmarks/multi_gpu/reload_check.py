"""Reload a training output folder on one device and compare its probe logits with those of the trained model.

    PYTHONPATH=. python benchmarks/multi_gpu/reload_check.py /tmp/tv/fsdp/output --initial /tmp/tv/model \
        --probe /tmp/tv/data/probe_batch.pt --reference /tmp/tv/fsdp/probe_logits.pt --out /tmp/tv/fsdp/reload.json

Loads the folder as a user would (`AutoModelForImageTextToText`, `trust_remote_code=True`) in the parameter dtype and
autocast state that train_bench.py recorded, with the Triton configs the trained model's process chose
(triton_choices.py), so the logits must be bitwise identical. Also compares the folder's tensor names and a sample of
its tensors with the input checkpoint (--initial): trained groups must have moved, the frozen vision tower must not.
Writes the report to --out; exits 1 on any problem (`verdict`).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

import block_outputs
from prepare import module_group, probe_paths
from triton_choices import autotune_choices, pin_autotune_choices

TENSORS_PER_GROUP = 4  # compared with the input checkpoint (the first ones by name, plus lm_head.weight)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="training output folder (model.safetensors, config.json, remote code)")
    p.add_argument("--initial", required=True, help="the input checkpoint folder that training started from")
    p.add_argument("--probe", required=True, help="probe batch written by prepare.py")
    p.add_argument("--reference", required=True, help="probe_logits.pt written by train_bench.py")
    p.add_argument("--out", required=True, help="JSON report")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def saved_weights(folder: Path) -> dict:
    """Size on disk and tensor dtypes of the folder's safetensors files (FSDP saves fp32, ZeRO-3 its 16-bit copy)."""
    files = sorted(folder.glob("*.safetensors"))
    dtypes = set()
    for path in files:
        with safe_open(path, "pt") as f:
            dtypes.update(f.get_slice(name).get_dtype() for name in f.keys())
    return {"files": len(files), "gib": sum(p.stat().st_size for p in files) / 2**30, "dtypes": sorted(dtypes)}


def tensor_files(folder: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            names.update(dict.fromkeys(f.keys(), path))
    return names


def read(path: Path, name: str) -> torch.Tensor:
    with safe_open(path, "pt") as f:
        return f.get_tensor(name).float()


def against_initial(saved: Path, initial: Path) -> dict:
    """The folder against the input checkpoint: the tensor names either lacks (both empty when training saved under
    the names it loaded; transformers may still load a renamed folder through its key conversions, so the loading
    report alone would not show it) and, per module group, which of a sample of the tensors both hold differ and by
    how much."""
    saved_files, initial_files = tensor_files(saved), tensor_files(initial)
    saved_names, initial_names = set(saved_files), set(initial_files)
    keys = {"not_saved": sorted(initial_names - saved_names), "not_in_initial": sorted(saved_names - initial_names)}
    sample = {}
    for name in sorted(initial_names & saved_names):
        group = module_group(name)
        if len(sample.setdefault(group, [])) < TENSORS_PER_GROUP or name == "lm_head.weight":
            sample[group].append(name)
    report = {}
    for group, names in sorted(sample.items()):
        changed, max_change = [], 0.0
        for name in names:
            after, before = read(saved_files[name], name), read(initial_files[name], name)
            if not torch.equal(after, before):
                changed.append(name)
                max_change = max(max_change, (after - before).abs().max().item())
        report[group] = {"compared": names, "changed": changed, "max_abs_change": max_change}
    return {"key_names_vs_initial": keys, "weights_vs_initial": report}


def load(folder: Path, dtype: torch.dtype, device: str):
    start = time.perf_counter()
    # device_map puts the weights straight on the GPU (no full-size copy in host memory first).
    device_map = {"": device} if device != "cpu" else None
    model, info = AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=dtype, device_map=device_map, output_loading_info=True
    )
    loading = {key: sorted(map(str, value)) for key, value in info.items()}
    loading.update(seconds=time.perf_counter() - start, model_class=f"{type(model).__module__}.{type(model).__name__}")
    return model.eval(), loading


def compare(reference: dict, output) -> dict:
    expected, actual = reference["logits"], output.logits.detach().float().cpu()
    if expected.shape != actual.shape:
        return {"shape_equal": False, "reference_shape": list(expected.shape), "reloaded_shape": list(actual.shape)}
    diff = (actual - expected).abs()
    scale = expected.abs().max().item()
    return {
        "shape_equal": True, "shape": list(expected.shape),
        "kept_positions_equal": torch.equal(reference["kept_positions"], output.kept_positions.cpu()),
        "bitwise_identical": torch.equal(expected, actual),
        "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(), "max_abs_reference": scale,
        "relative_max_diff": diff.max().item() / scale if scale else float("inf"),
        "argmax_agreement": (expected.argmax(-1) == actual.argmax(-1)).float().mean().item(),
        "loss_reference": reference["loss"], "loss_reloaded": float(output.loss),
    }


def verdict(report: dict) -> list[str]:
    """Reasons the check failed (empty: passed)."""
    problems = [f"{key}: {report['loading'][key]}" for key in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                                              "error_msgs") if report["loading"].get(key)]
    for key, names in report["key_names_vs_initial"].items():
        if names:
            problems.append(f"{key} ({len(names)}): {names[:5]}{' ...' if len(names) > 5 else ''}")
    changes = report["weights_vs_initial"]
    if changes.get("vision", {}).get("changed"):
        problems.append(f"the frozen vision tower changed: {changes['vision']['changed']}")
    if not any(group["changed"] for name, group in changes.items() if name != "vision"):
        problems.append("no trained tensor differs from the input checkpoint: the folder holds untrained weights")
    triton = report["triton_autotune"]
    if triton["unknown"]:
        problems.append(f"Triton configs of the trained model not available here: {triton['unknown']}")
    for name, logits in report["logits"].items():
        if not logits["repeat_identical"]:
            problems.append(f"{name} probe: two forwards of the reloaded model differ (nondeterministic kernels)")
        if not logits["reference_repeat_identical"]:
            problems.append(f"{name} probe: two forwards of the trained model differ "
                            "(nondeterministic under the engine)")
        if not logits["shape_equal"]:
            problems.append(f"{name} probe: logits shape {logits['reloaded_shape']} != {logits['reference_shape']}")
        elif not logits["bitwise_identical"]:
            where = logits["outputs"]
            problems.append(f"{name} probe: logits differ (max |diff| {logits['max_abs_diff']:.3g}, argmax "
                            f"agreement {logits['argmax_agreement']:.4f}, kept positions equal: "
                            f"{logits['kept_positions_equal']}; "
                            f"first differing output: {where['first_differing']}, differing weights: "
                            f"{len(where['differing_weights'])} of {where['weights_compared']}, first "
                            f"{where['first_differing_weights']})")
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = Path(args.folder)
    reference = torch.load(args.reference)
    dtype = getattr(torch, reference["param_dtype"])
    model, loading = load(folder, dtype, args.device)
    device_type = torch.device(args.device).type
    autocast = torch.autocast(device_type, dtype=getattr(torch, reference["autocast_dtype"]),
                              enabled=reference["autocast"])
    triton = pin_autotune_choices(reference["triton_autotune"])
    start = time.perf_counter()
    comparisons = {}
    for name, path in probe_paths(args.probe).items():
        batch = {key: value.to(args.device) for key, value in torch.load(path).items()}
        with autocast:
            output, outputs, repeated = block_outputs.probe_forward(model, model, batch, name)
        comparisons[name] = {**compare(reference[name], output), "repeat_identical": repeated,
                             "reference_repeat_identical": reference[name]["repeat_identical"],
                             "outputs": block_outputs.compare(reference[name]["outputs"], outputs)}
    report = {
        "device": torch.cuda.get_device_name(args.device) if device_type == "cuda" else "cpu",
        "compute": {key: reference[key] for key in ("param_dtype", "autocast", "autocast_dtype")},
        "saved_weights": saved_weights(folder), **against_initial(folder, Path(args.initial)),
        "loading": loading, "forward_s": time.perf_counter() - start,
        # Keys tuned in this process had no recorded choice (the trained model's forward never met those shapes).
        "triton_autotune": {**triton, "tuned_here": len(autotune_choices()) - triton["pinned"]},
        "logits": comparisons,
    }
    report["problems"] = verdict(report)
    report["passed"] = not report["problems"]
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1), flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
