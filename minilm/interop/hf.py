"""GPT-2 <-> Hugging Face transformers: the one place that knows GPT2LMHeadModel's layout.

minilm's parameter names are GPT-2's (model.py), so a tensor keeps its name and only these differ:
- HF's Conv1D stores the four block matrices [in, out]; nn.Linear holds [out, in]: transposed;
- GPT2Model checkpoints (openai-community/gpt2 itself) drop the `transformer.` prefix, and old ones
  carry causal-mask buffers (`h.N.attn.bias`, `h.N.attn.masked_bias`): prefix restored, buffers
  dropped;
- a tied head is stored once, as transformer.wte.weight (as save_pretrained writes it);
- minilm's `bias: false` has no bias tensors: exported as zeros, which computes the same.
Config fields are mapped one by one; a field minilm cannot compute exactly is refused in one line
naming it, never approximated. Loading a hub id downloads only the files read here.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from minilm.checkpoint import checkpoint_versions, resolve_checkpoint
from minilm.errors import CheckpointError, TokenizerExportError, error_line
from minilm.files import check_folder, swap_in
from minilm.interop.hf_tokenizer import (
    GPT2_VOCAB_SIZE,
    TOKENIZER_FILES,
    tokenizer_from_folder,
    write_tokenizer_files,
)
from minilm.model.gpt import GPT, GPTConfig
from minilm.tokenizer import Tokenizer

# GPT2Config's defaults: old configs (openai-community/gpt2's own) leave most fields out.
HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=GPT2_VOCAB_SIZE, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
    activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, add_cross_attention=False,
    tie_word_embeddings=True)
# HF activations computing minilm's F.gelu(x, approximate="tanh"): the same formula, written out
# (gelu_new, GPT-2's own), or the same kernel (gelu_pytorch_tanh); they differ only in rounding.
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast", "gelu_accurate")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # in order of preference
HUB_TIMEOUT = 10.0  # seconds for the hub's first answer; offline is then detected at once
RUN_CHECKPOINTS = ("best", "last")  # the checkpoint folders of a run's out_dir


# ---------------------------------------------------------------- config


def gpt_config_from_hf(hf: dict[str, Any], where: str) -> GPTConfig:
    """minilm's GPTConfig for a GPT2Config dict; CheckpointError naming the first field that minilm
    cannot compute exactly. reorder_and_upcast_attn is accepted: it only moves the 1/sqrt(d) scale
    before the q·k product and upcasts it under mixed precision (the same function; HF's default
    SDPA attention ignores it)."""
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(f"{where} is not a GPT-2 model (model_type "
                              f"{hf.get('model_type')!r}); minilm reads GPT-2 checkpoints only")
    c = {**HF_DEFAULTS, **hf}
    rules = (
        ("activation_function", c["activation_function"] in GELU_TANH,
         "minilm's MLP computes the tanh GELU, gelu_new"),
        ("n_inner", c["n_inner"] in (None, 4 * c["n_embd"]), "minilm's MLP is 4 * n_embd wide"),
        ("scale_attn_weights", c["scale_attn_weights"] is True,
         "minilm scales attention scores by 1/sqrt(head_dim)"),
        ("scale_attn_by_inverse_layer_idx", c["scale_attn_by_inverse_layer_idx"] is False,
         "minilm has no per-layer attention scaling"),
        ("add_cross_attention", c["add_cross_attention"] is False, "minilm is decoder-only"),
    )
    for field, ok, why in rules:
        if not ok:
            raise CheckpointError(f"{where}: {field}={c[field]!r} cannot be represented exactly by "
                                  f"minilm ({why})")
    try:
        return GPTConfig(vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                         n_embd=c["n_embd"], block_size=c["n_positions"], dropout=0.0, bias=True,
                         tie_embeddings=bool(c["tie_word_embeddings"]), lm_head_bias=False,
                         layer_norm_eps=c["layer_norm_epsilon"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: unusable config.json ({e})") from None


def hf_config(config: GPTConfig, eot: int) -> dict[str, Any]:
    """config.json of a GPT2LMHeadModel computing what a minilm model with `config` computes."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size,
        "n_ctx": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
        "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps, "initializer_range": 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False,
        "tie_word_embeddings": config.tie_embeddings, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "float32",
    }


