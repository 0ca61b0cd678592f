"""Where training reports go: out_dir/metrics.jsonl and the console (progress bar, eval lines)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class Tracker:
    """Append-only metrics.jsonl plus console output. Only rank 0 makes one (enabled=True)."""

    def __init__(self, out_dir: str | Path, max_iters: int, enabled: bool = True,
                 stream=sys.stdout):
        self.enabled = enabled
        self.max_iters = max_iters
        self.stream = stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.summary: dict[str, Any] = {}
        self._file = None
        if enabled:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self._file = open(Path(out_dir) / "metrics.jsonl", "a", buffering=1)

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")

    def log_step(self, step: int, loss: float, lr: float, tokens_per_sec: float,
                 ms_per_iter: float, **extra: float) -> None:
        """One optimizer step's figures: a jsonl line and the progress bar."""
        if not self.enabled:
            return
        self._write(dict(step=step, loss=loss, lr=lr, tokens_per_sec=tokens_per_sec,
                         ms_per_iter=ms_per_iter, **extra))
        frac = step / self.max_iters
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        eta = _duration((self.max_iters - step) * ms_per_iter / 1000)
        line = (f"[{bar}] {step}/{self.max_iters} loss {loss:.4f} lr {lr:.2e} "
                f"{tokens_per_sec / 1000:.1f}k tok/s {ms_per_iter:.0f} ms/it ETA {eta}")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def log_eval(self, step: int, train_loss: float, val_loss: float, val_ppl: float) -> None:
        if not self.enabled:
            return
        self._write(dict(step=step, train_loss=train_loss, val_loss=val_loss, val_ppl=val_ppl))
        prefix = "\n" if self.tty else ""
        self.stream.write(f"{prefix}eval step {step}: train loss {train_loss:.4f}, "
                          f"val loss {val_loss:.4f}, val ppl {val_ppl:.2f}\n")
        self.stream.flush()

    def set_summary(self, **values: Any) -> None:
        self.summary.update(values)

    def info(self, message: str) -> None:
        if self.enabled:
            self.stream.write(message + "\n")
            self.stream.flush()

    def close(self, final_checkpoint: Path | None = None) -> None:
        """End of the run; final_checkpoint is the folder a tracker may upload."""
        if self._file is not None:
            self._file.close()
            self._file = None


def make_tracker(cfg, enabled: bool = True) -> Tracker:
    """The tracker for a run of resolved config `cfg` (rank 0 only: enabled=False elsewhere)."""
    return Tracker(cfg.out_dir, cfg.train.max_iters, enabled=enabled)


class Timer:
    """Wall time per step between log points (eval time excluded by restart())."""

    def __init__(self):
        self.restart(0)

    def restart(self, step: int) -> None:
        self.t0, self.step0 = time.perf_counter(), step

    def seconds_per_step(self, step: int) -> float:
        return (time.perf_counter() - self.t0) / max(step - self.step0, 1)
