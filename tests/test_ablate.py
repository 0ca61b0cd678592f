"""The ablation at a tiny size: arms x seeds as full runs, paired by seed, and the report
(results.json, report.md, report.png); config mistakes are one line before any run starts."""

import json
import statistics

import pytest

from minilm.cli.ablate import main
from minilm.cli.common import run_cli
from minilm.experiments.ablation import AblationConfig, plan
from minilm.train.config import load_config

from conftest import CORPUS, ROOT, tiny_overrides

N_EMBD = 32  # tiny_overrides' width
VOCAB = len(set(CORPUS)) + 1  # characters + <|endoftext|>
ARM_KEYS = {"params_total", "params_non_embedding", "val_loss_mean", "val_loss_std",
            "val_losses", "val_ppl_mean", "tokens_per_sec", "bits_per_byte_mean",
            "bits_per_byte_std", "bits_per_byte_values", "ece_mean", "ece_std", "ece_values"}


def run_ablation(tmp_path, corpus_file, *extra: str) -> dict:
    """A tiny ablation of 4-step runs in tmp_path/abl; returns its results.json."""
    config = tmp_path / "ablation.yaml"
    config.write_text("ablation:\n  seeds: 2\n")
    argv = [str(config), *tiny_overrides(tmp_path, corpus_file, out_dir=tmp_path / "abl", **{
        "train.max_iters": 4, "train.eval_interval": 2}), *extra]
    assert run_cli(main, argv) == 0
    return json.loads((tmp_path / "abl" / "results.json").read_text())


@pytest.mark.slow  # six training runs
def test_tied_vs_untied_report(corpus_file, tmp_path):
    results = run_ablation(tmp_path, corpus_file)
    out = tmp_path / "abl"
    for arm in ("tied", "untied"):
        for seed in (1337, 1338):
            assert (out / arm / f"seed{seed}" / "metrics.jsonl").is_file()

    assert set(results) == {"vocab_size", "n_embd", "arms"}
    assert (results["vocab_size"], results["n_embd"]) == (VOCAB, N_EMBD)
    tied, untied = results["arms"]["tied"], results["arms"]["untied"]
    assert list(results["arms"]) == ["tied", "untied"]
    assert set(tied) == set(untied) == ARM_KEYS
    assert untied["params_total"] - tied["params_total"] == VOCAB * N_EMBD
    assert untied["params_non_embedding"] == tied["params_non_embedding"]
    for arm in (tied, untied):
        assert len(arm["val_losses"]) == 2
        assert arm["val_loss_mean"] == pytest.approx(statistics.mean(arm["val_losses"]))
        assert arm["val_loss_std"] == pytest.approx(statistics.stdev(arm["val_losses"]))
        assert arm["tokens_per_sec"] > 0 and arm["val_ppl_mean"] > 1
        for key in ("bits_per_byte", "ece"):
            assert arm[f"{key}_mean"] == pytest.approx(statistics.mean(arm[f"{key}_values"]))
            assert arm[f"{key}_std"] == pytest.approx(statistics.stdev(arm[f"{key}_values"]))

    # bits per byte and ECE: minilm.eval on each run's last checkpoint and its val split
    from minilm.cli.eval import evaluate_checkpoint

    run = out / "untied" / "seed1338"
    saved = json.loads((run / "eval.json").read_text())
    again = evaluate_checkpoint(run / "last", device="cpu")
    assert saved["data"]["split"] == "val" and saved["step"] == 4
    assert untied["bits_per_byte_values"][1] == saved["bits_per_byte"] == pytest.approx(
        again["bits_per_byte"])
    assert untied["ece_values"][1] == saved["ece"] == pytest.approx(again["ece"])

    report = (out / "report.md").read_text()
    assert "| tied |" in report and "| untied |" in report
    assert "**untied − tied**" in report and "Reading:" in report
    assert f"= {VOCAB} × {N_EMBD}" in report and "![" in report
    assert "bits per byte (mean ± std)" in report and "ECE (mean ± std)" in report
    assert "On the whole val split (minilm.eval, last checkpoint), untied − tied" in report

    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height, width, _ = imread(out / "report.png").shape
    assert height > 100 and width > 100


@pytest.mark.slow  # six training runs
def test_untied_arm_with_head_bias_and_explicit_seeds(corpus_file, tmp_path):
    results = run_ablation(tmp_path, corpus_file, "--ablation.seeds=[5]",
                           "--ablation.arms={tied: {model.tie_embeddings: true}, untied: "
                           "{model: {tie_embeddings: false, lm_head_bias: true}}}")
    tied, untied = results["arms"]["tied"], results["arms"]["untied"]
    assert untied["params_total"] - tied["params_total"] == VOCAB * N_EMBD + VOCAB
    assert len(tied["val_losses"]) == 1 and tied["val_loss_std"] == 0.0
    assert (tmp_path / "abl" / "untied" / "seed5" / "summary.json").is_file()
    assert "With one seed" in (tmp_path / "abl" / "report.md").read_text()


