"""Readings of one position's next-token distribution: through depth (the logit lens) and through
temperature (the sweep).

The logit lens (nostalgebraist, 2020) is what the model would predict if it stopped early. The
residual stream after the embeddings and after each block, read through the model's own
output function (the final layer norm, then the LM head, softcap included), gives n_layer + 1
next-token distributions for one position; the last is the model's own. Where the model's final
choice climbs to rank 1 shows where, in depth, the prediction forms.

    lens = logit_lens(model, ids)                  # the token after the last one of ids
    for layer in lens.layers:                      # embeddings, block 1, ..., block n_layer
        layer.name, layer.entropy, layer.rank, layer.top   # top: [(token id, log-prob), ...]

One forward pass of the prompt collects the whole stream (forward hooks on the embedding's dropout
and on each block), and only the n_layer + 1 vectors of the one position go through the head.

    entropy, top_prob = temperature_sweep(next_token_logits(model, ids), SWEEP_TEMPERATURES)

The sweep is softmax(z / T) of the raw logits z for each T, in float64: how temperature alone
spreads or sharpens the distribution (its entropy, in nats, and the top token's probability).

Like generation, the model reads at most block_size tokens: the window ending at the position.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from minilm.errors import SettingError
from minilm.model.gpt import GPT
from minilm.sampling.request import prompt_lists

SWEEP_TEMPERATURES = tuple(round(0.1 + 0.05 * i, 2) for i in range(39))  # 0.1, 0.15, ..., 2.0


@dataclass
class LensLayer:
    """One reading of the lens: the distribution after `name` ("embeddings", "block i")."""
    name: str
    top: list[tuple[int, float]]  # (token id, log-prob), most likely first
    entropy: float                # nats
    rank: int                     # of the model's final choice here: 1 + tokens with a higher logit
    choice_logprob: float         # the final choice's log-prob here


@dataclass
class LogitLens:
    """The lens at `position` of `prompt_ids`: layers[0] reads the embeddings, layers[i] the
    stream after block i, layers[-1] is the model's own next-token distribution. The model reads
    the window `start`..`position` (start > 0 only for a position past block_size)."""
    prompt_ids: list[int]
    position: int  # index into prompt_ids, >= 0
    start: int     # the first token of the window the model reads
    choice: int    # the model's top token (the last layer's)
    layers: list[LensLayer]

    def to_dict(self, token_text: Callable[[int], str]) -> dict[str, Any]:
        """The JSON form (`minilm-lens --json`, POST /v1/lens); tokens shown by `token_text`."""
        def token(i: int) -> dict[str, Any]:
            return dict(id=i, token=token_text(i))

        return dict(
            prompt_token_ids=self.prompt_ids, position=self.position, window_start=self.start,
            token=token(self.prompt_ids[self.position]), choice=token(self.choice),
            layers=[dict(layer=i, name=layer.name, entropy=layer.entropy, rank=layer.rank,
                         choice_logprob=layer.choice_logprob,
                         top=[dict(token(t), logprob=lp) for t, lp in layer.top])
                    for i, layer in enumerate(self.layers)])


def logit_lens(model: GPT, ids: Sequence[int], position: int = -1, top_n: int = 10) -> LogitLens:
    """The logit lens of `model` at `position` of the token ids `ids` (Python indexing: -1 is the
    last token), with the `top_n` most likely tokens of each layer (at most the vocabulary).

    A bad position or top_n is a SettingError naming it."""
    ids, position, start = read_window(model, ids, position)
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise SettingError("top_n", f"top_n must be a positive integer, got {top_n!r}")
    with model.inference():
        stream = residual_stream(model, ids[start:position + 1])  # [n_layer + 1, d]
        logits = model.logits_from_hidden(model.transformer.ln_f(stream))  # [n_layer + 1, V]
    names = ["embeddings"] + [f"block {i}" for i in range(1, len(logits))]
    choice = int(logits[-1].argmax())
    return LogitLens(prompt_ids=ids, position=position, start=start, choice=choice,
                     layers=read_layers(names, logits, choice, top_n))


def next_token_logits(model: GPT, ids: Sequence[int], position: int = -1) -> Tensor:
    """The model's raw logits [V] for the token after `position` of `ids` (the lens's last layer)."""
    ids, position, start = read_window(model, ids, position)
    device = next(model.parameters()).device
    with model.inference():
        return model.logits(torch.tensor([ids[start:position + 1]], device=device))[0, -1]


def temperature_sweep(logits: Tensor, temperatures: Sequence[float]
                      ) -> tuple[list[float], list[float]]:
    """The entropy (nats) and the top token's probability of softmax(logits / T) for each T
    of `temperatures`, from raw logits [V], in float64. A bad temperature is a SettingError."""
    bad = [t for t in temperatures if isinstance(t, bool) or not 0.01 <= t <= 100]
    if bad or not temperatures:
        raise SettingError("temperatures", "temperatures must be a non-empty list of numbers in "
                                           f"[0.01, 100], got {bad[0] if bad else []!r}")
    t = torch.tensor(temperatures, dtype=torch.float64)[:, None]  # [n, 1]
    logp = torch.log_softmax(logits.double()[None] / t, dim=-1)  # [n, V]
    entropy = -(logp.exp() * logp).nan_to_num().sum(dim=-1)
    return entropy.tolist(), logp.amax(dim=-1).exp().tolist()


def read_window(model: GPT, ids: Sequence[int], position: int) -> tuple[list[int], int, int]:
    """The checked token ids, `position` as an index >= 0, and the first token of the window the
    model reads to predict the token after it (generation's rule: at most block_size tokens)."""
    if not len(ids):
        raise SettingError("prompt", "the prompt is empty: there must be at least one token to read")
    (ids,) = prompt_lists([list(ids)], model.config.vocab_size)  # (ids outside the vocabulary)
    position = check_position(position, len(ids))
    return ids, position, max(0, position + 1 - model.config.block_size)


def check_position(position: int, length: int) -> int:
    """`position` as an index >= 0 into a prompt of `length` tokens (negative counts from the end)."""
    if isinstance(position, bool) or not isinstance(position, int) \
            or not -length <= position < length:
        raise SettingError("position", f"position must be in [{-length}, {length - 1}] for a "
                                       f"prompt of {length} tokens, got {position!r}")
    return position % length


def residual_stream(model: GPT, ids: list[int]) -> Tensor:
    """The residual stream at the last of `ids`: after the embeddings and after each block,
    [n_layer + 1, d], from one forward pass."""
    device = next(model.parameters()).device
    with _recording_outputs([model.transformer.drop, *model.transformer.h]) as outputs:
        model.hidden_states(torch.tensor([ids], device=device))
    return torch.stack([x[0, -1] for x in outputs])


@contextlib.contextmanager
def _recording_outputs(modules: Sequence[torch.nn.Module]) -> Iterator[list[Tensor]]:
    """A list that collects each module's output, in call order, during the block."""
    outputs: list[Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _args, out: outputs.append(out))
               for m in modules]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def read_layers(names: list[str], logits: Tensor, choice: int, top_n: int) -> list[LensLayer]:
    """Each layer's reading from its logits [n_layer + 1, V] (softmax in float64)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    top = logp.topk(min(top_n, logp.size(-1)), dim=-1)
    entropy = -(logp.exp() * logp).nan_to_num().sum(dim=-1)  # exp(-inf) * -inf = nan: p = 0 adds 0
    ranks = 1 + (logits > logits[:, choice, None]).sum(dim=-1)
    return [LensLayer(name, list(zip(ids, lps)), h, rank, lp) for name, ids, lps, h, rank, lp in zip(
        names, top.indices.tolist(), top.values.tolist(), entropy.tolist(), ranks.tolist(),
        logp[:, choice].tolist())]
