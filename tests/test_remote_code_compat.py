"""What keeps the remote code honest across transformers releases (the releases themselves: tests/compat, run by
.ci/run): the version guard, the cache under both names, no swallowed keyword, the Auto classes of every saved
folder and the TransV gates of folders written before each TransV module held its own."""

import configparser
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import VIDEO_TOKEN_ID, open_transfer_gates, tiny_model, transfer_gates

from inference.tiny_default import build_tiny_default

from timeviper.configuration_timeviper import AUTO_MAP, SUPPORTED_TRANSFORMERS
from timeviper.modeling_timeviper import TimeViperForConditionalGeneration, TimeViperHybridCache, TimeViperModel

REPO = Path(__file__).resolve().parents[1]
SCHEDULE = "uni_1_0.5-attn_2_0.25"


def test_setup_cfg_requires_the_proven_range():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    requirements = [line.strip() for line in setup["options"]["install_requires"].splitlines()]
    assert f"transformers{SUPPORTED_TRANSFORMERS}" in requirements


GUARD_SCRIPT = textwrap.dedent(
    """
    import importlib, sys, transformers
    for version, module in [("5.12.1", "configuration"), ("5.26.0", "modeling"), ("4.57.6", "processing"),
                            ("5.26.0.dev0", "generation"), ("5.26.0", "video_processing"),
                            ("5.13.0", "modeling"), ("5.25.0", "processing")]:
        transformers.__version__ = version
        for name in [name for name in sys.modules if name.startswith("timeviper")]:
            del sys.modules[name]
        try:
            importlib.import_module(f"timeviper.{module}_timeviper")
            print(version, module, "imported")
        except ImportError as error:
            print(version, module, "refused:", error)
    """
)


def test_the_version_guard_names_the_range_and_the_install_command():
    result = subprocess.run([sys.executable, "-c", GUARD_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    install = 'pip install "transformers>=5.13,<5.26"'
    for line in lines[:5]:  # outside the range: refused by each of the remote-code files, with the command to fix it
        assert "refused:" in line and install in line and f"has transformers {line.split()[0]}" in line, line
    assert lines[5:] == ["5.13.0 modeling imported", "5.25.0 processing imported"]


def video_inputs():
    ids = torch.tensor([[5, 6] + [VIDEO_TOKEN_ID] * 8 + [7, 8, 9]])
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}


@torch.no_grad()
def test_forward_takes_the_cache_under_either_name_and_refuses_unknown_keywords():
    model = tiny_model(token_compression=SCHEDULE)
    open_transfer_gates(model, 0.5)
    inputs = video_inputs()
    decoded = {}
    for name in ("past_key_values", "cache"):
        cache = TimeViperHybridCache()
        model(**inputs, **{name: cache})
        step = model(input_ids=torch.tensor([[11]]), attention_mask=torch.ones(1, 14, dtype=torch.long), **{name: cache})
        decoded[name] = step.logits
        assert step.past_key_values is cache  # the attribute reads the same under every release
    assert torch.equal(decoded["past_key_values"], decoded["cache"])
    with pytest.raises(ValueError, match="not both"):
        model(**inputs, past_key_values=TimeViperHybridCache(), cache=TimeViperHybridCache())
    with pytest.raises(TypeError, match="cache_position"):
        model(**inputs, cache_position=torch.arange(13))
    with pytest.raises(TypeError, match="TimeViperHybridCache"):
        model(**inputs, cache=object())
    with pytest.raises(ValueError, match="output_attentions"):
        model(**inputs, output_attentions=True)
    assert isinstance(model(**inputs, return_dict=False), tuple)


def test_every_saved_folder_names_all_auto_classes(tmp_path):
    model = tiny_model(token_compression=SCHEDULE)
    model.save_pretrained(tmp_path / "generation")
    TimeViperModel(model.config).save_pretrained(tmp_path / "base")
    model.config.save_pretrained(tmp_path / "config")
    for folder in ("generation", "base", "config"):
        assert json.loads((tmp_path / folder / "config.json").read_text())["auto_map"] == AUTO_MAP, folder
        assert (tmp_path / folder / "configuration_timeviper.py").is_file()
    for folder in ("generation", "base"):
        assert (tmp_path / folder / "modeling_timeviper.py").is_file()
    processor = build_tiny_default(token_compression=SCHEDULE)[1]
    processor.save_pretrained(tmp_path / "processor")
    saved = json.loads((tmp_path / "processor" / "processor_config.json").read_text())
    assert saved["auto_map"] == {"AutoProcessor": "processing_timeviper.TimeViperProcessor"}
    assert (tmp_path / "processor" / "processing_timeviper.py").is_file()


def test_folders_with_the_legacy_gate_vector_load_their_gates(tmp_path):
    """Before each TransV module held its gate, one vector `model.language_model.alpha` held them all."""
    model = tiny_model(token_compression="uni_1_0.5-unidrop_2_0.25-uni_4_0.125")  # transfer stages 0 and 2
    for gate, value in zip(transfer_gates(model), (0.3, -0.6)):
        with torch.no_grad():
            gate.fill_(value)
    model.save_pretrained(tmp_path / "new")
    weights = load_file(tmp_path / "new" / "model.safetensors")
    legacy = torch.cat([weights.pop(f"model.language_model.merge_modules.{stage}.alpha") for stage in (0, 2)])
    weights["model.language_model.alpha"] = legacy
    (tmp_path / "old").mkdir()
    save_file(weights, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())

    loaded, info = TimeViperForConditionalGeneration.from_pretrained(tmp_path / "old", output_loading_info=True)
    assert [float(gate.detach()) for gate in transfer_gates(loaded)] == pytest.approx([0.3, -0.6])
    assert not info["missing_keys"] and not info["unexpected_keys"]
    base = TimeViperModel.from_pretrained(tmp_path / "old")
    assert float(base.language_model.merge_modules["2"].alpha) == pytest.approx(-0.6)
    loaded.save_pretrained(tmp_path / "resaved")  # written in the new layout
    assert "model.language_model.merge_modules.2.alpha" in load_file(tmp_path / "resaved" / "model.safetensors")
