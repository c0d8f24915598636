"""benchmarks/multi_gpu/run.sh in its CPU smoke mode (TV_BENCH_TINY=1: tiny widths, one process, no accelerate):
prepare, the training wrapper, the reload check and the report run end to end, and the saved folder reloads with
bit-identical probe logits."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_scripts_run_end_to_end_on_cpu(tmp_path):
    env = dict(os.environ, TV_BENCH_TINY="1", PYTHON=sys.executable, OUT=str(tmp_path / "out"),
               TV_BENCH_WORK=str(tmp_path / "work"), STEPS="2")
    run = subprocess.run(["bash", "benchmarks/multi_gpu/run.sh", "fsdp"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == ["prepare", "train_fsdp", "reload_fsdp"]
    fsdp = results["engines"]["fsdp"]
    assert fsdp["summary"]["steps"] == 2 and fsdp["ranks"][0]["probe"]["autocast"]
    reload = fsdp["reload"]
    assert reload["passed"], reload["problems"]
    assert all(probe["bitwise_identical"] and probe["repeat_identical"] for probe in reload["logits"].values())
    outputs = reload["logits"]["text"]["outputs"]  # embeddings, the 56 blocks, the final norm
    assert outputs["compared"] == 58 and outputs["first_differing"] is None and not outputs["missing"]
    assert reload["weights_vs_initial"]["llm"]["changed"] and not reload["weights_vs_initial"]["vision"]["changed"]
    assert "all stages passed" in run.stdout
    assert "| FSDP (FULL_SHARD) | 1× cpu | 2 |" in run.stdout


def test_fsdp_forward_check_runs_on_cpu(tmp_path):
    """The FSDP-vs-plain forward comparison's plumbing (on the CPU accelerate runs no FSDP: its 'fsdp' model is the
    fp32 one under accelerate's autocast, so it must equal the unwrapped fp32 model bit for bit)."""
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                          "--mixed_precision", "bf16", "benchmarks/multi_gpu/fsdp_forward_check.py", "--tiny",
                          "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["block_types"] == ["linear_attention", "mlp", "linear_attention", "full_attention", "mlp",
                                     "linear_attention", "mlp"]
    assert report["fsdp_vs_fp32"]["logits_bitwise_identical"] and report["fsdp_vs_fp32"]["first_differing"] is None
    assert report["fsdp_vs_fp32"]["compared"] == 9
    assert not report["bf16_vs_fp32"]["logits_bitwise_identical"]  # the comparison can see a rounding step
    assert report["bf16_vs_fp32"]["first_differing"] == "embeddings"
