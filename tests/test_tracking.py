"""Tracking: a tiny run mirrored to an offline wandb run (read back from its .wandb file), the
environment winning over the config, `disabled` writing nothing, and a wandb that is missing or
fails to start costing one warning line, not the run."""

import json
import struct
import sys
import time

import pytest

from minilm.train.config import load_config
from minilm.train.tracking import make_tracker, read_metrics
from minilm.train.trainer import train

from conftest import tiny_overrides

BLOCK = 32 * 1024


def wandb_records(path):
    """The protobuf Records of a .wandb file: a 7-byte header (':W&B' + version), then a
    LevelDB-style log in 32 KiB blocks of chunks [crc32c:4][length:2][type:1][payload], type
    1 full, 2 first, 3 middle, 4 last; under 7 bytes left in a block, or type 0, is padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, payload = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def read_wandb_run(root, timeout: float = 30.0):
    """(run record, history {step: {key: value}}, final summary, record kinds) of the one
    offline run under root/wandb. wandb-core writes the file in the background, after
    run.finish() has returned: wait for the closing "exit" record."""
    files = list(root.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(files[0]))
        kinds = [record.WhichOneof("record_type") for record in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    run, history, summary = None, {}, {}
    for record, kind in zip(records, kinds):
        if kind == "run":
            run = record.run
        elif kind == "history":
            items = _items(record.history.item)
            history.setdefault(items["_step"], {}).update(items)
        elif kind == "summary":
            summary.update(_items(record.summary.update))
    return run, history, summary, set(kinds)


def test_offline_run_records_metrics_and_summary(corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    cfg = load_config(None, tiny_overrides(tmp_path, corpus_file, **{
        "wandb.group": "g", "wandb.tags": "[small]", "wandb.log_checkpoints": True}))
    result = train(cfg)
    out = tmp_path / "out"
    run, history, summary, kinds = read_wandb_run(out)

    assert run.run_group == "g" and list(run.tags) == ["small"]
    assert _items(run.config.update)["model"]["n_embd"] == 32  # the whole resolved config
    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert [r["step"] for r in evals] == [0, 4, 8]
    for r in steps:  # wandb holds exactly what metrics.jsonl holds, at the training step
        for key in ("loss", "lr", "grad_norm", "tokens_per_sec"):
            assert history[r["step"]][f"train/{key}"] == r[key]
    for r in evals:
        for key in ("train_loss", "val_loss", "val_ppl"):
            assert history[r["step"]][f"eval/{key}"] == r[key]

    expected = {k: v for k, v in result.items() if k not in ("step", "out_dir")}
    assert set(expected) == {"params_total", "params_embedding", "params_head",
                             "params_non_embedding", "best_val_loss", "tokens_seen"}
    assert {k: summary[k] for k in expected} == expected
    assert json.loads((out / "summary.json").read_text()) == expected
    assert expected["best_val_loss"] == min(r["val_loss"] for r in evals[1:])
    assert "artifact" in kinds and "exit" in kinds  # checkpoint uploaded, run finished


@pytest.mark.parametrize("env_mode, cfg_mode", [("disabled", "offline"), (None, "disabled")])
def test_disabled_writes_nothing(tmp_path, monkeypatch, env_mode, cfg_mode):
    if env_mode:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    else:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    cfg = load_config(None, [f"--out_dir={tmp_path / 'out'}", f"--wandb.mode={cfg_mode}"])
    tracker = make_tracker(cfg)
    assert tracker.run is None
    tracker.log_step(1, loss=1.0, lr=1e-3, tokens_per_sec=1.0, ms_per_iter=1.0)
    tracker.close()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.jsonl", "summary.json"]
    assert not (tmp_path / "wandb_dir").exists()


def test_environment_wins_and_only_rank0_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    (tmp_path / "wandb_dir").mkdir()
    cfg = load_config(None, [f"--out_dir={tmp_path / 'out'}", "--wandb.mode=disabled"])
    other_rank = make_tracker(cfg, enabled=False)
    assert other_rank.run is None and not (tmp_path / "out").exists()
    tracker = make_tracker(cfg)
    assert tracker.run is not None
    tracker.log_eval(0, train_loss=2.0, val_loss=2.5, val_ppl=12.2)
    tracker.close()
    _, history, _, _ = read_wandb_run(tmp_path / "wandb_dir")
    assert history[0]["eval/val_loss"] == 2.5
    assert not (tmp_path / "out" / "wandb").exists()


@pytest.mark.parametrize("failure", ["init raises", "not installed"])
def test_wandb_failing_to_start_does_not_stop_training(corpus_file, tmp_path, monkeypatch,
                                                       capsys, failure):
    monkeypatch.setenv("WANDB_MODE", "offline")
    if failure == "init raises":
        import wandb

        def broken_init(**kwargs):
            raise RuntimeError("cannot reach the server\nand a second line")

        monkeypatch.setattr(wandb, "init", broken_init)
    else:
        monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    train(load_config(None, tiny_overrides(tmp_path, corpus_file)))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "wandb did not start" in warnings[0], warnings
    assert "training goes on" in warnings[0]
    assert [r["step"] for r in read_metrics(tmp_path / "out") if "loss" in r] == list(range(1, 9))
    assert not (tmp_path / "out" / "wandb").exists()
