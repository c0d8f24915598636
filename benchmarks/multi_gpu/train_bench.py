"""`python -m training.train` with measurements, for the multi-GPU benchmark (run.sh launches it with accelerate; the
README beside this file says what is measured and how).

    accelerate launch --config_file training/accelerate_configs/fsdp.yaml --num_processes 2 \
        benchmarks/multi_gpu/train_bench.py --bench-dir /tmp/tv/fsdp --bench-probe /tmp/tv/data/probe_batch.pt \
        --model /tmp/tv/model --data ... (every other option goes to training.train unchanged)

Every rank writes `<bench-dir>/rank<r>.json`: per optimizer step its times, loss and peak memory (a step profiled
with --bench-profile-step is marked `profiled`), and the load, train and save times. Rank 0 saves the probe batches'
logits through the trained model as the engine holds it to `<bench-dir>/probe_logits.pt` for reload_check.py.
"""

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

import block_outputs
from prepare import probe_paths
from triton_choices import autotune_choices
from training.train import main as train_main

GIB = 2**30
# Kinds of GPU kernel, by substrings of their names (the first kind that matches wins): NCCL collectives, cuBLAS /
# CUTLASS matmuls, attention kernels, mamba-ssm's Triton chunked-scan kernels (forward and backward), copies.
KERNEL_KINDS = (
    ("communication", ("nccl",)),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
    ("attention", ("flash", "fmha", "attention")),
    ("mamba_scan", ("_chunk_scan", "_chunk_state", "_state_passing", "_bmm_chunk", "_chunk_cumsum")),
    ("copy", ("memcpy", "memset")),
)


def sync() -> float:
    """`time.perf_counter()` once the GPU's queued work is done (step times are otherwise launch times)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_memory() -> dict:
    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"max_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "max_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "device_used_gib": (total - free) / GIB}  # CUDA context and NCCL buffers included


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, markers in KERNEL_KINDS if any(m in lowered for m in markers)), "other")


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals in microseconds, in seconds: time in which at least one of
    them ran (kernels of several streams overlap)."""
    busy, covered_until = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > covered_until:
            busy += end - max(start, covered_until)
            covered_until = end
    return busy / 1e6


def kernel_profile(events, step_s: float) -> dict:
    """GPU kernel time of one profiled step: summed per kind, the union of all kernels (`busy_s`), of the
    non-communication kernels (`compute_busy_s`) and of the communication kernels, and the 15 longest kernels."""
    # GPU-side annotations (record_function ranges such as `FullyShardedDataParallel.forward` or
    # `nccl:_all_gather_base`) are CUDA events too, spanning kernels and gaps: only kernels and copies count.
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    kinds = [kernel_kind(kernel.name) for kernel in kernels]
    spans = [(kernel.time_range.start, kernel.time_range.end) for kernel in kernels]
    by_kind, by_name = collections.Counter(), collections.Counter()
    for kernel, kind, (start, end) in zip(kernels, kinds, spans):
        by_kind[kind] += (end - start) / 1e6
        by_name[kernel.name] += (end - start) / 1e6
    communication = [span for span, kind in zip(spans, kinds) if kind == "communication"]
    compute = [span for span, kind in zip(spans, kinds) if kind != "communication"]
    longest = sorted(by_name.items(), key=lambda item: -item[1])[:15]
    return {"step_s": step_s, "kernels": len(kernels), "kernel_s_by_kind": by_kind, "busy_s": busy_seconds(spans),
            "compute_busy_s": busy_seconds(compute), "communication_busy_s": busy_seconds(communication),
            "longest_kernels": [{"name": name[:120], "kind": kernel_kind(name), "seconds": seconds}
                                for name, seconds in longest]}


