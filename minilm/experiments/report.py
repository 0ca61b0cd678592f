"""An ablation's report from its runs' folders: results.json, report.md and report.png.

A run is scored by its final val loss (the eval at train.max_iters), not by its best one: the
minimum over several evals of a noisy curve would favour the noisier arm. For the same reason its
bits per byte and ECE (minilm.eval on the whole val split, in the run's eval.json) are those of
its last checkpoint. The spread is the sample standard deviation over seeds (0 with one seed).
Arms are compared with the first arm seed by seed, since the runs of one seed are paired (same
batches, same shared initial weights).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minilm.train.tracking import read_metrics

EVAL_FILE = "eval.json"  # in each run's out_dir, written by minilm.ablate
EVAL_FIGURES = {"bits_per_byte": "bits per byte", "ece": "ECE"}  # reported per arm when present


@dataclass
class RunResult:
    arm: str
    seed: int
    evals: list[dict[str, float]]  # metrics.jsonl's eval records: step, train/val loss, val_ppl
    summary: dict[str, Any]  # summary.json: params_*, best_val_loss, tokens_seen
    tokens_per_sec: float  # median over the logged steps
    eval: dict[str, Any] | None = None  # eval.json: minilm.eval of the last checkpoint, val split

    @property
    def val_loss(self) -> float:
        return self.evals[-1]["val_loss"]


def load_run(arm: str, seed: int, out_dir: str | Path) -> RunResult:
    records = read_metrics(out_dir)
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    eval_path = Path(out_dir) / EVAL_FILE
    evaluated = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    return RunResult(arm, seed, [r for r in records if "val_loss" in r], summary,
                     statistics.median(speeds), evaluated)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: list[RunResult], vocab_size: int, n_embd: int) -> dict[str, Any]:
    """results.json: per arm, parameter counts and val loss / ppl / speed over its seeds."""
    arms: dict[str, list[RunResult]] = {}
    for r in results:
        arms.setdefault(r.arm, []).append(r)
    out = {}
    for arm, rs in arms.items():
        losses = [r.val_loss for r in rs]
        out[arm] = dict(params_total=rs[0].summary["params_total"],
                        params_non_embedding=rs[0].summary["params_non_embedding"],
                        val_loss_mean=statistics.mean(losses), val_loss_std=_std(losses),
                        val_losses=losses,
                        val_ppl_mean=statistics.mean(r.evals[-1]["val_ppl"] for r in rs),
                        tokens_per_sec=statistics.mean(r.tokens_per_sec for r in rs))
        if all(r.eval is not None for r in results):
            for key in EVAL_FIGURES:
                values = [r.eval[key] for r in rs]
                out[arm].update({f"{key}_mean": statistics.mean(values), f"{key}_std": _std(values),
                                 f"{key}_values": values})
    return {"vocab_size": vocab_size, "n_embd": n_embd, "arms": out}


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if abs(n) >= 1e6 else f"{n / 1e3:.1f}k"


def comparison(results: dict[str, Any]) -> list[str]:
    """Paragraphs comparing each arm after the first with it, seed by seed: the val-loss
    difference, its spread over seeds, and whether the one exceeds the other."""
    (ref, r0), *others = results["arms"].items()
    vocab = results["vocab_size"]
    paragraphs = []
    for arm, r in others:
        diffs = [a - b for a, b in zip(r["val_losses"], r0["val_losses"])]
        mean, spread = statistics.mean(diffs), _std(diffs)
        extra = r["params_total"] - r0["params_total"]
        factor = f" = {vocab} × {extra // vocab}" if extra and extra % vocab == 0 else ""
        paragraphs.append(
            f"**{arm} − {ref}**: val loss {mean:+.4f} ± {spread:.4f} (mean ± std over seeds of "
            f"the per-seed difference: {', '.join(f'{d:+.4f}' for d in diffs)}); parameters "
            f"{extra:+,}{factor}.")
        evaluated = [k for k in EVAL_FIGURES if f"{k}_values" in r]
        if evaluated:
            parts = []
            for key in evaluated:
                d = [a - b for a, b in zip(r[f"{key}_values"], r0[f"{key}_values"])]
                parts.append(f"{EVAL_FIGURES[key]} {statistics.mean(d):+.4f} ± {_std(d):.4f} "
                             f"(per seed {', '.join(f'{x:+.4f}' for x in d)})")
            paragraphs.append(f"On the whole val split (minilm.eval, last checkpoint), {arm} − "
                              f"{ref}: {'; '.join(parts)}.")
        if len(diffs) < 2:
            paragraphs.append("With one seed there is no spread to compare the difference with.")
            continue
        exceeds = abs(mean) > spread
        paragraphs.append(
            f"Reading: {arm}'s val loss is {'lower' if mean < 0 else 'higher'} than {ref}'s by "
            f"{abs(mean):.4f}, which {'exceeds' if exceeds else 'does not exceed'} the "
            f"seed-to-seed spread of the difference ({spread:.4f}), so "
            + (f"at this size and budget the {arm if mean < 0 else ref} arm is better by more "
               "than seed noise." if exceeds else
               "at this size and budget the two arms cannot be told apart from seed noise."))
    return paragraphs


def markdown(title: str, description: str, results: dict[str, Any], runs: list,
             wall_seconds: float | None = None, cpu_seconds: float | None = None) -> str:
    """report.md: what was run, the table, the comparison, the plot."""
    cfg, arms = runs[0].cfg, results["arms"]
    seeds = sorted({run.seed for run in runs})
    overrides = {run.arm: run.overrides for run in runs}
    m, t = cfg.model, cfg.train
    per_step = t.batch_size * t.grad_accum_steps * m.block_size
    timing = ""
    if wall_seconds is not None:  # CPU time / cores: about what an idle machine would take
        timing = f" Wall time {wall_seconds / 60:.1f} min" + (
            f", CPU time {cpu_seconds / 60:.1f} min." if cpu_seconds is not None else ".")
    out = [f"# Ablation: {title}", ""]
    if description:
        out += [description.strip(), ""]
    out += [
        f"{len(runs)} runs: {len(arms)} arms × {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
        f"each {t.max_iters} steps × {per_step:,} tokens ({per_step * t.max_iters / 1e6:.2f}M) "
        f"of `{cfg.data.source}` with the `{cfg.data.tokenizer}` tokenizer "
        f"(vocab {results['vocab_size']:,}); n_layer {m.n_layer}, n_head {m.n_head}, "
        f"n_embd {m.n_embd}, block {m.block_size}; device `{t.device}`.{timing}", "",
    ]
    evaluated = [k for k in EVAL_FIGURES if f"{k}_mean" in next(iter(arms.values()))]
    out += [
        "| arm | overrides | params | non-embedding | val loss (mean ± std) | val loss per seed "
        "| val ppl | " + "".join(f"{EVAL_FIGURES[k]} (mean ± std) | " for k in evaluated)
        + "tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(evaluated) + "---:|",
    ]
    for arm, r in arms.items():
        ov = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in overrides[arm].items()) or "—"
        out.append(f"| {arm} | {ov} | {_params(r['params_total'])} | "
                   f"{_params(r['params_non_embedding'])} | "
                   f"{r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f} | "
                   f"{', '.join(f'{v:.4f}' for v in r['val_losses'])} | {r['val_ppl_mean']:.1f} | "
                   + "".join(f"{r[f'{k}_mean']:.4f} ± {r[f'{k}_std']:.4f} | " for k in evaluated)
                   + f"{r['tokens_per_sec']:,.0f} |")
    for paragraph in comparison(results):
        out += ["", paragraph]
    out += ["",
            f"Val loss is each run's final eval (step {t.max_iters}) over {t.eval_iters} batches, "
            "mean ± sample std over seeds. Runs of one seed see the same batches and start every "
            "parameter they share from the same values; an untied head is a fresh N(0, 0.02) "
            "matrix drawn after all shared parameters, not a copy of the embedding. tokens/s is "
            "the median over logged steps, averaged over seeds (wall clock: noisy on a shared "
            "machine)." + (" Bits per byte and ECE (top-label, 15 bins) are minilm.eval's, on "
                           "every token of the val split (each document scored after the "
                           "end-of-text token, sliding windows), for each run's last checkpoint, "
                           "the one the val loss is read from." if evaluated else ""), "",
            "![val loss against step, every run; per-arm mean in bold](report.png)", ""]
    return "\n".join(out)


def plot(results: list[RunResult], path: str | Path) -> None:
    """Val loss against step for every run (thin), the per-arm mean (bold): the whole run on the
    left, the second half zoomed on the right, where the arms separate."""
    from matplotlib.figure import Figure  # lazily: only the report needs matplotlib

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    arms = list(dict.fromkeys(r.arm for r in results))
    last = max(r.evals[-1]["step"] for r in results)
    for ax, start in zip(axes, (0, last // 2)):
        for i, arm in enumerate(arms):
            curves = [{e["step"]: e["val_loss"] for e in r.evals if e["step"] >= start}
                      for r in results if r.arm == arm]
            for c in curves:
                ax.plot(list(c), list(c.values()), color=f"C{i}", lw=0.8, alpha=0.45)
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(steps, [statistics.mean(c[s] for c in curves) for s in steps], color=f"C{i}",
                    lw=2.5, label=f"{arm} (mean of {len(curves)})")
        ax.set_xlabel("step")
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
    axes[0].set_title("val loss")
    axes[1].set_title(f"from step {last // 2}")
    axes[0].legend()
    fig.savefig(path, dpi=110)


def write_report(out_dir: str | Path, title: str, description: str, runs: list,
                 vocab_size: int, wall_seconds: float | None = None,
                 cpu_seconds: float | None = None) -> dict[str, Any]:
    """Read the runs (minilm.ablate.Run: arm, seed, overrides, cfg) back from their folders and
    write out_dir/results.json, report.md and report.png; returns the results."""
    out_dir = Path(out_dir)
    loaded = [load_run(run.arm, run.seed, run.cfg.out_dir) for run in runs]
    results = summarize(loaded, vocab_size, runs[0].cfg.model.n_embd)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(title, description, results, runs, wall_seconds,
                                                  cpu_seconds))
    plot(loaded, out_dir / "report.png")
    return results
