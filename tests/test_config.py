"""Config: YAML + overrides, types and choices checked, one-line errors with exit code 2."""

import os
import subprocess
import sys

import pytest

from minilm.cli import train as cli_train
from minilm.cli.common import run_cli
from minilm.cli.train import train_main
from minilm.errors import ConfigError
from minilm.train import config as train_config
from minilm.train.config import load_config

from conftest import ROOT


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: 3\ntrain:\n  learning_rate: 3.0e-4\n")
    cfg = load_config(path, ["--model.n_layer=5", "--train.dtype=bfloat16", "--loss.softcap=30",
                             "--data.name=null"])
    assert cfg.model.n_layer == 5 and cfg.train.learning_rate == 3e-4
    assert cfg.train.dtype == "bfloat16" and cfg.model.logit_softcap == 30.0
    assert cfg.data.name is None
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


def test_cli_exits_2_with_one_line(capsys):
    assert run_cli(train_main, ["--train.max_iter=5"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "did you mean train.max_iters" in lines[0]
    assert "Traceback" not in err


# ---------------------------------------------------------------- YAML 1.2 numbers (issue 8.1)


def test_scientific_notation_in_files_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 6e-4\n  min_lr: 6E-5\n  weight_decay: .5\n"
                    "  lr_decay_iters: 5e3\n")
    cfg = load_config(path, ["--train.beta2=95e-2", "--loss.z_loss=1e-4", "--train.max_iters=1e4"])
    t = cfg.train
    assert (t.learning_rate, t.min_lr, t.weight_decay, t.beta2) == (6e-4, 6e-5, 0.5, 0.95)
    assert cfg.loss.z_loss == 1e-4
    assert t.lr_decay_iters == 5000 and isinstance(t.lr_decay_iters, int)  # integral: an int
    assert t.max_iters == 10000 and isinstance(t.max_iters, int)


def test_yaml_follows_the_1_2_core_schema():
    from minilm.train.config import read_yaml

    values = read_yaml("[1e-3, .5, 1., +2, -3, 010, 0o17, 0x1F, .inf, -.Inf, true, false, null, ~,"
                       " yes, no, on, off, 1_000, 2024-01-01, 1:30]")
    assert values[:10] == [1e-3, 0.5, 1.0, 2, -3, 10, 15, 31, float("inf"), float("-inf")]
    assert values[10:14] == [True, False, None, None]
    # YAML 1.1 (PyYAML's default) reads these as booleans, ints, dates: YAML 1.2 as strings
    assert values[14:] == ["yes", "no", "on", "off", "1_000", "2024-01-01", "1:30"]


def test_strings_that_look_numeric_keep_their_text(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  source: 1e3\n  name: 010\nwandb:\n  name: 2.50\n  tags: [1e-3, on]\n")
    cfg = load_config(path, ["--wandb.project=6e-4"])
    assert (cfg.data.source, cfg.data.name, cfg.wandb.name) == ("1e3", "010", "2.50")
    assert cfg.wandb.tags == ["1e-3", "on"] and cfg.wandb.project == "6e-4"


@pytest.mark.parametrize("arg, message", [
    ("--train.learning_rate=.nan", "train.learning_rate: expected a finite number"),
    ("--train.max_iters=2.5e0", "train.max_iters: expected an integer, got 2.5"),
    ("--train.resume=yes", "train.resume: expected true or false, got 'yes'"),
])
def test_numbers_still_checked_against_their_key(arg, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [arg])


# ---------------------------------------------------------------- settings checked before any work


@pytest.mark.parametrize("args, message", [
    (["--train.min_lr=0.01", "--train.learning_rate=0.001"],
     r"train.min_lr \(0.01\) must be <= train.learning_rate \(0.001\)"),
    (["--train.lr_decay_iters=-5"], "train.lr_decay_iters must be > 0, or null"),
    (["--train.lr_decay_iters=0"], "train.lr_decay_iters must be > 0, or null"),
    (["--train.weight_decay=-0.1"], "train.weight_decay must be >= 0"),
    (["--train.grad_clip=-1"], "train.grad_clip must be >= 0"),
    (["--train.beta1=1.0"], r"train.beta1 must be in \[0, 1\)"),
    (["--train.beta2=-0.5"], r"train.beta2 must be in \[0, 1\)"),
    (["--train.warmup_iters=50", "--train.lr_decay_iters=40"],
     r"train.warmup_iters \(50\) must be < train.lr_decay_iters \(40\): after the warmup"),
    (["--train.warmup_iters=40", "--train.lr_decay_iters=40", "--train.max_iters=41"],
     r"train.warmup_iters \(40\) must be < train.lr_decay_iters \(40\): after the warmup"),
    (["--train.resume=true", "--train.overwrite=true"], "exclude each other"),
])
def test_optimizer_settings_are_checked(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, args)


def test_warmup_longer_than_this_run_is_fine_when_the_schedule_is_fixed():
    cfg = load_config(None, ["--train.warmup_iters=100", "--train.max_iters=50",
                             "--train.lr_decay_iters=2000"])
    assert cfg.train.max_iters == 50


@pytest.mark.parametrize("args", [
    ["--train.max_iters=40"],  # the shipped warmup (100) covers the whole shortened run
    ["--train.warmup_iters=100", "--train.max_iters=100"],
    ["--train.warmup_iters=100", "--train.max_iters=40", "--train.lr_decay_iters=40"],
])
def test_a_run_that_ends_in_its_warmup_is_accepted(args):
    """As in nanoGPT and HF's Trainer: the run warms up all the way (the trainer says so)."""
    t = load_config("shakespeare_char", args).train
    assert t.warmup_iters >= t.max_iters


def test_paths(tmp_path, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for key in ("out_dir", "data.cache_dir"):
        for value in (a_file, a_file / "sub"):
            with pytest.raises(ConfigError, match=f"{key}: {a_file} is a file, not a folder"):
                load_config(None, [f"--{key}={value}"])
        with pytest.raises(ConfigError, match=f"{key} is empty"):
            load_config(None, [f"--{key}="])
    with pytest.raises(ConfigError, match="data.source is empty"):
        load_config(None, ['--data.source=""'])
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["--out_dir=~/runs/a", "--data.cache_dir=~/cache"])
    assert (cfg.out_dir, cfg.data.cache_dir) == (str(tmp_path / "runs/a"), str(tmp_path / "cache"))


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("wandb:\n  name: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9 at offset "
                                          r"18: invalid continuation byte\)"):
        load_config(path)


# ---------------------------------------------------------------- shipped configs, --help


def test_configs_by_name_and_default():
    from minilm.train.config import find_config, shipped_configs

    assert find_config("shakespeare_char") == ROOT / "configs" / "shakespeare_char.yaml"
    assert find_config("ablation/tied_vs_untied.yaml").name == "tied_vs_untied.yaml"
    assert shipped_configs() == ROOT / "configs"
    assert load_config("shakespeare_gpt2").data.tokenizer == "gpt2"
    with pytest.raises(ConfigError, match="config file not found: shakespear_char "
                                          r"\(shipped configs: .*shakespeare_char"):
        load_config("shakespear_char")


@pytest.mark.slow
def test_the_wheel_ships_the_configs_and_finds_them(tmp_path):
    """A non-editable build: the wheel holds minilm/configs (built from configs/) and, unpacked
    away from the repository, minilm finds its configs there."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("minilm", "configs"):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                          cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("minilm-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.startswith("minilm/configs/")}
        expected = {f"minilm/configs/{p.relative_to(ROOT / 'configs').as_posix()}"
                    for p in (ROOT / "configs").rglob("*.yaml")}
        assert shipped == expected
        for name in shipped:
            assert z.read(name) == (ROOT / "configs" / name.removeprefix("minilm/configs/")
                                    ).read_bytes()
        z.extractall(tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    code = ("from minilm.train.config import find_config, load_config; "
            "print(find_config('shakespeare_char')); "
            "print(load_config('shakespeare_char').out_dir)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found, out_dir = proc.stdout.split()
    assert found == str(tmp_path / "site" / "minilm" / "configs" / "shakespeare_char.yaml")
    assert out_dir == "out/shakespeare_char"


def test_train_finds_a_config_by_name(tmp_path, capsys, monkeypatch):
    """train.py NAME, and train.py with no config, use the shipped configs (checked here up to
    the one-line refusal of an out_dir that already holds a run)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    read = []
    real = train_config.load_config
    monkeypatch.setattr(cli_train, "load_config",
                        lambda path, *a, **kw: read.append(path) or real(path, *a, **kw))
    for argv in (["shakespeare_gpt2"], []):
        assert run_cli(train_main, [*argv, f"--out_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert "already holds a run" in err, err
    assert read == ["shakespeare_gpt2", "shakespeare_char"]


def test_help_anywhere_lists_every_key(capsys):
    from minilm.train.config import Config, config_keys, flatten

    for argv in (["--help"], ["shakespeare_char", "--train.max_iters=5", "-h"]):
        assert run_cli(train_main, argv) == 0
        stdout, err = capsys.readouterr()
        assert err == ""
        lines = stdout.splitlines()
        assert lines[0] == "usage: train.py [CONFIG] [--section.key=value ...]"
        assert "Sections: out_dir, model, data, train, loss, wandb." in stdout
        keys = config_keys(Config)
        assert [k.key for k in keys] == list(flatten(Config().to_dict()))  # every key, in order
        for k in keys:  # one line each: key, type = default, description
            (line,) = [ln for ln in lines if ln.split()[:1] == [k.key]]
            assert f"{k.type} = {k.default}" in line and k.help.replace("`", "") in line
            assert k.help, f"{k.key} has no description"


def test_readme_config_reference_is_generated_from_the_dataclasses():
    from minilm.train.config import config_reference

    assert config_reference() in (ROOT / "README.md").read_text()


# ---------------------------------------------------------------- duplicate YAML keys (issue 17.7)


@pytest.mark.parametrize("text, key, line", [
    ("model: {n_layer: 2, n_layer: 3}\n", "n_layer", 1),  # flow style
    ("model:\n  n_layer: 2\n  n_head: 2\n  n_layer: 3\n", "n_layer", 4),  # block style
    ("model:\n  n_layer: 2\ntrain:\n  seed: 5\nmodel:\n  n_head: 2\n", "model", 5),
    ("wandb:\n  tags: [a]\n  project: p\n  tags: [b]\n", "tags", 4),
    ("# a comment\nout_dir: a\nout_dir: b\n", "out_dir", 3),  # top level
])
def test_a_duplicate_key_in_a_config_file_is_one_line(tmp_path, capsys, text, key, line):
    from minilm.cli.common import run_cli
    from minilm.cli.train import train_main

    path = tmp_path / "dup.yaml"
    path.write_text(text)
    message = (f"config file {path}: duplicate key '{key}' at line {line} (YAML allows each key "
               "once in a mapping)")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == message
    assert run_cli(train_main, [str(path)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_duplicate_key_in_an_ablation_config_is_one_line(tmp_path, capsys, monkeypatch):
    from minilm.cli import ablate
    from minilm.cli.common import run_cli

    def no_training(cfg):
        raise AssertionError("the ablation started")

    monkeypatch.setattr(ablate, "ablate", no_training)
    path = tmp_path / "ablation.yaml"
    path.write_text((ROOT / "configs/ablation/tied_vs_untied.yaml").read_text().replace(
        "    untied: {model.tie_embeddings: false}\n",
        "    untied: {model.tie_embeddings: false}\n    tied: {model.lm_head_bias: true}\n"))
    line = path.read_text().splitlines().index("    tied: {model.lm_head_bias: true}") + 1
    assert run_cli(ablate.main, [str(path), f"--out_dir={tmp_path / 'out'}"]) == 2
    assert capsys.readouterr().err == (f"error: config file {path}: duplicate key 'tied' at line "
                                       f"{line} (YAML allows each key once in a mapping)\n")


@pytest.mark.parametrize("arg, key", [
    ("--model={n_layer: 2, n_layer: 3}", "n_layer"),
    ("--ablation.arms={a: {model.bias: true}, a: {model.bias: false}}", "a"),
    ("--wandb.tags=[{x: 1, x: 2}]", "x"),
])
def test_a_duplicate_key_in_an_override_is_one_line(arg, key):
    from minilm.experiments.ablation import AblationConfig

    with pytest.raises(ConfigError) as e:
        load_config(None, [arg], cls=AblationConfig)
    assert str(e.value) == (f"{arg}: duplicate key '{key}' (YAML allows each key once in a "
                            "mapping)")


def test_merge_keys_may_override_what_they_merge():
    """YAML's merge key (<<) is not a duplicate: the mapping's own keys win over merged ones."""
    from minilm.train.config import read_yaml

    values = read_yaml("base: &b {n_layer: 2, n_head: 2}\nmodel:\n  <<: *b\n  n_layer: 3\n")
    assert values["model"] == {"n_layer": 3, "n_head": 2}


# ---------------------------------------------------------------- model.logit_softcap and its alias


def test_softcap_is_a_model_key_and_loss_softcap_its_alias(tmp_path):
    assert load_config(None, ["--model.logit_softcap=30"]).model.logit_softcap == 30.0
    assert load_config(None, ["--loss.softcap=30"]).model.logit_softcap == 30.0
    assert load_config(None, ["--loss.softcap=30", "--model.logit_softcap=30"]
                       ).model.logit_softcap == 30.0  # both, agreeing
    cfg = load_config(None, ["--loss.softcap=30"])
    assert "softcap" not in cfg.to_dict()["loss"]  # one value, under its key
    assert cfg.to_dict()["model"]["logit_softcap"] == 30.0
    old = tmp_path / "old.yaml"  # a config file of the code before (and a saved config.yaml)
    old.write_text("loss:\n  softcap: 20\n  z_loss: 0.001\n")
    assert load_config(old).model.logit_softcap == 20.0 and load_config(old).loss.z_loss == 1e-3
    assert load_config(old, ["--model.logit_softcap=10"]).model.logit_softcap == 10.0  # override
    both = tmp_path / "both.yaml"
    both.write_text("model:\n  logit_softcap: 20\nloss:\n  softcap: null\n")
    assert load_config(both).model.logit_softcap == 20.0  # a null alias is no value


@pytest.mark.parametrize("args, text, message", [
    (["--loss.softcap=30", "--model.logit_softcap=20"], None,
     "the command line: loss.softcap is 30 but model.logit_softcap is 20 (loss.softcap is the old "
     "name of model.logit_softcap): give one of them"),
    (["--model.logit_softcap=20", "--loss.softcap=30"], None,
     "the command line: loss.softcap is 30 but model.logit_softcap is 20 (loss.softcap is the old "
     "name of model.logit_softcap): give one of them"),
    ([], "model:\n  logit_softcap: 20\nloss:\n  softcap: 30\n",
     "config file {path}: loss.softcap is 30 but model.logit_softcap is 20 (loss.softcap is the "
     "old name of model.logit_softcap): give one of them"),
    (["--model.logit_softcap=0"], None, r"model.logit_softcap must be > 0 \(or null: off\), got "
                                        "0.0"),
    (["--loss.softcap=-1"], None, r"model.logit_softcap must be > 0 \(or null: off\), got -1.0"),
])
def test_softcap_given_twice_or_out_of_range_is_one_line(tmp_path, capsys, args, text, message):
    from minilm.cli.common import run_cli
    from minilm.cli.train import train_main

    path = tmp_path / "c.yaml"
    path.write_text(text or "{}\n")
    message = message.replace("{path}", str(path))
    with pytest.raises(ConfigError, match=message if "\\(" in message else None) as e:
        load_config(path, args)
    if "\\(" not in message:
        assert str(e.value) == message
    assert run_cli(train_main, [str(path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_help_lists_the_alias():
    from minilm.train.config import Config, config_help

    (line,) = [ln for ln in config_help(Config).splitlines() if ln.split()[:1] == ["loss.softcap"]]
    assert "float | null = null" in line and "the old name of model.logit_softcap" in line
