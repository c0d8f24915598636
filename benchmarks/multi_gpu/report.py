"""Results of the multi-GPU training benchmark: record stages, collect one JSON, print markdown tables.

    python benchmarks/multi_gpu/report.py stage --work W --name train_fsdp --status 0 --seconds 250 -- CMD...
    python benchmarks/multi_gpu/report.py collect --work W --engines fsdp zero3 --out $OUT/results.json  # GPU machine
    PYTHONPATH=. python benchmarks/multi_gpu/report.py markdown results.json [more.json ...]   # for README.md

`collect` merges prepared.json, stages.jsonl, the engines' rank<r>.json and reload.json with the software versions
and per-engine summaries (step 1 apart; median and mean of the later steps, a profiled step left out). `markdown`
merges several files in the order given and sets each step time against its floor (floor.py).
"""

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ENGINE_LABELS = {"fsdp": "FSDP (FULL_SHARD)", "zero3": "DeepSpeed ZeRO-3"}
PACKAGES = ("torch", "transformers", "accelerate", "deepspeed", "peft", "triton", "mamba_ssm", "av")


def record_stage(args) -> None:
    line = {"stage": args.name, "status": args.status, "seconds": args.seconds, "command": shlex.join(args.command)}
    with open(Path(args.work) / "stages.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def environment() -> dict:
    """Package versions, GPUs and the kernels the model found (imports torch: run on the machine that trained)."""
    import importlib

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception as err:  # noqa: BLE001 -- a missing package is a result here, not an error
            versions[name] = f"not importable ({type(err).__name__})"
    import torch

    from timeviper import modeling_timeviper

    gpus = []
    if torch.cuda.is_available():
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        gpus = subprocess.run(query, capture_output=True, text=True).stdout.strip().splitlines()
    return {"versions": versions, "cuda": torch.version.cuda, "gpus": gpus,
            "mamba_triton_kernels": modeling_timeviper.mamba_chunk_scan_combined is not None}


def summarize_engine(ranks: list[dict], prepared: dict | None) -> dict:
    steps = ranks[0]["steps"]
    timed = [s for s in steps[1:] if not s.get("profiled")] or steps[:1]  # step 1 compiles; profiling slows a step
    later = [s["step_s"] for s in timed]
    median = statistics.median(later)
    world = ranks[0]["world_size"]
    summary = {
        "world_size": world, "device": ranks[0]["device"], "steps": len(steps), "first_step_s": steps[0]["step_s"],
        "median_step_s": median, "mean_step_s": statistics.fmean(later), "max_step_s": max(later),
        "median_interval_s": statistics.median([s["interval_s"] for s in timed]),
        "loss_first": steps[0].get("loss"), "loss_last": steps[-1].get("loss"),
        "load_s": ranks[0]["load_s"], "save_s": ranks[0]["save_s"],
        "peak_train": {r["rank"]: r["memory"].get("train", {}) for r in ranks},
        "peak_load": {r["rank"]: r["memory"].get("load", {}) for r in ranks},
    }
    if prepared:
        summary["tokens_per_gpu_step"] = prepared["train_tokens"]
        summary["tokens_per_s"] = prepared["train_tokens"] * world / median
        summary["frames_per_s"] = prepared["frames"] * world / median
    return summary


def collect(args) -> None:
    work = Path(args.work)
    prepared = read_json(work / "prepared.json")
    stages_file = work / "stages.jsonl"
    stages = [json.loads(line) for line in stages_file.read_text().splitlines()] if stages_file.is_file() else []
    engines = {}
    for engine in args.engines:
        ranks = sorted((json.loads(p.read_text()) for p in (work / engine).glob("rank*.json")), key=lambda r: r["rank"])
        reload = read_json(work / engine / "reload.json")
        if ranks or reload:
            summary = summarize_engine(ranks, prepared) if ranks else None
            engines[engine] = {"summary": summary, "ranks": ranks, "reload": reload}
    results = {"prepared": prepared, "stages": stages, "engines": engines, "environment": environment()}
    Path(args.out).write_text(json.dumps(results, indent=1))


def gib(memory: dict, key: str) -> str:
    return " / ".join(f"{m[key]:.1f}" if key in m else "—" for _, m in sorted(memory.items()))


def number(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def table_header(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def step_floors(engines: dict, prepared: dict | None) -> dict:
    """floor.step_floor for each engine's device and GPU count (None where it has no measured ceilings)."""
    if not prepared:
        return {}
    from floor import step_floor  # imports torch and the model: only where tables are printed

    return {engine: step_floor(prepared, result["summary"]["device"], result["summary"]["world_size"])
            for engine, result in engines.items() if result["summary"]}


def floor_lines(floors: dict) -> list[str]:
    """One line per distinct floor: what it is made of."""
    lines = []
    for floor in filter(None, floors.values()):
        flops = floor["flops"]
        parts = ", ".join(f"{name} {flops[name] / 1e12:.1f}" for name in
                          ("vision", "llm_blocks", "lm_head", "projector", "compression", "tome"))
        text = (f"Floor per GPU and step (`floor.py`): {floor['floor_s']:.3f} s = {flops['total'] / 1e12:.1f} TFLOP "
                f"({parts}) at {floor['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s + AdamW's "
                f"{floor['optimizer_bytes'] / 1e9:.0f} GB at {floor['copy_bytes_per_s'] / 1e12:.1f} TB/s; "
                f"{floor['floor_without_recompute_s']:.3f} s without the recomputation of gradient checkpointing.")
        if text not in lines:
            lines.append(text)
    return lines


def training_table(engines: dict, floors: dict) -> list[str]:
    rows = table_header("engine", "GPUs", "steps", "step 1 (s)", "median step 2–N (s)", "× floor", "mean (s)",
                        "tokens/s, all GPUs", "frames/s", "peak allocated GiB (per GPU)", "peak reserved GiB",
                        "load (s)", "save (s)", "loss step 1 → N")
    for engine, result in engines.items():
        s = result["summary"]
        if s is None:
            continue
        floor = floors.get(engine)
        ratio = f"{s['median_step_s'] / floor['floor_s']:.1f}" if floor else "—"
        rows.append(
            f"| {ENGINE_LABELS[engine]} | {s['world_size']}× {s['device']} | {s['steps']} | {s['first_step_s']:.1f} "
            f"| **{s['median_step_s']:.2f}** | {ratio} | {s['mean_step_s']:.2f} "
            f"| {number(s.get('tokens_per_s'), ',.0f')} | {number(s.get('frames_per_s'), '.0f')} "
            f"| {gib(s['peak_train'], 'max_allocated_gib')} | {gib(s['peak_train'], 'max_reserved_gib')} "
            f"| {s['load_s']:.0f} | {s['save_s']:.0f} "
            f"| {number(s['loss_first'], '.3f')} → {number(s['loss_last'], '.3f')} |")
    return rows


def profile_table(engines: dict) -> list[str]:
    """The profiled step of each rank (train_bench.py --bench-profile-step): where its GPU time went."""
    kinds = ("matmul", "mamba_scan", "attention", "communication", "copy", "other")
    rows = table_header("engine", "rank", "step", "step (s, profiled)", "GPU busy (s)", "compute busy (s)",
                        "communication busy (s)", *(f"{kind} (s)" for kind in kinds))
    for engine, result in engines.items():
        for rank in result["ranks"]:
            for step in rank["steps"]:
                if step.get("profiled"):
                    p = step["profile"]
                    rows.append(
                        f"| {ENGINE_LABELS[engine]} | {rank['rank']} | {step['step']} | {p['step_s']:.2f} "
                        f"| {p['busy_s']:.2f} | {p['compute_busy_s']:.2f} | {p['communication_busy_s']:.2f} | "
                        + " | ".join(f"{p['kernel_s_by_kind'].get(kind, 0.0):.2f}" for kind in kinds) + " |")
    return rows if len(rows) > 2 else []


def reload_table(engines: dict) -> list[str]:
    rows = table_header("engine", "probe", "saved weights", "missing / unexpected keys", "kept positions equal",
                        "logits bitwise identical", "max abs diff", "argmax agreement", "loss trained / reloaded",
                        "trained groups moved", "vision unchanged", "Triton configs pinned", "reload repeatable",
                        "passed")
    for engine, result in engines.items():
        r = result["reload"]
        if r is None:
            continue
        w, keys = r["saved_weights"], r["loading"]
        moved = ", ".join(g for g, c in r["weights_vs_initial"].items() if g != "vision" and c["changed"]) or "none"
        for probe, logits in r["logits"].items():
            compared = logits.get("shape_equal")
            rows.append(
                f"| {ENGINE_LABELS[engine]} | {probe} | {'/'.join(w['dtypes'])}, {w['gib']:.1f} GiB "
                f"| {len(keys['missing_keys'])} / {len(keys['unexpected_keys'])} "
                f"| {logits.get('kept_positions_equal')} "
                f"| {logits['bitwise_identical'] if compared else 'shape differs'} "
                f"| {number(logits.get('max_abs_diff'), '.2e')} | {number(logits.get('argmax_agreement'), '.4f')} "
                f"| {number(logits.get('loss_reference'), '.4f')} / {number(logits.get('loss_reloaded'), '.4f')} "
                f"| {moved} | {not r['weights_vs_initial'].get('vision', {}).get('changed')} "
                f"| {r['triton_autotune']['pinned']} | {logits['repeat_identical']} | {r['passed']} |")
    return rows


def markdown(args) -> None:
    merged = {"engines": {}, "stages": []}
    for path in args.results:
        results = json.loads(Path(path).read_text())
        merged["engines"].update(results["engines"])
        merged["stages"] += results["stages"]
        merged.update({key: results[key] for key in ("prepared", "environment") if results.get(key)})
    floors = step_floors(merged["engines"], merged.get("prepared"))
    lines = training_table(merged["engines"], floors)
    for section in (floor_lines(floors), profile_table(merged["engines"]), reload_table(merged["engines"])):
        lines += [""] + section if section else []
    lines += ["", "Stages:", ""]
    lines += [f"- `{s['stage']}` ({s['seconds']} s, exit {s['status']}): `{s['command']}`" for s in merged["stages"]]
    environment = merged.get("environment")
    if environment:
        lines += ["", f"GPUs: {'; '.join(environment['gpus'])}. CUDA {environment['cuda']}. Mamba-2 Triton kernels: "
                  f"{environment['mamba_triton_kernels']}.",
                  ", ".join(f"{name} {version}" for name, version in environment["versions"].items())]
    print("\n".join(lines))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command_name", required=True)
    stage = commands.add_parser("stage", help="append a stage record to <work>/stages.jsonl")
    stage.add_argument("--work", required=True)
    stage.add_argument("--name", required=True)
    stage.add_argument("--status", type=int, required=True)
    stage.add_argument("--seconds", type=float, required=True)
    stage.add_argument("command", nargs=argparse.REMAINDER, help="the stage's command, after --")
    gather = commands.add_parser("collect", help="merge the benchmark's files into one JSON")
    gather.add_argument("--work", required=True)
    gather.add_argument("--engines", nargs="+", choices=list(ENGINE_LABELS), required=True,
                        help="engines of this run (older results in --work are left out)")
    gather.add_argument("--out", required=True)
    tables = commands.add_parser("markdown", help="print the tables of one or more results JSON files")
    tables.add_argument("results", nargs="+")
    args = p.parse_args(argv)
    if args.command_name == "stage" and args.command[:1] == ["--"]:
        args.command = args.command[1:]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    {"stage": record_stage, "collect": collect, "markdown": markdown}[args.command_name](args)


if __name__ == "__main__":
    main(sys.argv[1:])
