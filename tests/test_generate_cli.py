"""generate.py end to end on a tiny char-level checkpoint: in-process through run_cli (as the
console script runs it), and in a subprocess where the process itself matters (the entry point's
smoke test, the environment, a closed stdout)."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minilm.cli.common import run_cli
from minilm.cli.generate import build_parser, sampler_settings, stream_text
from minilm.cli.generate import main as generate_main
from minilm.interop.loading import load_model
from minilm.model.gpt import GPT, GPTConfig
from minilm.sampling.settings import SamplerSettings, knobs
from minilm.tokenizer import CharTokenizer

from hf_models import gpt2_bpe
from saved import save_model

ROOT = Path(__file__).resolve().parent.parent
CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TOKENIZER = CharTokenizer(CHARS)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=TOKENIZER.vocab_size, n_layer=2, n_head=2, n_embd=32,
                          block_size=16))
    save_model(out / "last", model, TOKENIZER.to_dict())
    return out


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_json_and_streamed_text_agree(ckpt, capsys):
    """The smoke test of the entry point: python generate.py in a subprocess."""
    common = ["--ckpt", str(ckpt), "--prompt", "ROMEO:", "--max_new_tokens", "24",
              "--num_samples", "2", "--seed", "3", "--top_k", "20"]
    done = run(*common, "--json", "--logprobs", "3")
    assert done.returncode == 0, done.stderr
    samples = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(samples) == 2
    for s in samples:
        n = len(s["tokens"])
        assert 1 <= n <= 24
        assert len(s["logprobs"]) == len(s["processed_logprobs"]) == len(s["top_logprobs"]) == n
        assert all(lp <= 0 for lp in s["logprobs"] + s["processed_logprobs"])
        for top in s["top_logprobs"]:
            assert len(top) == 3
            assert all(isinstance(i, int) and t == TOKENIZER.decode([i]) and lp <= 0
                       for i, t, lp in top)
            assert [lp for _, _, lp in top] == sorted((lp for _, _, lp in top), reverse=True)
        shown = s["tokens"][:-1] if s["finish_reason"] == "stop" else s["tokens"]
        assert s["text"] == TOKENIZER.decode(shown)
    # text mode (in-process) draws the samples one by one (seed, seed + 1) and streams them
    assert run_cli(generate_main, common) == 0
    out = capsys.readouterr().out
    assert out == "\n---------------\n".join("ROMEO:" + s["text"] for s in samples) + "\n"


def show(capsys, *args: str) -> list[str]:
    """generate.py --show_distribution's lines, in-process."""
    assert run_cli(generate_main, [*args, "--show_distribution"]) == 0, capsys.readouterr().err
    return capsys.readouterr().out.splitlines()