@pytest.mark.slow  # six training runs
def test_runs_of_one_seed_are_paired(corpus_file, tmp_path):
    """Two arms that change nothing the model or data see give identical losses per seed."""
    results = run_ablation(tmp_path, corpus_file,
                           "--ablation.arms={a: {}, b: {train.log_interval: 2}}")
    a, b = results["arms"]["a"]["val_losses"], results["arms"]["b"]["val_losses"]
    assert a == b and a[0] != a[1]


def test_plan_names_groups_and_tags_the_runs(tmp_path):
    cfg = load_config(None, [f"--out_dir={tmp_path / 'my_ablation'}", "--wandb.tags=[x]",
                             "--ablation.seeds=2", "--train.seed=10"], cls=AblationConfig)
    runs = plan(cfg)
    assert [(r.arm, r.seed) for r in runs] == [("tied", 10), ("untied", 10),
                                               ("tied", 11), ("untied", 11)]
    for r in runs:
        assert r.cfg.out_dir == str(tmp_path / "my_ablation" / r.arm / f"seed{r.seed}")
        assert r.cfg.train.seed == r.seed
        assert r.cfg.model.tie_embeddings == (r.arm == "tied")
        assert r.cfg.wandb.group == "my_ablation"  # default group: the out_dir's name
        assert r.cfg.wandb.tags == ["x", r.arm]
        assert r.cfg.wandb.name == f"{r.arm}-seed{r.seed}"


def test_every_override_an_arm_lists_is_applied(tmp_path):
    """What report.md lists as an arm's overrides is what its runs got: wandb.* included."""
    cfg = load_config(None, [f"--out_dir={tmp_path / 'abl'}", "--wandb.tags=[base]",
                             "--ablation.seeds=1", "--ablation.arms={a: {wandb.tags: [mine], "
                             "wandb.mode: disabled, wandb.project: p2}, b: {}}"],
                      cls=AblationConfig)
    a, b = plan(cfg)
    assert a.overrides == {"wandb.tags": ["mine"], "wandb.mode": "disabled", "wandb.project": "p2"}
    assert (a.cfg.wandb.tags, a.cfg.wandb.mode, a.cfg.wandb.project) == (["mine", "a"],
                                                                         "disabled", "p2")
    assert (b.cfg.wandb.tags, b.cfg.wandb.mode, b.cfg.wandb.project) == (["base", "b"],
                                                                         "offline", "minilm")


def test_shipped_config_plans_six_gpt2_runs():
    cfg = load_config(ROOT / "configs" / "ablation" / "tied_vs_untied.yaml", cls=AblationConfig)
    runs = plan(cfg)
    assert [(r.arm, r.seed) for r in runs] == [(arm, seed) for seed in (1337, 1338, 1339)
                                               for arm in ("tied", "untied")]
    assert {(r.cfg.data.source, r.cfg.data.tokenizer, r.cfg.wandb.group) for r in runs} == {
        ("shakespeare", "gpt2", "tied_vs_untied")}


@pytest.mark.parametrize("args, message", [
    (["--ablation.arms={untied: {model.tie_embedding: false}}"],
     "ablation.arms.untied: unknown config key 'model.tie_embedding'"),
    (["--ablation.arms={untied: {model.n_embd: 30}}"], "ablation.arms.untied: model.n_embd"),
    (["--ablation.arms={a/b: {}}"], "arm name 'a/b'"),
    (["--ablation.arms={a: 3}"], "ablation.arms.a: expected a mapping"),
    (["--ablation.seeds=0"], "ablation.seeds: expected a count >= 1"),
    (["--ablation.seeds=[1, 1]"], "ablation.seeds"),
    (["--ablation.seed=2"], "unknown config key 'ablation.seed'"),
    (["--ablation.arms={a: {train.seed: 7}}"],
     "ablation.arms.a: train.seed is set by the ablation for each run (runs are paired by seed"),
    (["--ablation.arms={a: {train: {seed: 7}}}"], "ablation.arms.a: train.seed is set by"),
    (["--ablation.arms={a: {out_dir: elsewhere}}"], "ablation.arms.a: out_dir is set by"),
    (["--ablation.arms={a: {wandb.group: g}}"], "ablation.arms.a: wandb.group is set by"),
    (["--ablation.arms={a: {wandb: {name: n}}}"], "ablation.arms.a: wandb.name is set by"),
    (["--data.val_fraction=0"], "an ablation compares runs by their val loss"),
])
def test_config_mistakes_are_one_line_before_any_run(tmp_path, capsys, args, message):
    config = tmp_path / "ablation.yaml"
    config.write_text(f"out_dir: {tmp_path / 'abl'}\n")
    assert run_cli(main, [str(config), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "abl").exists()


def test_missing_config_is_a_usage_error(capsys):
    assert run_cli(main, []) == 2
    assert "missing CONFIG.yaml" in capsys.readouterr().err
