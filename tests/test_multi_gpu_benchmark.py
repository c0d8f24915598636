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
    assert all(probe["bitwise_identical"] for probe in reload["logits"].values())
    assert reload["weights_vs_initial"]["llm"]["changed"] and not reload["weights_vs_initial"]["vision"]["changed"]
    assert "all stages passed" in run.stdout
    assert "| FSDP (FULL_SHARD) | 1× cpu | 2 |" in run.stdout
