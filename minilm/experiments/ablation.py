"""Ablations: one training config run under several arms (named sets of overrides) x seeds.

    python -m minilm.ablate configs/ablation/tied_vs_untied.yaml [--section.key=value ...]

The config is a training config plus an `ablation` section. Every arm x seed is a full run of
trainer.train in out_dir/<arm>/seed<seed>, all in one wandb group with the arm as a tag; then
minilm.experiments.report writes out_dir/results.json, report.md and report.png.

Runs of one seed are paired: the trainer seeds torch before building the model and draws each
batch from (seed, rank, step, micro-step), so two arms of one seed see the same batches and start
every parameter they share from the same values. The arms differ only by their overrides.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minilm.errors import ConfigError
from minilm.evaluation.run import evaluate_checkpoint
from minilm.experiments.report import EVAL_FILE, write_report
from minilm.files import write_atomic
from minilm.train.config import Config, build, flatten, merge_overrides, setting, validate
from minilm.train.data import prepare
from minilm.train.trainer import train

DEFAULT_ARMS = {"tied": {"model.tie_embeddings": True},
                "untied": {"model.tie_embeddings": False}}


@dataclass
class AblationSection:
    name: str | None = setting(None, "report title and default wandb group (null: out_dir's name)")
    description: str = setting("", "a markdown paragraph for the top of report.md: the question")
    seeds: int | list[int] = setting(3, "a count (train.seed, train.seed + 1, ...) or the seeds")
    arms: dict[str, dict[str, Any]] = field(
        default_factory=lambda: copy.deepcopy(DEFAULT_ARMS),
        metadata={"help": "arm name -> overrides ({model.lm_head_bias: true} or nested)"})


@dataclass
class AblationConfig(Config):
    ablation: AblationSection = field(default_factory=AblationSection)

    @property
    def name(self) -> str:
        return self.ablation.name or Path(self.out_dir).resolve().name


@dataclass
class Run:
    arm: str
    seed: int
    overrides: dict[str, Any]  # the arm's, flattened: {"model.tie_embeddings": False}
    cfg: Config


def seed_list(seeds: Any, base_seed: int) -> list[int]:
    """ablation.seeds -> the seeds: a count n gives base_seed + 0..n-1."""
    if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1:
        return [base_seed + k for k in range(seeds)]
    if (isinstance(seeds, list) and seeds and len(set(seeds)) == len(seeds)
            and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        return list(seeds)
    raise ConfigError(f"ablation.seeds: expected a count >= 1 or a list of distinct integer "
                      f"seeds, got {seeds!r}")


def arm_overrides(arms: Any) -> dict[str, dict[str, Any]]:
    """ablation.arms, checked, each arm's overrides flattened to dotted keys."""
    if not isinstance(arms, dict) or not arms:
        raise ConfigError("ablation.arms: expected a mapping of at least one arm name to overrides")
    out = {}
    for arm, overrides in arms.items():
        if not re.fullmatch(r"[\w.-]+", str(arm)):
            raise ConfigError(f"ablation.arms: arm name {arm!r} must be letters, digits, '_', "
                              "'-' or '.' (it names a folder)")
        if not isinstance(overrides, dict | None):
            raise ConfigError(f"ablation.arms.{arm}: expected a mapping of overrides, "
                              f"got {overrides!r}")
        out[str(arm)] = flatten(overrides or {})
    return out


# What the ablation sets per run, and what to use instead: an arm can't override these.
PER_RUN = {"out_dir": "the ablation's out_dir holds out_dir/<arm>/seed<seed>",
           "train.seed": "runs are paired by seed: set ablation.seeds",
           "wandb.group": "all runs share one group: set wandb.group at the top level",
           "wandb.name": "each run is named <arm>-seed<seed>"}


def plan(cfg: AblationConfig) -> list[Run]:
    """Every arm x seed as a validated training config, so that a mistake in any arm is
    reported before the first run starts. Seed-major: a partial ablation is still paired.
    An arm's wandb.tags replace the top-level tags (the arm's name is added to either)."""
    if cfg.data.val_fraction == 0:
        raise ConfigError("data.val_fraction is 0, but an ablation compares runs by their val "
                          "loss: give it a val split")
    arms = arm_overrides(cfg.ablation.arms)
    for arm, overrides in arms.items():
        for key in overrides:
            if key in PER_RUN:
                raise ConfigError(f"ablation.arms.{arm}: {key} is set by the ablation for each "
                                  f"run ({PER_RUN[key]})")
    seeds = seed_list(cfg.ablation.seeds, cfg.train.seed)
    base = cfg.to_dict()
    del base["ablation"]
    group = cfg.wandb.group or cfg.name
    runs = []
    for seed in seeds:
        for arm, overrides in arms.items():
            tags = overrides.get("wandb.tags", cfg.wandb.tags)
            if not isinstance(tags, list):
                raise ConfigError(f"ablation.arms.{arm}: wandb.tags: expected a list, got {tags!r}")
            ours = {"out_dir": str(Path(cfg.out_dir) / arm / f"seed{seed}"),
                    "train.seed": seed, "wandb.group": group, "wandb.name": f"{arm}-seed{seed}",
                    "wandb.tags": [*tags, arm]}
            # json is a subset of YAML, so each value survives merge_overrides' parsing as is
            args = [f"--{k}={json.dumps(v)}" for k, v in {**overrides, **ours}.items()]
            try:
                run_cfg = build(Config, merge_overrides(base, args))
                validate(run_cfg)
            except ConfigError as e:
                raise ConfigError(f"ablation.arms.{arm}: {e}") from None
            runs.append(Run(arm, seed, overrides, run_cfg))
    return runs


def ablate(cfg: AblationConfig) -> dict[str, Any]:
    """Train every run of the plan, then write the report; returns results.json's content."""
    runs = plan(cfg)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for i, run in enumerate(runs, 1):
        print(f"== {cfg.name}: run {i}/{len(runs)}, arm {run.arm}, seed {run.seed} "
              f"-> {run.cfg.out_dir}", flush=True)
        train(run.cfg)
        evaluate_run(run.cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    vocab_size = prepare(**dataclasses.asdict(cfg.data), log=lambda *_: None).vocab_size  # cached
    results = write_report(cfg.out_dir, cfg.name, cfg.ablation.description, runs, vocab_size,
                           wall_seconds=wall, cpu_seconds=cpu)
    print(f"== {cfg.name}: {len(runs)} runs in {wall / 60:.1f} min; report in {cfg.out_dir}/"
          "report.md, results.json, report.png", flush=True)
    return results


def evaluate_run(cfg: Config) -> None:
    """Bits per byte and calibration of a run's last checkpoint on its val split, by minilm.eval,
    into out_dir/eval.json for the report."""
    results = evaluate_checkpoint(Path(cfg.out_dir) / "last", device=cfg.train.device)
    write_atomic(Path(cfg.out_dir) / EVAL_FILE, json.dumps(results, indent=2) + "\n")
