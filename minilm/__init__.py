"""minilm: a from-scratch mini GPT for experimenting with logits, softmax, temperature and sampling.

The public API, what a notebook needs (deeper module paths are free to move):

    from minilm import GPT, GPTConfig, load_model, complete, SamplerSettings, SamplerStack
    model, tokenizer, _ = load_model("out/shakespeare_char")        # or "gpt2", an HF folder
    stack = SamplerStack.from_settings(SamplerSettings(temperature=0.8, top_k=50))
    out = complete(model, [tokenizer.encode("ROMEO:")], 100, sampler=stack, seed=1)
    print(tokenizer.decode(out[0].tokens))

Packages, bottom to top (a package never imports one above it): model/ (GPT, the fused loss),
sampling/ (settings, stages, the stack, generation, the lens), interop/ (Hugging Face, load_model),
train/ (config, data, trainer, DDP/FSDP), evaluation/ (the scorer, calibration), serving/ (the
server), experiments/ (ablations), cli/ (the command lines); eval.py, serve.py and the other
`python -m minilm.X` entry points call cli/.
"""

from minilm.errors import MinilmError
from minilm.evaluation.corpus import Document, evaluate
from minilm.evaluation.run import evaluate_checkpoint
from minilm.evaluation.scoring import score, score_tokens
from minilm.interop.hf import export
from minilm.interop.loading import load_model
from minilm.model.gpt import GPT, GPTConfig, KVCache
from minilm.model.loss import linear_cross_entropy
from minilm.sampling.batch import RunningBatch
from minilm.sampling.generation import complete, generate, next_token_table
from minilm.sampling.history import History
from minilm.sampling.lens import logit_lens
from minilm.sampling.request import Request
from minilm.sampling.settings import SamplerSettings
from minilm.sampling.stack import SamplerStack
from minilm.tokenizer import CharTokenizer, TiktokenTokenizer
from minilm.train.config import Config, load_config
from minilm.train.trainer import train

__version__ = "0.1.0"

__all__ = [
    "GPT", "GPTConfig", "KVCache", "linear_cross_entropy",
    "SamplerSettings", "SamplerStack", "History", "generate", "complete", "next_token_table",
    "Request", "RunningBatch", "logit_lens",
    "load_model", "export", "CharTokenizer", "TiktokenTokenizer",
    "Config", "load_config", "train",
    "Document", "evaluate", "evaluate_checkpoint", "score", "score_tokens",
    "MinilmError",
]
