"""DeepSpeed ZeRO-3 fine-tuning on CPU (one process, gloo, DeepSpeed's CPU accelerator): the saved folder holds the
input checkpoint's tensor names and reloads with no missing or unexpected keys.

Regression test: transformers' ZeRO-3 loader (`from_pretrained` with zero3_init_flag) records every key conversion
of its mappings on the model, used or not, and `save_pretrained` reverses them; SigLIP's unused
`PrefixChange(prefix_to_remove="vision_model")` then renamed the whole frozen vision tower to
`model.vision_tower.vision_model.*` (training.train.forget_unused_weight_conversions, run after loading).
timeviper.sh installs DeepSpeed; elsewhere these tests are skipped where it is not installed.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from safetensors import safe_open  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tiny_assets import write_test_video  # noqa: E402

from inference.tiny_default import build_tiny_default  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_cpu_process_env() -> dict:
    """Environment for a one-process DeepSpeed run on its CPU accelerator (gloo), the repo importable."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def test_zero3_saves_the_checkpoint_key_names_and_reloads(tmp_path):
    # Input checkpoint without TransV modules: stage 2 with a schedule also initialises them under ZeRO-3.
    model, processor = build_tiny_default("nemotron_h")
    checkpoint = tmp_path / "model"
    model.save_pretrained(checkpoint)  # with auto_map and the code files
    processor.save_pretrained(checkpoint)
    data = tmp_path / "data"
    data.mkdir()
    write_test_video(data / "v.mp4", num_frames=24, fps=12, size=(32, 32))
    turns = [{"role": "user", "content": "What is shown?"}, {"role": "assistant", "content": "A cat."}]
    (data / "train.jsonl").write_text(json.dumps({"id": "0", "video": "v.mp4", "conversations": turns}) + "\n")

    output = tmp_path / "output"
    env = one_cpu_process_env()
    command = [sys.executable, "-m", "training.train", "--model", checkpoint, "--data", data / "train.jsonl",
               "--video-root", data, "--stage", "2", "--token-compression", "uni_1_0.5", "--fps", "2",
               "--max_frames", "4", "--output_dir", output, "--max_steps", "1", "--save_strategy", "no",
               "--per_device_train_batch_size", "1", "--report_to", "none", "--disable_tqdm", "true",
               "--dataloader_num_workers", "0", "--use_cpu",
               "--deepspeed", REPO_ROOT / "training/accelerate_configs/zero3.json"]
    result = subprocess.run([str(c) for c in command], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "ZeRO" in result.stdout + result.stderr or "DeepSpeed" in result.stdout + result.stderr

    before, after = saved_tensors(checkpoint), saved_tensors(output)
    assert not [name for name in after if ".vision_model." in name]
    transv = {name for name in after if ".merge_modules." in name}  # gates `merge_modules.<stage>.alpha` included
    assert transv and set(after) - transv == set(before)
    for name, tensor in before.items():
        if name.startswith("model.vision_tower."):  # frozen; fp32 ZeRO-3 (no --bf16) saves it bit for bit
            assert torch.equal(after[name], tensor), name

    from transformers import AutoModelForImageTextToText

    reloaded, info = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True,
                                                                 output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert set(reloaded.state_dict()) == set(after)


def test_zero3_trained_model_and_its_reload_compute_the_same_bits(tmp_path):
    """The multi-GPU benchmark's pipeline under ZeRO-3 on one CPU process: prepare, train_bench (bf16, the TransV
    schedule), reload_check. The reloaded folder must give the trained model's logits bit for bit for the video and
    the text probe, with every digested weight equal.

    Regression: DeepSpeed's default `memory_efficient_linear` replaces torch.nn.functional.linear for the whole
    process with a matmul followed by a separate bias add (two bf16 roundings instead of one), so the trained model's
    Linear layers with a bias (SigLIP, projector) computed other bits than the same weights reloaded, and
    attention-guided dropping then kept other vision tokens. zero3.json turns it off."""
    work, bench = tmp_path / "work", tmp_path / "zero3"
    env = one_cpu_process_env()

    def run(*args):
        result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    scripts = REPO_ROOT / "benchmarks" / "multi_gpu"
    run(scripts / "prepare.py", "--work", work, "--frames", "8", "--tiny", "--samples", "4")
    run(scripts / "train_bench.py", "--bench-dir", bench, "--bench-probe", work / "data" / "probe_batch.pt",
        "--output_dir", bench / "output", "--model", work / "model", "--data", work / "data" / "train.jsonl",
        "--video-root", work / "data", "--num_frames", "8", "--max_frames", "8", "--stage", "2",
        "--token-compression", "uni_7_0.5-attn_39_0.05", "--bf16", "--gradient_checkpointing",
        "--per_device_train_batch_size", "1", "--max_steps", "2", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--seed", "0", "--use_cpu",
        "--deepspeed", REPO_ROOT / "training/accelerate_configs/zero3.json")
    run(scripts / "reload_check.py", bench / "output", "--initial", work / "model", "--probe",
        work / "data" / "probe_batch.pt", "--reference", bench / "probe_logits.pt", "--out", bench / "reload.json",
        "--device", "cpu")

    report = json.loads((bench / "reload.json").read_text())
    assert report["passed"], report["problems"]
    assert report["compute"]["param_dtype"] == "bfloat16" and not report["compute"]["autocast"]
    for probe in report["logits"].values():
        assert probe["bitwise_identical"] and probe["kept_positions_equal"] and probe["reference_repeat_identical"]
        assert probe["outputs"]["weights_compared"] > 0 and not probe["outputs"]["differing_weights"]
