"""benchmarks/video_state.py in its CPU smoke mode (--tiny: tiny widths of the same architecture and schedule):
the timing, disk and exactness steps run end to end, and the reused state answers as the independent runs do."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import video_state  # noqa: E402


def test_video_state_benchmark_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "video_state.json"
    video_state.main(["--tiny", "--device", "cpu", "--questions", "2", "--out", str(out)])
    results = json.loads(out.read_text())
    assert "errors" not in results, results.get("errors")
    assert len(results["independent"]) == 2 and len(results["reused"]["per_question_s"]) == 2
    assert results["reused"]["first_question_dependent_stage"] == 1  # attn_39 of uni_7_0.5-attn_39_0.05
    assert results["reused"]["state_bytes_per_frame"] > 0 and results["disk"]["safetensors_bytes"] > 0
    assert all(record["same_greedy_tokens"] for record in results["exact"])
