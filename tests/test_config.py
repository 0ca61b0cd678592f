"""Config: YAML + overrides, types and choices checked, one-line errors with exit code 2."""

import subprocess
import sys

import pytest

from conftest import ROOT
from minilm.config import ConfigError, load_config


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: 3\ntrain:\n  learning_rate: 3.0e-4\n")
    cfg = load_config(path, ["--model.n_layer=5", "--train.dtype=bfloat16", "--loss.softcap=30",
                             "--data.name=null"])
    assert cfg.model.n_layer == 5 and cfg.train.learning_rate == 3e-4
    assert cfg.train.dtype == "bfloat16" and cfg.loss.softcap == 30.0 and cfg.data.name is None
    assert cfg.model.n_head == 4  # untouched default


@pytest.mark.parametrize("args,message", [
    (["--train.max_iter=5"], "unknown config key 'train.max_iter'.*did you mean train.max_iters"),
    (["--modle.n_layer=2"], "unknown config key 'modle'.*did you mean model"),
    (["--train.max_iters=lots"], "train.max_iters: expected an integer, got 'lots'"),
    (["--model.tie_embeddings=maybe"], "model.tie_embeddings: expected true or false"),
    (["--train.dtype=fp8"], "train.dtype: invalid choice 'fp8' \\(allowed: auto, float32"),
    (["--loss.impl=fast"], "loss.impl: invalid choice 'fast'"),
    (["--train.device=tpu"], "train.device: invalid choice 'tpu'"),
    (["--train.compile=sometimes"], "train.compile: invalid choice 'sometimes' \\(allowed: auto"),
    (["--model.n_embd=30", "--model.n_head=4"], "divisible"),
    (["--data.val_fraction=1.5"], "data.val_fraction must be in"),
    (["train.max_iters=5"], "expected --section.key=value"),
])
def test_bad_values_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [a for a in args if a.startswith("--")] or args)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_shipped_configs_are_valid():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if "ablation" not in path.parts:
            load_config(path)


def test_cli_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "train.py", "--train.max_iter=5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean train.max_iters" in lines[0]
    assert "Traceback" not in proc.stderr
