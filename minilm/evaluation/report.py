"""What minilm-eval shows of its results: the console summary, --report DIR (results.json,
report.md, reliability.png, sweep.png) and --wandb. matplotlib and wandb are imported only here,
and only when a plot or a run is asked for."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

from minilm.console import warn
from minilm.files import open_atomic, write_atomic


def _data_label(results: dict[str, Any]) -> str:
    data = results["data"]
    if "files" in data:
        return ", ".join(data["files"])
    return f"the {data['split']} split of {data['cache']}"


def _checkpoint_label(results: dict[str, Any]) -> str:
    step = results.get("step")
    return results["checkpoint"] + (f" (step {step})" if step is not None else "")


def summary_text(results: dict[str, Any]) -> str:
    """The console output: every figure, one topic a line."""
    r = results
    lines = [
        f"minilm-eval {_checkpoint_label(r)} on {_data_label(r)}",
        f"  {r['documents']:,} documents, {r['tokens']:,} tokens, {r['bytes']:,} bytes, "
        f"{r['words']:,} words; stride {r['stride']}, {r['device']}, {r['seconds']:.1f} s "
        f"({r['tokens_per_sec']:,.0f} tokens/s)",
        f"  nll {r['nll']:.4f} nats/token   ppl {r['ppl']:.4f}",
        f"  bits/byte {r['bits_per_byte']:.4f}   byte ppl {r['byte_perplexity']:.4f}   "
        f"word ppl {r['word_perplexity']:.2f}",
        f"  top-1 acc {r['top1_acc']:.4f}   top-5 acc {r['top5_acc']:.4f}   "
        f"entropy {r['entropy']:.4f} nats   top-1 prob {r['top1_prob']:.4f}",
        f"  ECE {r['ece']:.4f}   MCE {r['mce']:.4f}   (top-label, 15 bins)",
    ]
    if "temperature" in r:
        t, held = r["temperature"], r["temperature"]["heldout"]
        lines += [
            f"temperature scaling: T* = {t['T']:.4f} fitted on {t['fit']['documents']} documents "
            f"({t['fit']['tokens']:,} tokens, {t['passes']} passes)"
            + (" -- at the search bound" if t["at_bound"] else ""),
            f"  held out ({held['documents']} documents, {held['tokens']:,} tokens): "
            f"nll {held['nll_at_1']:.4f} -> {held['nll_at_T']:.4f}   "
            f"ECE {held['ece_at_1']:.4f} -> {held['ece_at_T']:.4f}",
        ]
        if r.get("calibration_file"):
            lines.append(f"  written to {r['calibration_file']}")
    if "sweep" in r:
        lines += ["temperature sweep:", "  " + _sweep_header()]
        lines += ["  " + _sweep_row(row) for row in r["sweep"]]
    return "\n".join(lines)


def _sweep_header() -> str:
    return f"{'T':>6} {'nll':>8} {'ppl':>9} {'ECE':>7} {'MCE':>7} {'entropy':>8} {'top-1 p':>8}"


def _sweep_row(row: dict[str, float]) -> str:
    return (f"{row['temperature']:6.3g} {row['nll']:8.4f} {row['ppl']:9.3f} {row['ece']:7.4f} "
            f"{row['mce']:7.4f} {row['entropy']:8.4f} {row['top1_prob']:8.4f}")


def _bins_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| confidence | tokens | accuracy | mean confidence | gap |", "|---|---:|---:|---:|---:|"]
    for b in rows:
        if b["count"]:
            out.append(f"| ({b['lo']:.3f}, {b['hi']:.3f}] | {b['count']:,} | {b['accuracy']:.4f} "
                       f"| {b['confidence']:.4f} | {b['accuracy'] - b['confidence']:+.4f} |")
    return out


def markdown(results: dict[str, Any]) -> str:
    """report.md: what was evaluated, the figures, calibration, temperature, the plots."""
    r = results
    out = [f"# minilm-eval: {r['checkpoint']}", "",
           f"{_checkpoint_label(r)} on {_data_label(r)}: {r['documents']:,} documents, "
           f"{r['tokens']:,} tokens, {r['bytes']:,} UTF-8 bytes, {r['words']:,} words. Each "
           f"document is scored after the end-of-text token, every token once, in windows of "
           f"block_size advancing by {r['stride']}; {r['seconds']:.1f} s on {r['device']} "
           f"({r['tokens_per_sec']:,.0f} tokens/s).", "",
           "| figure | value |", "|---|---:|",
           f"| NLL (nats/token) | {r['nll']:.4f} |", f"| perplexity | {r['ppl']:.4f} |",
           f"| bits per byte | {r['bits_per_byte']:.4f} |",
           f"| byte perplexity | {r['byte_perplexity']:.4f} |",
           f"| word perplexity | {r['word_perplexity']:.2f} |",
           f"| top-1 accuracy | {r['top1_acc']:.4f} |", f"| top-5 accuracy | {r['top5_acc']:.4f} |",
           f"| mean entropy (nats) | {r['entropy']:.4f} |",
           f"| mean top-1 probability | {r['top1_prob']:.4f} |",
           f"| ECE (top-label, 15 bins) | {r['ece']:.4f} |", f"| MCE | {r['mce']:.4f} |", "",
           "Bits per byte and byte/word perplexity divide the same summed NLL by the text's bytes "
           "or words instead of its tokens, so they compare models with different tokenizers.",
           "", "## Calibration", "",
           "Confidence is the top-1 probability; a prediction is correct when its argmax is the "
           "next token. ECE is the token-weighted mean of |accuracy − confidence| over the bins, "
           "MCE the largest.", "", *_bins_table(r["reliability"]), ""]
    if "temperature" in r:
        t, held = r["temperature"], r["temperature"]["heldout"]
        out += ["## Temperature scaling", "",
                f"T* = **{t['T']:.4f}** minimises NLL on the first {t['fit']['documents']} "
                f"documents ({t['fit']['tokens']:,} tokens; NLL {t['fit']['nll_at_1']:.4f} → "
                f"{t['fit']['nll_at_T']:.4f}; Newton on log T, {t['passes']} passes"
                + (", at the search bound" if t["at_bound"] else "") + "). On the other "
                f"{held['documents']} documents ({held['tokens']:,} tokens):", "",
                "| | T = 1 | T* |", "|---|---:|---:|",
                f"| NLL | {held['nll_at_1']:.4f} | {held['nll_at_T']:.4f} |",
                f"| ECE | {held['ece_at_1']:.4f} | {held['ece_at_T']:.4f} |",
                f"| MCE | {held['mce_at_1']:.4f} | {held['mce_at_T']:.4f} |", ""]
    out += ["![reliability diagram](reliability.png)", ""]
    if "sweep" in r:
        out += ["## Temperature sweep", "", "What dividing the logits by T does to the model's "
                "distribution over this text (all documents).", "",
                "| T | NLL | ppl | ECE | MCE | entropy | top-1 prob |",
                "|---:|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {s['temperature']:g} | {s['nll']:.4f} | {s['ppl']:.3f} | {s['ece']:.4f} | "
                f"{s['mce']:.4f} | {s['entropy']:.4f} | {s['top1_prob']:.4f} |" for s in r["sweep"]]
        out += ["", "![temperature sweep](sweep.png)", ""]
    return "\n".join(out)


def _save(fig, path: Path) -> None:
    with open_atomic(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=110)


def plot_reliability(results: dict[str, Any], path: Path) -> None:
    """Accuracy per confidence bin against the diagonal, the gap to the bin's mean confidence
    shaded, the tokens per bin below; held-out T = 1 and T* side by side after a fit."""
    from matplotlib.figure import Figure

    if "temperature" in results:
        t, held = results["temperature"], results["temperature"]["heldout"]
        panels = [("held-out documents, T = 1", held["reliability_at_1"], held["ece_at_1"]),
                  (f"held-out documents, T* = {t['T']:.3f}", held["reliability_at_T"],
                   held["ece_at_T"])]
    else:
        panels = [("all documents, T = 1", results["reliability"], results["ece"])]
    fig = Figure(figsize=(5.0 * len(panels), 6.2), layout="constrained")
    axes = fig.subplots(2, len(panels), height_ratios=[3, 1.2], squeeze=False, sharex=True)
    for col, (title, rows, ece) in enumerate(panels):
        ax, ax_n = axes[0][col], axes[1][col]
        used = [b for b in rows if b["count"]]
        lo = [b["lo"] for b in used]
        width = rows[0]["hi"] - rows[0]["lo"]
        acc = [b["accuracy"] for b in used]
        conf = [b["confidence"] for b in used]
        ax.bar(lo, acc, width=width, align="edge", color="C0", edgecolor="black", lw=0.6,
               label="accuracy")
        ax.bar(lo, [c - a for a, c in zip(acc, conf)], bottom=acc, width=width, align="edge",
               color="C3", alpha=0.3, hatch="//", edgecolor="C3", lw=0.6,
               label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{title}\nECE {ece:.4f}")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
        ax_n.bar(lo, [b["count"] for b in used], width=width, align="edge", color="0.6",
                 edgecolor="black", lw=0.6)
        for b in used:
            ax_n.annotate(f"{b['count']:,}", ((b["lo"] + b["hi"]) / 2, b["count"]),
                          ha="center", va="bottom", fontsize=6.5, rotation=90)
        ax_n.set_yscale("log")
        ax_n.set_ylim(0.7, max(b["count"] for b in used) * 30)
        ax_n.set(xlabel="confidence (top-1 probability)", ylabel="tokens per bin")
    _save(fig, path)


def plot_sweep(results: dict[str, Any], path: Path) -> None:
    """NLL, ECE, entropy and top-1 probability against T; T = 1 and T* marked."""
    from matplotlib.figure import Figure

    sweep = results["sweep"]
    temps = [s["temperature"] for s in sweep]
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    axes = fig.subplots(1, 4)
    for ax, key, label in zip(axes, ("nll", "ece", "entropy", "top1_prob"),
                              ("NLL (nats/token)", "ECE", "mean entropy (nats)",
                               "mean top-1 probability")):
        ax.plot(temps, [s[key] for s in sweep], "o-", color="C0")
        ax.axvline(1.0, color="0.5", lw=0.8, ls=":")
        if "temperature" in results:
            ax.axvline(results["temperature"]["T"], color="C3", lw=1, ls="--", label="T*")
            ax.legend(fontsize=8)
        ax.set_xscale("log")  # temperatures act by ratios
        ax.set_xticks(temps, [f"{t:g}" for t in temps], minor=False)
        ax.minorticks_off()
        ax.set(xlabel="temperature T (log scale)", title=label)
        ax.grid(alpha=0.3)
    _save(fig, path)


def write_plots(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """reliability.png and, with a sweep, sweep.png in out_dir; their paths by wandb key."""
    plots = {"eval/reliability": out_dir / "reliability.png"}
    plot_reliability(results, plots["eval/reliability"])
    if "sweep" in results:
        plots["eval/sweep"] = out_dir / "sweep.png"
        plot_sweep(results, plots["eval/sweep"])
    return plots


def write_report(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """results.json, report.md and the plots (write_plots) in out_dir; returns the plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    plots = write_plots(results, out_dir)
    write_atomic(out_dir / "report.md", markdown(results))
    return plots