# ---------------------------------------------------------------- weights


def _conv1d_layout(name: str, t: torch.Tensor) -> torch.Tensor:
    """Conv1D's [in, out] <-> nn.Linear's [out, in] for the four block matrices (a transpose, its
    own inverse: both directions use it); any other tensor as it is."""
    return t.t() if name.endswith(CONV1D) else t


def _meta_state_dict(config: GPTConfig) -> dict[str, torch.Tensor]:
    """Names and shapes of a model's tensors, without allocating them."""
    with torch.device("meta"):
        return GPT(config).state_dict()


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's tensors for a minilm model; CheckpointError for what GPT-2 cannot hold."""
    if model.config.lm_head_bias:
        raise CheckpointError("model.lm_head_bias=true: GPT-2's LM head has no bias, so "
                              "GPT2LMHeadModel cannot hold this model")
    if model.config.logit_softcap is not None:
        raise CheckpointError(f"model.logit_softcap={model.config.logit_softcap}: the model "
                              "soft-caps its logits (cap * tanh(z / cap)), which GPT2LMHeadModel "
                              "cannot express")
    own = model.state_dict()
    dtype = model.transformer.wte.weight.dtype
    tensors = {}
    for name, meta in _meta_state_dict(replace(model.config, bias=True)).items():
        t = own.get(name)
        # bias: false has no bias tensors; zeros compute the same
        t = torch.zeros(meta.shape, dtype=dtype) if t is None else t.detach().cpu()
        tensors[name] = _conv1d_layout(name, t).contiguous()
    return tensors


