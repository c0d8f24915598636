"""benchmarks/multi_gpu/run.sh in its CPU smoke mode (TV_BENCH_TINY=1: tiny widths, one process, no accelerate):
prepare, the training wrapper, the reload check and the report run end to end, and the saved folder reloads with
bit-identical probe logits; the step floor and the profiled step's kernel accounting."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "multi_gpu"))
sys.path.insert(0, str(REPO))

import block_outputs  # noqa: E402
import floor  # noqa: E402
import train_bench  # noqa: E402


def test_weight_digest_sees_every_bit_and_only_the_bits():
    weight = torch.randn(3, 1000, dtype=torch.bfloat16)
    digest = block_outputs.weight_digest(weight)
    assert torch.equal(digest, block_outputs.weight_digest(weight.clone()))
    assert torch.equal(digest, block_outputs.weight_digest(weight.t().contiguous().t()))  # layout does not count
    one_ulp = weight.clone()
    one_ulp.view(torch.int16)[1, 7] += 1
    assert not torch.equal(digest, block_outputs.weight_digest(one_ulp))
    swapped = weight.clone()
    swapped[0, [3, 4]] = weight[0, [4, 3]]  # same multiset of values, other places
    assert weight[0, 3] == weight[0, 4] or not torch.equal(digest, block_outputs.weight_digest(swapped))
    assert not torch.equal(digest, block_outputs.weight_digest(weight.float()))  # another dtype, other bits


def test_benchmark_scripts_run_end_to_end_on_cpu(tmp_path):
    env = dict(os.environ, TV_BENCH_TINY="1", PYTHON=sys.executable, OUT=str(tmp_path / "out"),
               TV_BENCH_WORK=str(tmp_path / "work"), STEPS="2", PROFILE_STEP="2")
    run = subprocess.run(["bash", "benchmarks/multi_gpu/run.sh", "fsdp"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == ["prepare", "train_fsdp", "reload_fsdp"]
    fsdp = results["engines"]["fsdp"]
    assert fsdp["summary"]["steps"] == 2 and fsdp["ranks"][0]["probe"]["autocast"]
    steps = fsdp["ranks"][0]["steps"]
    assert steps[1]["profiled"] and steps[1]["profile"]["step_s"] == steps[1]["step_s"] and "profiled" not in steps[0]
    assert fsdp["summary"]["median_step_s"] == steps[0]["step_s"]  # the profiled step is not timed
    reload = fsdp["reload"]
    assert reload["passed"], reload["problems"]
    assert all(probe["bitwise_identical"] and probe["repeat_identical"] for probe in reload["logits"].values())
    with safe_open(next((tmp_path / "work" / "model").glob("*.safetensors")), "pt") as saved:
        parameters = len(list(saved.keys()))
    for name, probe in reload["logits"].items():
        outputs = probe["outputs"]
        assert probe["reference_repeat_identical"] and not outputs["missing"]
        assert outputs["first_differing"] is None and outputs["first_differing_weights"] is None
        # Every parameter digested as the forward saw it (the tiny vision tower runs all but its last layer and the
        # unused post-norm, whose weights are still met through the tower's own pre-hook).
        assert outputs["weights_compared"] == parameters
        # Block outputs (embeddings, 56 blocks, final norm) for the text probe; the projector's output for the video.
        assert outputs["compared"] - outputs["weights_compared"] == (58 if name == "text" else 1)
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
    fsdp, bf16 = report["fsdp_vs_fp32"], report["bf16_vs_fp32"]
    assert fsdp["compared"] - fsdp["weights_compared"] == 9 and fsdp["first_differing_weights"] is None
    # Every parameter is digested, and in bf16 every one differs from its fp32 original.
    assert fsdp["weights_compared"] == bf16["weights_compared"] == len(bf16["differing_weights"]) > 9
    assert not report["bf16_vs_fp32"]["logits_bitwise_identical"]  # the comparison can see a rounding step
    assert report["bf16_vs_fp32"]["first_differing"] == "embeddings"


def test_step_floor_of_the_full_size_benchmark():
    """The floor of the benchmark's step (2 H200s, 256 frames, 4,211 tokens) against independent estimates."""
    prepared = {"tiny": False, "schedule": "uni_7_0.5-attn_39_0.05", "frames": 256, "train_tokens": 4211,
                "parameters": {"total": 9_436_555_378, "vision": 412_987_248}}
    h200 = floor.step_floor(prepared, "NVIDIA H200", world_size=2)
    # 4,096 vision tokens + 115 text; half the vision tokens kept from block 7, int(4096 x 0.05) = 204 from block 39.
    assert h200["tokens_per_block"] == [4211] * 7 + [2163] * 32 + [319] * 17
    flops = h200["flops"]
    # Frozen tower, forward only: ~2 FLOPs per parameter and patch over 26 of its 27 blocks, plus attention.
    assert 1.0 < flops["vision"] / (2 * 412_987_248 * 729 * 256 * 26 / 27) < 1.15
    # LLM blocks: ~8 FLOPs per parameter and token (forward, recomputation, backward) over the blocks' ~7.7 B
    # parameters at the mean block length.
    mean_tokens = sum(h200["tokens_per_block"]) / 56
    assert 0.9 < flops["llm_blocks"] / (8 * 7.7e9 * mean_tokens) < 1.2
    assert flops["total"] - flops["without_recompute"] == flops["llm_blocks"] / 4
    # AdamW: 32 bytes per trained parameter on each GPU's half.
    assert h200["optimizer_bytes"] == 32 * (9_436_555_378 - 412_987_248) / 2
    h100 = floor.step_floor(prepared, "NVIDIA H100 80GB HBM3", world_size=2)
    assert h100["compute_s"] == h200["compute_s"] and h100["optimizer_s"] > h200["optimizer_s"]
    assert floor.step_floor(prepared, "cpu", world_size=1) is None


def test_kernel_profile_sums_kinds_and_overlaps():
    class Kernel:
        device_type = torch.autograd.DeviceType.CUDA
        is_user_annotation = False

        def __init__(self, name, start, end):
            self.name = name
            self.time_range = type("Range", (), {"start": start, "end": end})

    cpu_op = Kernel("aten::mm", 0, 9e6)
    cpu_op.device_type = torch.autograd.DeviceType.CPU
    annotations = [Kernel("FullyShardedDataParallel.forward", 0, 1_000_000),
                   Kernel("nccl:_all_gather_base", 300_000, 700_000)]  # GPU-side ranges, not kernels
    for annotation in annotations:
        annotation.is_user_annotation = True
    events = [Kernel("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", 0, 400_000),
              Kernel("ncclDevKernel_AllGather_RING_LL", 300_000, 700_000),
              Kernel("_chunk_scan_bwd_dx_kernel", 500_000, 600_000),
              Kernel("vectorized_elementwise_kernel", 800_000, 900_000), cpu_op, *annotations]
    profile = train_bench.kernel_profile(events, step_s=1.0)
    assert profile["kernels"] == 4
    assert profile["kernel_s_by_kind"] == {"matmul": 0.4, "communication": 0.4, "mamba_scan": 0.1, "other": 0.1}
    assert profile["busy_s"] == 0.8  # 0-0.7 s and 0.8-0.9 s
    assert profile["compute_busy_s"] == 0.6 and profile["communication_busy_s"] == 0.4
    assert profile["longest_kernels"][0]["kind"] in ("matmul", "communication")