def scalar_figures(results: dict[str, Any]) -> dict[str, float]:
    """The figures as flat `eval/...` keys, for a wandb summary."""
    keys = ("tokens", "bytes", "words", "nll", "ppl", "bits_per_byte", "byte_perplexity",
            "word_perplexity", "top1_acc", "top5_acc", "entropy", "top1_prob", "ece", "mce",
            "tokens_per_sec")
    out = {f"eval/{k}": results[k] for k in keys}
    if "temperature" in results:
        t = results["temperature"]
        out["eval/temperature"] = t["T"]
        out.update({f"eval/heldout_{k}": v for k, v in t["heldout"].items()
                    if isinstance(v, (int, float))})
    return out


def log_wandb(results: dict[str, Any], report_dir: Path | None,
              plots: dict[str, Path] | None = None) -> None:
    """A wandb run (offline unless WANDB_MODE says otherwise, as training) with the figures in
    its summary, the reliability diagram and sweep as images and the sweep as a table. Files go
    to report_dir/wandb, else ./wandb. plots: write_report's, when it ran (else they are drawn
    here). A wandb that fails costs a warning, not the results."""
    from types import SimpleNamespace

    from minilm.train.config import WandbConfig
    from minilm.train.tracking import start_wandb

    ckpt = Path(results["checkpoint"])
    settings = {k: results[k] for k in ("checkpoint", "step", "data", "stride", "batch_size")}
    cfg = SimpleNamespace(  # what start_wandb reads from a training config
        wandb=WandbConfig(name=f"eval-{ckpt.resolve().parent.name}-{ckpt.name}", tags=["eval"]),
        out_dir=str(report_dir or "."), to_dict=lambda: {"eval": settings})
    run = start_wandb(cfg)
    if run is None:
        return
    try:
        import wandb

        run.summary.update(scalar_figures(results))
        with tempfile.TemporaryDirectory() as tmp:
            images = plots or write_plots(results, Path(tmp))
            record: dict[str, Any] = {k: wandb.Image(str(p)) for k, p in images.items()}
            if "sweep" in results:
                columns = list(results["sweep"][0])
                record["eval/sweep_table"] = wandb.Table(
                    columns=columns, data=[[s[c] for c in columns] for s in results["sweep"]])
            run.log(record)
        run.finish()
    except Exception as e:  # the figures are printed and written anyway
        warn("wandb logging failed", e)
        with contextlib.suppress(Exception):  # do not leave the run open in this process
            run.finish(exit_code=1)