class StepMetrics(TrainerCallback):
    """Per-step wall times, losses and peak memory; the memory peak is reset when training begins, so the training
    peak is separate from the loading (and, under FSDP, module-state broadcast) peak. `profile_step` (1-based, 0 for
    none) runs under `torch.profiler`."""

    def __init__(self, started: float, profile_step: int = 0):
        self.times = {"started": started}
        self.steps: list[dict] = []
        self.memory: dict[str, dict] = {}
        self.step_begin = self.last_step_end = None
        self.profile_step = profile_step
        self.profiler = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.times["train_begin"] = self.last_step_end = sync()
        self.memory["load"] = peak_memory()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.profile_step:
            self.profiler = torch.profiler.profile()  # CPU, and CUDA where available
            self.profiler.start()
        self.step_begin = sync()

    def on_step_end(self, args, state, control, **kwargs):
        now = sync()
        step = {"step": state.global_step, "step_s": now - self.step_begin, "interval_s": now - self.last_step_end,
                **peak_memory()}
        if self.profiler is not None:
            self.profiler.stop()
            step.update(profiled=True, profile=kernel_profile(self.profiler.events(), step["step_s"]))
            self.profiler = None
            now = sync()  # the next step's interval starts after the profile's processing
        self.steps.append(step)
        self.last_step_end = now
        if state.is_world_process_zero:
            memory = f", peak {step['max_allocated_gib']:.1f} GiB" if "max_allocated_gib" in step else ""
            profiled = " (profiled)" if step.get("profiled") else ""
            print(f"[train_bench] step {state.global_step}/{state.max_steps}: {step['step_s']:.2f} s{profiled} "
                  f"(since previous step {step['interval_s']:.2f} s){memory}", flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for step in self.steps:
            if step["step"] == state.global_step and logs:
                step.update({key: logs[key] for key in ("loss", "grad_norm") if key in logs})

    def on_train_end(self, args, state, control, **kwargs):
        self.times["train_end"] = sync()
        self.memory["train"] = peak_memory()


def run_probe(trainer, batch_path: str) -> dict:
    """What `block_outputs.probe_forward` gives for each probe batch (`probe_paths`) through the model as the engine
    holds it, with the parameter dtype and autocast state lm_head saw, so that the reload check computes the same way
    (FSDP: bf16 parameters under bf16 autocast; DeepSpeed bf16: bf16 parameters, no autocast)."""
    device = trainer.args.device
    seen = {}

    def record(module, inputs):
        seen.update(param_dtype=str(module.weight.dtype).removeprefix("torch."),
                    autocast=torch.is_autocast_enabled(device.type),
                    autocast_dtype=str(torch.get_autocast_dtype(device.type)).removeprefix("torch."))

    inner = trainer.accelerator.unwrap_model(trainer.model)
    handle = inner.lm_head.register_forward_pre_hook(record)
    model = trainer.model_wrapped
    model.eval()
    results = {}
    try:
        for name, path in probe_paths(batch_path).items():
            batch = {key: value.to(device) for key, value in torch.load(path).items()}
            output, outputs, repeated = block_outputs.probe_forward(model, inner, batch, name)
            results[name] = {"logits": output.logits.detach().float().cpu(), "loss": float(output.loss),
                             "kept_positions": output.kept_positions.cpu(), "outputs": outputs,
                             "repeat_identical": repeated}
    finally:
        handle.remove()
    return {**results, **seen, "triton_autotune": autotune_choices()}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--bench-dir", required=True, help="where rank<r>.json and probe_logits.pt go")
    p.add_argument("--bench-probe", required=True, help="probe batch written by prepare.py")
    p.add_argument("--bench-profile-step", type=int, default=0,
                   help="run this optimizer step (1-based) under torch.profiler; 0: none")
    return p.parse_known_args(argv)


def main(argv=None) -> None:
    started = time.perf_counter()
    args, train_argv = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.bench_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = StepMetrics(started, args.bench_profile_step)
    trainer = train_main(train_argv, callbacks=[metrics])
    metrics.times["saved"] = sync()
    probe = run_probe(trainer, args.bench_probe)
    metrics.times["probed"] = sync()
    rank = trainer.args.process_index
    if trainer.is_world_process_zero():
        torch.save(probe, out / "probe_logits.pt")
    times = metrics.times
    record = {
        "rank": rank, "world_size": trainer.args.world_size,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "argv": sys.argv,
        "accelerate_env": {k: v for k, v in os.environ.items() if k.startswith(("ACCELERATE_", "FSDP_"))},
        "engine": "fsdp" if trainer.is_fsdp_enabled else "deepspeed" if trainer.is_deepspeed_enabled else "none",
        "load_s": times["train_begin"] - times["started"], "train_s": times["train_end"] - times["train_begin"],
        "save_s": times["saved"] - times["train_end"], "probe_s": times["probed"] - times["saved"],
        "memory": metrics.memory, "steps": metrics.steps,
        "probe": {"loss": {name: probe[name]["loss"] for name in ("video", "text")},
                  **{key: probe[key] for key in ("param_dtype", "autocast", "autocast_dtype")}},
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