def minilm_state_dict(weights: dict[str, torch.Tensor], config: GPTConfig,
                      where: str) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel/GPT2Model checkpoint's tensors under minilm's names and layout (fp32)."""
    out = {}
    for name, t in weights.items():
        if MASK_BUFFER.search(name):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # a GPT2Model checkpoint
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # tied: HF uses wte whatever was stored here
        out[name] = _conv1d_layout(name, t).float().contiguous()
    expected = _meta_state_dict(config)
    missing = sorted(expected.keys() - out.keys())
    unexpected = sorted(out.keys() - expected.keys())
    if missing:
        raise CheckpointError(f"{where}: the weights lack {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]!r} (not part of "
                              "GPT2LMHeadModel)")
    for name, meta in expected.items():
        if out[name].shape != meta.shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(out[name].shape)} but the "
                                  f"config implies {tuple(meta.shape)}")
    return out


def _shards(index: Path) -> list[str]:
    """The shard files a sharded checkpoint's *.index.json names."""
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_weights(folder: Path, where: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: model.safetensors, else pytorch_model.bin (either sharded)."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".index.json"):
                return {k: v for shard in _shards(path)
                        for k, v in _read_tensors(folder / shard).items()}
            return _read_tensors(path)
        except Exception as e:  # safetensors, pickle and json raise their own error types
            raise CheckpointError(f"{where}: {name} is unreadable ({error_line(e)})") from None
    raise CheckpointError(f"{where}: no model.safetensors or pytorch_model.bin in {folder}")


def read_config(path: Path, where: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: config.json is unreadable ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: config.json is not a JSON object")
    return config


# ---------------------------------------------------------------- import


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def load_folder(folder: Path) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """Model (eval mode, CPU, fp32), tokenizer and state of a local Hugging Face GPT-2 folder."""
    return _load(folder, read_config(folder / "config.json", str(folder)), str(folder))


def _load(folder: Path, hf: dict[str, Any], where: str) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """load_folder's work once config.json is read (`hf`); `where` names the source in messages."""
    config = gpt_config_from_hf(hf, where)
    try:
        tokenizer = tokenizer_from_folder(folder, config.vocab_size)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    weights = minilm_state_dict(read_weights(folder, where), config, where)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(weights, assign=True)  # the loaded tensors become the parameters
    state = dict(source=where, format="huggingface", path=str(folder), hf_config=hf,
                 model_config=asdict(config), tokenizer=tokenizer.to_dict())
    return model.eval(), tokenizer, state


def _hub_error(repo_id: str, e: Exception) -> CheckpointError:
    """One line for a huggingface_hub failure."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(e, GatedRepoError):
        return CheckpointError(f"{repo_id!r} is gated on the Hugging Face hub: accept its terms at "
                               f"https://huggingface.co/{repo_id} and log in (HF_TOKEN or "
                               "`hf auth login`)")
    if isinstance(e, RepositoryNotFoundError):
        return CheckpointError(f"{repo_id!r} is neither a local path nor a model on the Hugging Face "
                               "hub (misspelt, or private: log in with HF_TOKEN or `hf auth login`)")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        return CheckpointError(f"the Hugging Face hub refused {repo_id!r} "
                               f"(HTTP {e.response.status_code})")
    return CheckpointError(f"could not download {repo_id!r} from the Hugging Face hub "
                           f"({error_line(e)})")


def download(repo_id: str) -> tuple[Path, dict[str, Any]]:
    """Fetch what load_folder reads (from the local cache when offline); the folder and its
    config.json. config.json comes first, so a model minilm cannot represent is refused before any
    weights come; then one weights format (safetensors preferred) and one tokenizer file."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    offline = None  # why only the local cache can be used
    try:
        info = HfApi().model_info(repo_id, timeout=HUB_TIMEOUT)
        files = {s.rfilename for s in info.siblings or []}
    except (HfHubHTTPError, HFValidationError) as e:
        raise _hub_error(repo_id, e) from None
    except Exception as e:  # offline mode, no network, a timeout: try the local cache
        files = None
        offline = ("HF_HUB_OFFLINE is set" if isinstance(e, OfflineModeIsEnabled)
                   else f"the hub cannot be reached: {type(e).__name__}")

    def fetch(name: str) -> Path | None:
        """The file, or None when the repo (online) or the cache (offline) does not have it."""
        if files is not None and name not in files:
            return None
        try:
            return Path(hf_hub_download(repo_id, name, local_files_only=files is None))
        except LocalEntryNotFoundError:
            if files is None:
                return None
            raise

    def missing(what: str) -> CheckpointError:
        if offline:
            return CheckpointError(f"{repo_id!r} is not a local path, and its {what} is not in the "
                                   f"local Hugging Face cache ({offline})")
        return CheckpointError(f"the Hugging Face hub model {repo_id!r} has no {what}")

    try:
        config = fetch("config.json")
        if config is None:
            raise missing("config.json")
        hf = read_config(config, repo_id)
        gpt_config_from_hf(hf, repo_id)
        for name in WEIGHT_FILES:
            weights = fetch(name)
            if weights is not None:
                if name.endswith(".index.json"):
                    if not all(fetch(shard) for shard in _shards(weights)):
                        raise missing("weights shards")
                break
        else:
            raise missing("weights (model.safetensors or pytorch_model.bin)")
        for name in TOKENIZER_FILES:  # optional: without one, the vocabulary size decides
            if fetch(name) is not None:
                break
    except CheckpointError:
        raise
    except Exception as e:
        raise _hub_error(repo_id, e) from None
    return config.parent, hf


def load_hub_model(repo_id: str) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    folder, hf = download(repo_id)
    return _load(folder, hf, repo_id)


# ---------------------------------------------------------------- export


def check_destination(dest: Path, force: bool, source: str | Path | None = None) -> None:
    """dest can become the export: neither it nor a parent is a file (the check out_dir gets), a
    folder can be made there, it is empty unless force, and it keeps clear of the local `source`'s
    checkpoint folders (see _check_clear_of). Cheap: run before a model is loaded."""
    check_folder("dest", str(dest))
    if source is not None:
        _check_clear_of(dest, source)
    _check_creatable(dest)
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise CheckpointError(f"{dest} exists and is not empty (use --force to replace it)")


def _source_folders(source: str | Path) -> list[Path]:
    """The local folders of the model at `source`, as load_model finds it: an HF folder; or the
    checkpoint it resolves to and, for a run's best/ or last/, every checkpoint of that run; each
    with the <name>.tmp and <name>.old a save swaps through. [] when nothing is local (a hub id)."""
    path = Path(source).expanduser()
    if is_hf_folder(path) and not (path / "state.json").is_file():
        return [path]
    try:
        found = resolve_checkpoint(path)
    except CheckpointError:
        return []  # load_model says what is wrong with it
    checkpoint = found.with_name(found.name.removesuffix(".tmp").removesuffix(".old"))
    if checkpoint.name in RUN_CHECKPOINTS:
        return [v for name in RUN_CHECKPOINTS
                for v in checkpoint_versions(checkpoint.parent / name)]
    return list(checkpoint_versions(checkpoint))


def _check_clear_of(dest: Path, source: str | Path) -> None:
    """Refuse a dest that is, holds or lies inside one of the source's folders (real paths, so
    that links and `..` do not hide it): --force would delete that folder with the export's swap,
    or the next save of the checkpoint would delete the export with it."""
    target = dest.resolve()
    for folder in map(Path.resolve, _source_folders(source)):
        if target == folder or target in folder.parents:
            relation, why = "is" if target == folder else "holds", "--force would delete it"
        elif folder in target.parents:
            relation, why = "is inside", "its next save would delete the export"
        else:
            continue
        raise CheckpointError(f"{dest} {relation} {folder}, a checkpoint of the model being "
                              f"exported ({why}): choose another folder")


def _check_creatable(dest: Path) -> None:
    """Make (and remove) a folder in dest's nearest existing parent, where export stages its files:
    no permission, a read-only or virtual file system (/proc) fail here in one line."""
    parent = next((p for p in dest.absolute().parents if p.exists()), dest)  # dest "/": itself
    try:
        Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=parent)).rmdir()
    except OSError as e:
        raise CheckpointError(f"cannot write {dest}: {parent} takes no new folder "
                              f"({e.strerror or type(e).__name__})") from None