def test_show_distribution(ckpt, capsys):
    lines = show(capsys, "--ckpt", str(ckpt), "--prompt", "ROMEO:", "--repetition_penalty", "1.3",
                 "--temperature", "0.7", "--top_k", "3", "--logit_bias", '{"x": -100}')
    V = TOKENIZER.vocab_size
    assert lines[0].split() == ["stage", "kept", "entropy"]
    stages = [line.split("  ")[0].strip() for line in lines[1:6]]
    assert stages == ["raw (T = 1)", "logit_bias", "repetition_penalty", "temperature", "top_k"]
    assert [line.split()[-5:-2] for line in lines[1:6]] == \
        [[str(V), "of", str(V)]] + [[str(V - 1), "of", str(V)]] * 3 + [["3", "of", str(V)]]
    rows = lines[8:]
    assert len(rows) == 11  # the 10 most likely, then the banned 'x'
    assert sum("█" in row for row in rows) == 3  # the 3 tokens top-k keeps have bars
    assert rows[-1].split()[:2] == [str(TOKENIZER.encode("x")[0]), "'x'"]
    assert rows[-1].split()[-4:] == ["-"] * 4  # removed by the bias: no probability after it


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "{missing}"], "no checkpoint found"),
    (["--logit_bias", "{bad"], "--logit_bias is not valid JSON"),
    (["--logit_bias", "[1]"], "--logit_bias must be a JSON object"),
    (["--logit_bias", '{"ROMEO": 2}'], "--logit_bias key 'ROMEO' is 5 tokens"),
    (["--logit_bias", '{"5": -101}'], "--logit_bias value for '5' must be a number in [-100, 100]"),
    (["--temperature", "-1"], "temperature must be in [0.0, inf), got -1.0"),
    (["--temperature", "hot"], "argument --temperature: invalid float value: 'hot'"),
    (["--top_k", "-2"], "top_k must be an integer >= -1 (0 or less = off), got -2"),
    (["--top_h", "1.5"], "top_h must be in [0.0, 1.0], got 1.5"),
    (["--eta_cutoff", "1"], "eta_cutoff must be in [0.0, 1.0), got 1.0"),
    (["--xtc_probability", "2"], "xtc_probability must be in [0.0, 1.0], got 2.0"),
    (["--dry_base", "0.5"], "dry_base must be in [1.0, inf), got 0.5"),
    (["--dry_allowed_length", "0"], "dry_allowed_length must be an integer >= 1, got 0"),
    (["--dry_sequence_breakers", "[]"], "dry_sequence_breakers must be a non-empty list"),
    (["--dry_sequence_breakers", "x"], "argument --dry_sequence_breakers: not valid JSON"),
    (["--mirostat", "1"], "mirostat must be one of [0, 2]"),
    (["--order", "top_k,temp"], "unknown stage name(s) ['temp'] in order"),
    (["--order", "mirostat,temperature", "--mirostat", "2", "--top_k", "0"],
     "mirostat must come last in order"),
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "~"], "'~' is not in"),
])
def test_user_errors_exit_2_with_one_line(ckpt, tmp_path, capsys, args, message):
    """In-process (run_cli, as the console script): each mistake is one line naming it."""
    args = [a.replace("{missing}", str(tmp_path / "nope")) for a in args]
    assert run_cli(generate_main, ["--ckpt", str(ckpt), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, err


def test_a_bad_sampler_value_is_said_before_the_model_loads(tmp_path, capsys):
    for args, message in ((["--temperature", "-1"], "temperature must be"),
                          (["--logit_bias", "{bad"], "--logit_bias is not valid JSON")):
        assert run_cli(generate_main, ["--ckpt", str(tmp_path / "nowhere"), *args]) == 2
        assert message in capsys.readouterr().err


def test_sampler_flags_are_the_settings_knobs(capsys):
    """One flag per SamplerSettings knob, with its help; defaults are the knobs' no-op values
    except nanoGPT's temperature 0.8 and top-k 200 (their cli_default)."""
    help_text = build_parser().format_help()
    for k in knobs():
        assert f"--{k.name}" in help_text
    args = build_parser().parse_args(["--ckpt", "x"])
    assert sampler_settings(args) == SamplerSettings(temperature=0.8, top_k=200)
    args = build_parser().parse_args([
        "--ckpt", "x", "--dry_multiplier", "0.8", "--dry_sequence_breakers", '["\\n", "User:"]',
        "--order", "logit_bias,top_k, temperature,dry", "--negative_prompt", "Once", "--mirostat", "0",
        "--top_k", "-1", "--logit_bias", '{"id:3": -100}'])
    s = sampler_settings(args, TOKENIZER.encode)
    assert s.dry_sequence_breakers == ("\n", "User:") and s.order == ("logit_bias", "top_k", "temperature", "dry")
    assert s.negative_prompt == "Once" and s.logit_bias == {3: float("-inf")}
    assert s.pipeline() == ["logit_bias", "temperature", "dry"]


@pytest.mark.parametrize("n", [21, 100000])
def test_logprobs_is_bounded_as_the_api_bounds_it(ckpt, capsys, n):
    """--logprobs N lists N tokens per position: past the server's (and OpenAI's) 20 it would
    dump most of the vocabulary per token."""
    assert run_cli(generate_main, ["--ckpt", str(ckpt), "--json", "--logprobs", str(n)]) == 2
    assert capsys.readouterr().err == f"error: --logprobs must be in [0, 20], got {n}\n"


def test_logit_bias_can_name_a_digit_by_its_text(tmp_path, capsys):
    """A char model with digits: "5" is token id 5 (OpenAI's keys), "text:5" the character 5."""
    digits = CharTokenizer("\n 0123456789abc")
    model = GPT(GPTConfig(vocab_size=digits.vocab_size, n_layer=1, n_head=1, n_embd=8,
                          block_size=8))
    save_model(tmp_path / "last", model, digits.to_dict())
    five = digits.encode("5")[0]
    assert five != 5
    lines = show(capsys, "--ckpt", str(tmp_path), "--prompt", "a", "--top_k", "0",
                 "--temperature", "1", "--logit_bias", '{"text:5": -100, "id:5": 100}')
    rows = {int(line.split()[0]): line.split() for line in lines if line.strip()[:1].isdigit()}
    assert rows[five][-1] == "-"  # banned by the logit_bias stage
    assert rows[5][-2] == "1.000"  # +100: all the probability after it (and its bar)


def test_stream_text_holds_back_partial_utf8():
    bpe = gpt2_bpe()
    byte_tokens = [bpe.enc.encode_single_token(bytes([b])) for b in "é€!".encode()]  # 6 bytes
    steps = [SimpleNamespace(tokens=torch.tensor([t]), finish_reasons=[None]) for t in byte_tokens]
    steps[-1].finish_reasons = ["length"]
    out = io.StringIO()
    stream_text(steps, bpe, out)
    assert out.getvalue() == "é€!\n"  # nothing written twice, no U+FFFD for half a character


@pytest.mark.parametrize("device, message", [
    ("xpu", "--device: invalid choice 'xpu' (allowed: auto, cpu, cuda, cuda:N, mps)"),
    ("meta", "--device: invalid choice 'meta'"),
    ("cuda:99", "--device: 'cuda:99' requested but"),
])
def test_device_is_checked_like_train_device(ckpt, capsys, device, message):
    assert run_cli(generate_main, ["--ckpt", str(ckpt), "--device", device]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_prompt_file_not_utf8(ckpt, tmp_path, capsys):
    path = tmp_path / "prompt.txt"
    path.write_bytes("ROMEO:\nO, wilt thou leave me so unsatisfied? Caf".encode() + b"\xe9")
    assert run_cli(generate_main, ["--ckpt", str(ckpt), "--prompt_file", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --prompt_file {path} is not UTF-8 text "
                                               "(byte 0xe9 at offset 48: unexpected end of data)")


@pytest.mark.slow
def test_missing_tiktoken_cache_is_named(tmp_path):
    """A GPT-2 BPE checkpoint sampled offline without the tiktoken cache: say what is missing,
    not that the checkpoint is corrupt."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, n_layer=1, n_head=1, n_embd=8, block_size=8))
    save_model(tmp_path / "last", model, {"type": "tiktoken", "name": "gpt2"})
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(empty), HTTPS_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9")  # no download, whatever the network
    done = subprocess.run([sys.executable, "generate.py", "--ckpt", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "corrupt" not in done.stderr
    assert (f"tiktoken encoding 'gpt2' is not available: it is not in the local cache "
            f"(TIKTOKEN_CACHE_DIR={empty} does not hold it)") in done.stderr


@pytest.mark.slow
def test_a_closed_stdout_ends_quietly(ckpt):
    """generate.py | head: no traceback, no error, exit 0, as Unix filters end."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    no_eot = json.dumps({str(TOKENIZER.eot_token): -100})  # a long stream, written after head
    proc = subprocess.Popen([sys.executable, "generate.py", "--ckpt", str(ckpt), "--prompt",
                             "ROMEO:", "--max_new_tokens", "100000", "--logit_bias", no_eot],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10)  # head -c 10
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""


def test_show_distribution_shows_every_new_stage(ckpt, capsys):
    """--show_distribution has a row per stage in use, in order; top-nσ keeps what its formula
    keeps (on the model's own logits at T = 0.8)."""
    lines = show(capsys, "--ckpt", str(ckpt), "--prompt", "ROMEO:", "--top_k", "0",
                 "--dry_multiplier", "0.8", "--top_n_sigma", "1.0", "--top_h", "0.9",
                 "--epsilon_cutoff", "0.01", "--eta_cutoff", "0.01", "--xtc_probability", "1",
                 "--xtc_threshold", "0.05", "--mirostat", "2", "--mirostat_tau", "2")
    names = ["raw (T = 1)", "dry", "temperature", "top_n_sigma", "top_h", "epsilon_cutoff",
             "eta_cutoff", "xtc", "mirostat"]
    rows = lines[1:1 + len(names)]
    assert [row.split("  ")[0].strip() for row in rows] == names
    kept_counts = [int(row.split()[-5]) for row in rows]
    assert kept_counts[3:] == sorted(kept_counts[3:], reverse=True) and kept_counts[-1] >= 1
    model, _, _ = load_model(str(ckpt))
    with torch.no_grad():
        z = model(torch.tensor([TOKENIZER.encode("ROMEO:")]))[0, -1].double() / 0.8
    assert kept_counts[3] == int((z >= z.max() - z.std(unbiased=False)).sum())  # DRY: no repeat yet


def test_generation_with_the_new_stages_is_reproducible(ckpt, capsys):
    args = ["--ckpt", str(ckpt), "--prompt", "ROMEO:", "--max_new_tokens", "20", "--json",
            "--num_samples", "2", "--dry_multiplier", "0.8", "--xtc_probability", "0.5",
            "--mirostat", "2", "--top_n_sigma", "2", "--seed", "5"]
    outs = []
    for _ in range(2):
        assert run_cli(generate_main, args) == 0
        outs.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert outs[0] == outs[1] and len(outs[0]) == 2
    assert all(lp <= 0 for s in outs[0] for lp in s["processed_logprobs"])
