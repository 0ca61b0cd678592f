"""Hub ids through the real huggingface_hub code, against a local stand-in for the hub's HTTP API
(model info + file resolve, with the hub's error headers): only the needed files are downloaded,
the cache serves offline runs, and every failure is one line with exit code 2."""

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest.importorskip("transformers")

from conftest import ROOT  # noqa: E402
from hf_models import hf_gpt2  # noqa: E402

SHA = "0123456789abcdef0123456789abcdef01234567"
CASES = """
import contextlib, io, json, sys
from minilm.cli.common import run_cli
from minilm.cli.generate import main
for source in sys.argv[1:]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(main, ["--ckpt", source, "--temperature", "0", "--max_new_tokens", "6",
                              "--prompt", "Hello", "--json"])
    print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue()}))
"""


class FakeHub:
    """repo id -> {file name: bytes}; `gated` repos list their files but refuse to serve them."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated: set[str] = frozenset()):
        self.repos, self.gated, self.requests = repos, gated, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                path = urlsplit(self.path).path
                hub.requests.append(path)
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"]:
                    repo = "/".join(parts[2:4])
                    if repo not in hub.repos:
                        return self.error(404, "RepoNotFound", "Repository not found")
                    info = {"id": repo, "modelId": repo, "sha": SHA, "private": False,
                            "gated": "manual" if repo in hub.gated else False,
                            "siblings": [{"rfilename": f} for f in hub.repos[repo]]}
                    return self.send(json.dumps(info).encode(), body, "application/json")
                repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                if repo not in hub.repos:
                    return self.error(404, "RepoNotFound", "Repository not found")
                if repo in hub.gated:
                    return self.error(403, "GatedRepo", "Access to this model is restricted")
                if parts[2] != "resolve" or name not in hub.repos[repo]:
                    return self.error(404, "EntryNotFound", "Entry not found")
                self.send(hub.repos[repo][name], body, "application/octet-stream")

            def send(self, data: bytes, body: bool, kind: str):
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", SHA)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def error(self, status: int, code: str, message: str):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def run_cases(sources: list[str], endpoint: str, hf_home: Path, offline: bool) -> list[dict]:
    """generate.py's main on each source, in one fresh process whose huggingface_hub reads this
    endpoint and offline setting at import."""
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="1" if offline else "0",
               HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CASES, *sources], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    import transformers

    tiny = tmp_path_factory.mktemp("tiny")
    hf_gpt2(tiny, n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50257)
    files = {p.name: p.read_bytes() for p in tiny.iterdir()}
    files["pytorch_model.bin"] = b"not needed: safetensors is preferred"
    files["flax_model.msgpack"] = b"not needed either"
    llama = tmp_path_factory.mktemp("llama")
    transformers.LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                             intermediate_size=32).save_pretrained(llama)
    repos = {"someone/tiny-gpt2": files, "meta/llama-ish": {
        "config.json": (llama / "config.json").read_bytes(), "model.safetensors": b"weights"},
        "someone/gated-gpt2": files}
    server = FakeHub(repos, gated={"someone/gated-gpt2"})
    yield server, tiny
    server.close()


@pytest.mark.slow  # a subprocess against a local hub
def test_hub_ids_download_only_what_is_needed_and_fail_in_one_line(hub, tmp_path):
    server, tiny = hub
    home = tmp_path / "home"
    ok, unknown, gated, llama = run_cases(
        ["someone/tiny-gpt2", "someone/nothing", "someone/gated-gpt2", "meta/llama-ish"],
        server.url, home, offline=False)
    assert ok["code"] == 0, ok["err"]
    downloaded = {p.rsplit("/", 1)[1] for p in server.requests if "/resolve/" in p
                  and p.startswith("/someone/tiny-gpt2/")}
    assert downloaded == {"config.json", "model.safetensors"}  # not the .bin, not flax
    assert not any(p.startswith("/meta/llama-ish/resolve/main/model") for p in server.requests)
    for case, message in [
        (unknown, "error: 'someone/nothing' is neither a local path nor a model on the Hugging Face "
                  "hub (misspelt, or private: log in with HF_TOKEN or `hf auth login`)\n"),
        (gated, "error: 'someone/gated-gpt2' is gated on the Hugging Face hub: accept its terms at "
                "https://huggingface.co/someone/gated-gpt2 and log in (HF_TOKEN or `hf auth "
                "login`)\n"),
        (llama, "error: meta/llama-ish is not a GPT-2 model (model_type 'llama'); minilm reads "
                "GPT-2 checkpoints only\n"),
    ]:
        assert (case["code"], case["err"]) == (2, message)

    # offline: the cache serves the downloaded model (the hub is not asked), which generates what
    # the original folder generates; a model never downloaded is one line
    server.requests.clear()
    cached, local, missing = run_cases(["someone/tiny-gpt2", str(tiny), "openai-community/gpt2"],
                                       server.url, home, offline=True)
    assert server.requests == []
    assert cached["code"] == local["code"] == 0 and cached["out"] == local["out"] == ok["out"]
    assert json.loads(local["out"])["tokens"]
    assert (missing["code"], missing["err"]) == (
        2, "error: 'openai-community/gpt2' is not a local path, and its config.json is not in the "
           "local Hugging Face cache (HF_HUB_OFFLINE is set)\n")

    # no network (a closed port), HF_HUB_OFFLINE unset: no retry loop, one line
    closed = FakeHub({})
    url = closed.url
    closed.close()
    unreachable, = run_cases(["openai-community/gpt2"], url, tmp_path / "other", offline=False)
    assert unreachable["code"] == 2
    assert unreachable["err"].startswith("error: 'openai-community/gpt2' is not a local path, and "
                                         "its config.json is not in the local Hugging Face cache "
                                         "(the hub cannot be reached: ")
    assert unreachable["err"].count("\n") == 1
