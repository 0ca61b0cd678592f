"""Where training reports go: out_dir/metrics.jsonl, out_dir/summary.json, the console (progress
bar, eval lines) and, when cfg.wandb asks for it, a Weights & Biases run.

Every record goes to every sink, so metrics.jsonl and the wandb history hold the same numbers.
wandb is optional: imported only when a run is wanted, and a wandb that is missing or fails to
start costs one warning line, never the training run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from minilm.console import warn, write_console
from minilm.files import strict_json, write_atomic


def console_log(enabled: bool = True) -> Callable[[str], None]:
    """info() lines on stdout before a run's Tracker exists (rank 0's only: enabled), so that
    a run can speak while it checks its start, before it writes anything."""
    def log(message: str) -> None:
        write_console(sys.stdout, message + "\n")

    return log if enabled else (lambda message: None)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class Tracker:
    """Append-only metrics.jsonl plus console output, mirrored to a wandb run when given one.
    Only rank 0 makes one (enabled=True).

    resume_step: continue the records of a run resumed from its checkpoint at that step; the
    records of later steps (logged before an interrupt, after the checkpoint) are dropped, since
    the resumed run logs those steps again. Console output is not the run: when it can no longer be
    written (stdout piped into `head`, which has exited), it stops and the records go on."""

    def __init__(self, out_dir: str | Path, max_iters: int, enabled: bool = True,
                 stream=None, run: Any = None, log_checkpoints: bool = False,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.max_iters = max_iters
        self.stream = stream if stream is not None else sys.stdout  # the console (None: stdout)
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.summary: dict[str, Any] = {}
        self.run = run  # a wandb Run, or None
        self.log_checkpoints = log_checkpoints
        self._file = None
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / "metrics.jsonl"
            if resume_step is not None:
                _truncate_records(path, resume_step)
            self._file = open(path, "a" if resume_step is not None else "w", buffering=1)

    def _console(self, text: str) -> None:
        if self.stream is not None and not write_console(self.stream, text):
            self.stream = None  # the reader has gone; the run goes on

    def _write(self, record: dict[str, Any], section: str) -> None:
        """One record to metrics.jsonl and, as `section/key` at the same step, to wandb."""
        self._file.write(strict_json(record) + "\n")
        if self.run is not None:
            self.run.log({f"{section}/{k}": v for k, v in record.items() if k != "step"},
                         step=record["step"])

    def log_step(self, step: int, loss: float, lr: float, tokens_per_sec: float,
                 ms_per_iter: float, **extra: float) -> None:
        """One optimizer step's figures: a jsonl line and the progress bar."""
        if not self.enabled:
            return
        self._write(dict(step=step, loss=loss, lr=lr, tokens_per_sec=tokens_per_sec,
                         ms_per_iter=ms_per_iter, **extra), "train")
        frac = step / self.max_iters
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        eta = _duration((self.max_iters - step) * ms_per_iter / 1000)
        line = (f"[{bar}] {step}/{self.max_iters} loss {loss:.4f} lr {lr:.2e} "
                f"{tokens_per_sec / 1000:.1f}k tok/s {ms_per_iter:.0f} ms/it ETA {eta}")
        self._console(("\r" + line) if self.tty else line + "\n")

    def log_eval(self, step: int, train_loss: float, val_loss: float | None = None,
                 val_ppl: float | None = None) -> None:
        """One eval's losses; without a val split (data.val_fraction 0) the train loss only."""
        if not self.enabled:
            return
        record = dict(step=step, train_loss=train_loss)
        if val_loss is not None:
            record.update(val_loss=val_loss, val_ppl=val_ppl)
        self._write(record, "eval")
        prefix = "\n" if self.tty else ""
        val = f", val loss {val_loss:.4f}, val ppl {val_ppl:.2f}" if val_loss is not None else ""
        self._console(f"{prefix}eval step {step}: train loss {train_loss:.4f}{val}\n")

    def set_summary(self, **values: Any) -> None:
        """Run-level figures (parameter counts, best val loss, ...): summary.json and wandb."""
        self.summary.update(values)
        if self.run is not None:
            self.run.summary.update(values)

    def info(self, message: str) -> None:
        if self.enabled:
            self._console(message + "\n")

    def close(self, final_checkpoint: Path | None = None, exit_code: int = 0) -> None:
        """End of the run; final_checkpoint is the folder uploaded when log_checkpoints is set,
        exit_code the run's (not 0: wandb marks it failed). Closing twice does nothing."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        write_atomic(self.out_dir / "summary.json", strict_json(self.summary, indent=2) + "\n")
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            if self.log_checkpoints and final_checkpoint and Path(final_checkpoint).is_dir():
                import wandb

                artifact = wandb.Artifact(f"checkpoint-{run.id}", type="model")
                artifact.add_dir(str(final_checkpoint))
                run.log_artifact(artifact)
            run.finish(exit_code=exit_code)
        except Exception as e:  # an upload that fails must not turn a finished run into an error
            warn("wandb did not finish the run", e)


def start_wandb(cfg) -> Any:
    """A wandb run for resolved config `cfg`, or None when disabled or wandb can't start.

    As in any wandb script, the environment wins: WANDB_MODE over cfg.wandb.mode, and WANDB_DIR
    over the default folder, out_dir (the run files then land in out_dir/wandb/). Both are read
    here, at each start: wandb itself reads them once per process.
    """
    w = cfg.wandb
    mode = os.environ.get("WANDB_MODE") or w.mode
    if mode == "disabled":
        return None
    try:
        import wandb

        return wandb.init(mode=mode, project=w.project, entity=w.entity, group=w.group,
                          name=w.name, tags=w.tags, config=cfg.to_dict(),
                          dir=os.environ.get("WANDB_DIR") or cfg.out_dir)
    except Exception as e:  # missing, not logged in, offline server...: not worth a lost run
        warn("wandb did not start; training goes on without it", e)
        return None


def make_tracker(cfg, enabled: bool = True, resume_step: int | None = None) -> Tracker:
    """The tracker for a run of resolved config `cfg` (rank 0 only: enabled=False elsewhere),
    resumed from its checkpoint at `resume_step` if given."""
    tracker = Tracker(cfg.out_dir, cfg.train.max_iters, enabled=enabled,
                      log_checkpoints=cfg.wandb.log_checkpoints, resume_step=resume_step)
    if enabled:
        tracker.run = start_wandb(cfg)
    return tracker


def _truncate_records(path: Path, last_step: int) -> None:
    """Keep the records of steps <= last_step (and drop a line torn by a kill); atomic."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of out_dir/metrics.jsonl in order: steps have "loss", evals "val_loss"."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


class Timer:
    """Wall time per step between log points (eval time excluded by restart())."""

    def __init__(self):
        self.restart(0)

    def restart(self, step: int) -> None:
        self.t0, self.step0 = time.perf_counter(), step

    def seconds_per_step(self, step: int) -> float:
        return (time.perf_counter() - self.t0) / max(step - self.step0, 1)
