"""`python -m training.train` with measurements, for the multi-GPU benchmark (run.sh launches it with accelerate).

    accelerate launch --config_file training/accelerate_configs/fsdp.yaml --num_processes 2 \
        benchmarks/multi_gpu/train_bench.py --bench-dir /tmp/tv/fsdp --bench-probe /tmp/tv/data/probe_batch.pt \
        --model /tmp/tv/model --data ... (every other option goes to training.train unchanged)

Run from the repository root with it on PYTHONPATH (run.sh does both). Every rank writes `<bench-dir>/rank<r>.json`:
per optimizer step the wall time from step begin to step end and from the previous step's end (both after
`torch.cuda.synchronize()`; the second includes waiting for the data loader), the loss, the peak memory
(`torch.cuda.max_memory_allocated` / `max_memory_reserved`) while loading and while training, and the phase times
(load, train, save). After training and saving, every rank runs the probe batch through the trained model as the
engine holds it (FSDP-sharded or ZeRO-3-partitioned; the collectives need all ranks), and rank 0 saves logits, loss,
the compute precision it saw and its Triton autotuning choices (triton_choices.py) to `<bench-dir>/probe_logits.pt`
for reload_check.py.
"""

import argparse
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


class StepMetrics(TrainerCallback):
    """Per-step wall times, losses and peak memory; the memory peak is reset when training begins, so the training
    peak is separate from the loading (and, under FSDP, module-state broadcast) peak."""

    def __init__(self, started: float):
        self.times = {"started": started}
        self.steps: list[dict] = []
        self.memory: dict[str, dict] = {}
        self.step_begin = self.last_step_end = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.times["train_begin"] = self.last_step_end = sync()
        self.memory["load"] = peak_memory()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_begin = sync()

    def on_step_end(self, args, state, control, **kwargs):
        now = sync()
        step = {"step": state.global_step, "step_s": now - self.step_begin, "interval_s": now - self.last_step_end,
                **peak_memory()}
        self.steps.append(step)
        self.last_step_end = now
        if state.is_world_process_zero:
            memory = f", peak {step['max_allocated_gib']:.1f} GiB" if "max_allocated_gib" in step else ""
            print(f"[train_bench] step {state.global_step}/{state.max_steps}: {step['step_s']:.2f} s "
                  f"(since previous step {step['interval_s']:.2f} s){memory}", flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for step in self.steps:
            if step["step"] == state.global_step and logs:
                step.update({key: logs[key] for key in ("loss", "grad_norm") if key in logs})

    def on_train_end(self, args, state, control, **kwargs):
        self.times["train_end"] = sync()
        self.memory["train"] = peak_memory()


def run_probe(trainer, batch_path: str) -> dict:
    """Logits of the probe batches (`batch_path`, and the same sample without its video beside it) from the model as
    the engine holds it, with the parameter dtype and autocast state seen by lm_head (FSDP's mixed precision casts
    every parameter to bf16 and accelerate adds bf16 autocast; DeepSpeed's bf16 keeps bf16 parameters without
    autocast), so the reload check can compute the same way; also what `block_outputs.probe_forward` records (weight
    digests, the projector's output, for the text probe every block's output) and whether a second forward repeats
    the logits."""
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
    return p.parse_known_args(argv)


def main(argv=None) -> None:
    started = time.perf_counter()
    args, train_argv = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.bench_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = StepMetrics(started)
    trainer = train_main(train_argv, callbacks=[metrics])
    metrics.times["saved"] = sync()
    probe = run_probe(trainer, args.bench_probe)
    metrics.times["probed"] = sync()
    rank = trainer.args.process_index
    if trainer.is_world_process_zero():
        torch.save(probe, out / "probe_logits.pt")
    times = metrics.times
    record = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "argv": sys.argv,
        "accelerate_env": {k: v for k, v in os.environ.items() if k.startswith(("ACCELERATE_", "FSDP_"))},
        "engine": "fsdp" if trainer.is_fsdp_enabled else "deepspeed" if trainer.is_deepspeed_enabled else "none",
        "load_s": times["train_begin"] - times["started"],
        "train_s": times["train_end"] - times["train_begin"],
        "save_s": times["saved"] - times["train_end"],
        "probe_s": times["probed"] - times["saved"],
        "memory": metrics.memory,
        "steps": metrics.steps,
        "probe": {"loss": {name: probe[name]["loss"] for name in ("video", "text")},
                  **{key: probe[key] for key in ("param_dtype", "autocast", "autocast_dtype")}},
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