@contextlib.contextmanager
def _staging_folder(dest: Path) -> Iterator[Path]:
    """An empty temporary folder beside dest (its missing parents made), to fill and swap in. On an
    error it is removed with the parents made for it; an OSError becomes one line naming dest."""
    made = [p for p in dest.absolute().parents if not p.exists()]  # innermost first
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        yield tmp
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write {dest}: {e.strerror or error_line(e)}") from None
        raise


def export(model: GPT, tokenizer: Tokenizer, dest: str | Path, force: bool = False) -> list[str]:
    """Write `dest`, a folder transformers loads with AutoModelForCausalLM / AutoTokenizer: config,
    weights, generation config and tokenizer files, built in a temporary folder and renamed into
    place. Returns warnings (a tokenizer that could not be exported: the model goes alone)."""
    dest = Path(dest)
    check_destination(dest, force)
    tensors = hf_state_dict(model)  # refuses what GPT-2 cannot hold, before anything is written
    eot = tokenizer.eot_token
    warnings = []
    with _staging_folder(dest) as tmp:
        from safetensors.torch import save_file

        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(model.config, eot), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": eot, "eos_token_id": eot}, indent=2))
        try:
            write_tokenizer_files(tokenizer, tmp, model.config.block_size)
        except TokenizerExportError as e:
            warnings.append(f"{e}; exported the model alone")
        swap_in(tmp, dest)
    return warnings


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create (or reuse) a model repo and upload the exported folder; returns the repo's URL."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload minilm model exported as GPT-2")
    except Exception as e:
        raise CheckpointError(f"could not push {folder} to the Hugging Face hub repo {repo_id!r} "
                              f"({error_line(e)}); the exported folder is kept") from None
    return str(url)
