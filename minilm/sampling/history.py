"""History: what the sampler stages read about each row besides its logits, kept up to date as
tokens are drawn: the tokens so far, the penalties' counts, each row's sampler state and generator.

    h = History(tokens=ids, prompt_lens=lens)   # ids [B, T] = prompt + generated so far
    tokens, info = stack.sample(logits, h)      # stages read h; stateful ones update h.state
    h.append(tokens)                            # O(B) update of what the penalties read
    h = h.select([0, 2])                        # rows leaving the batch: all of it stays aligned
    h = History.cat([h1, h2])                   # rows of several requests sampled in one call
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


class History:
    """The tokens of each row so far, the per-token statistics the penalties read, and each row's
    sampler state and generator.

    ``tokens`` [B, T] holds prompt + generated tokens. With an ``attention_mask`` [B, T] (True/1 = real
    token; e.g. the left padding of a batch of prompts) the masked positions are ignored. Of each row's
    real tokens the first ``prompt_lens[b]`` are the prompt, the rest were generated.

    Built once for a vocabulary of V tokens (``vocab_size``, else the first logits a penalty sees):
      ``counts``   LongTensor[B, V]: times each token was generated, prompt excluded (OpenAI's count)
      ``seen``     BoolTensor[B, V]: whether a token occurs in prompt + generated (HF's repetition set)
      ``seen_ids`` (rows, ids), two LongTensor[S]: the S (row, token) pairs where ``seen`` is True
    ``append`` updates ``counts`` and ``seen`` in O(B) without a device sync; ``seen_ids`` (whose
    length needs one) is brought up to date only when a penalty reads it. So a penalty touches the
    seen tokens only, and sampling without penalties never builds any of it. Token ids outside
    [0, V) are not counted (HF drops ids beyond the logits' vocabulary too).

    Per row, beside the tokens (``select`` and ``cat`` keep them aligned with the rows):
      ``generators`` the rows' torch.Generators (or None): the draw's and XTC's coins come from them
      ``state``      {key: Tensor[B, ...]}: what a stateful stage carries from step to step (Mirostat's
                     μ); NaN = not started, so rows of a fresh request start from the stage's initial value
      ``cache``      {key: Tensor[B, ...]}: what a stage derived from the tokens (DRY's match lengths);
                     kept by ``select``, dropped by ``cat`` (the stage recomputes it)
    """

    def __init__(self, tokens: Tensor, prompt_lens: Tensor, vocab_size: int | None = None,
                 attention_mask: Tensor | None = None,
                 generators: Sequence[torch.Generator] | None = None,
                 state: dict[str, Tensor] | None = None):
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be a LongTensor[B, T], got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        prompt_lens = torch.as_tensor(prompt_lens, dtype=torch.long, device=tokens.device)
        if prompt_lens.shape != (B,):
            raise ValueError(f"prompt_lens must have shape ({B},), got {tuple(prompt_lens.shape)}")
        if attention_mask is not None:
            if attention_mask.shape != tokens.shape:
                raise ValueError(f"attention_mask must have the shape of tokens {(B, T)}, "
                                 f"got {tuple(attention_mask.shape)}")
            attention_mask = attention_mask.to(device=tokens.device, dtype=torch.bool)
        n_real = torch.full_like(prompt_lens, T) if attention_mask is None else attention_mask.sum(1)
        if B and ((prompt_lens < 0) | (prompt_lens > n_real)).any():
            raise ValueError("prompt_lens must be in [0, the number of real tokens of the row]")
        if generators is not None and len(generators) != B:
            raise ValueError(f"got {len(generators)} generators for a batch of {B} rows")
        for key, value in (state or {}).items():
            if value.size(0) != B:
                raise ValueError(f"state {key!r} has {value.size(0)} rows, the History {B}")
        self.tokens = tokens
        self.prompt_lens = prompt_lens
        self.attention_mask = attention_mask
        self.generators = None if generators is None else list(generators)
        self.state: dict[str, Tensor] = dict(state or {})
        self.cache: dict[str, Tensor] = {}
        self.vocab_size: int | None = None
        self._counts: Tensor | None = None  # (B, V + 1): column V is a sink for ignored positions
        self._seen: Tensor | None = None    # (B, V + 1)
        self._seen_ids: tuple[Tensor, Tensor] | None = None  # (S,), (S,); None: not computed yet
        self._fresh: list[tuple[Tensor, Tensor]] = []  # appends not in _seen_ids yet: (new?, id) [B]
        if vocab_size is not None:
            self.build(vocab_size)

    @property
    def batch_size(self) -> int:
        return self.tokens.size(0)

    def build(self, vocab_size: int) -> History:
        """Compute ``counts`` and ``seen`` from ``tokens`` for a vocabulary of ``vocab_size`` (once)."""
        if self.vocab_size is not None:
            if vocab_size != self.vocab_size:
                raise ValueError(f"History was built for vocab_size {self.vocab_size}, not {vocab_size}")
            return self
        V, tokens, B = vocab_size, self.tokens, self.batch_size
        real = self.real()
        rank = real.long().cumsum(1)                              # (B, T) 1-based rank among real tokens
        generated = real & (rank > self.prompt_lens[:, None])     # (B, T)
        self._counts = torch.zeros(B, V + 1, dtype=torch.long, device=tokens.device)
        self._counts.scatter_add_(1, _ids_or_sink(tokens, generated, V), torch.ones_like(tokens))
        self._seen = torch.zeros(B, V + 1, dtype=torch.bool, device=tokens.device)
        self._seen.scatter_(1, _ids_or_sink(tokens, real, V), True)
        self.vocab_size = V
        return self

    def for_logits(self, logits: Tensor) -> History:
        """Check that ``logits`` [B, V] fit this history; build the statistics on first use."""
        if logits.size(0) != self.batch_size:
            raise ValueError(f"logits have batch size {logits.size(0)}, the History {self.batch_size}")
        return self.build(logits.size(-1))

    def real(self) -> Tensor:
        """BoolTensor[B, T]: which positions hold real tokens (not padding)."""
        if self.attention_mask is None:
            return torch.ones_like(self.tokens, dtype=torch.bool)
        return self.attention_mask

    @property
    def counts(self) -> Tensor:
        """LongTensor[B, V]: how often each token was generated."""
        return self._built(self._counts)

    @property
    def seen(self) -> Tensor:
        """BoolTensor[B, V]: whether each token occurs in prompt + generated."""
        return self._built(self._seen)

    @property
    def seen_ids(self) -> tuple[Tensor, Tensor]:
        """(rows, ids), LongTensor[S] each: every (row, token) pair where ``seen`` is True, in no
        particular order; ``logits[rows, ids]`` are the logits of the seen tokens. Computed on
        first read, then extended by the tokens appended since (one nonzero for all of them)."""
        seen = self._built(self._seen)
        if self._seen_ids is None:
            self._seen_ids, self._fresh = seen.nonzero(as_tuple=True), []
        elif self._fresh:
            new = torch.stack([is_new for is_new, _ in self._fresh])    # (n, B)
            ids = torch.stack([token for _, token in self._fresh])      # (n, B)
            step, rows = new.nonzero(as_tuple=True)
            old_rows, old_ids = self._seen_ids
            self._seen_ids = torch.cat([old_rows, rows]), torch.cat([old_ids, ids[step, rows]])
            self._fresh = []
        return self._seen_ids

    def append(self, new_tokens: Tensor) -> None:
        """Append one generated token per row (LongTensor[B]); update the statistics in O(B)."""
        if new_tokens.shape != (self.batch_size,):
            raise ValueError(f"new_tokens must have shape ({self.batch_size},), "
                             f"got {tuple(new_tokens.shape)}")
        new = new_tokens.to(self.tokens.device, torch.long)[:, None]     # (B, 1)
        self.tokens = torch.cat([self.tokens, new], dim=1)
        if self.attention_mask is not None:
            real = torch.ones_like(new, dtype=torch.bool)
            self.attention_mask = torch.cat([self.attention_mask, real], dim=1)
        if self.vocab_size is not None:
            idx = _ids_or_sink(new, torch.ones_like(new, dtype=torch.bool), self.vocab_size)  # (B, 1)
            if self._seen_ids is not None:  # which rows see their token for the first time
                self._fresh.append(((~self._seen.gather(1, idx) & (idx < self.vocab_size))[:, 0],
                                    idx[:, 0]))
            self._counts.scatter_add_(1, idx, torch.ones_like(idx))
            self._seen.scatter_(1, idx, True)

    def select(self, rows: Tensor | Sequence[int]) -> History:
        """A History of only these rows (indices into this batch, in the order given): the same as
        one built from scratch from their tokens, without recounting; their generators, state and
        cache come along."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.tokens.device)
        mask = None if self.attention_mask is None else self.attention_mask[idx]
        picked = rows.tolist() if isinstance(rows, Tensor) else rows
        gens = None if self.generators is None else [self.generators[i] for i in picked]
        out = History(self.tokens[idx], self.prompt_lens[idx], attention_mask=mask, generators=gens,
                      state={key: value[idx] for key, value in self.state.items()})
        out.cache = {key: value[idx] for key, value in self.cache.items()}
        if self.vocab_size is not None:
            out.vocab_size, out._counts, out._seen = self.vocab_size, self._counts[idx], self._seen[idx]
        return out

    @staticmethod
    def cat(histories: Sequence[History]) -> History:
        """The rows of several Histories as one (e.g. rows of several requests with equal settings,
        sampled in one call; ``select`` gives each its rows back). Shorter ones are left-padded; a
        state key some lack is NaN (not started) for their rows; the caches are dropped."""
        if not histories:
            raise ValueError("History.cat needs at least one History")
        T = max(h.tokens.size(1) for h in histories)
        padded = [_left_padded(h, T) for h in histories]
        masks = [mask for _, mask in padded]
        any_mask = any(mask is not None for mask in masks)
        with_gens = [h.generators is not None for h in histories]
        if any(with_gens) and not all(with_gens):
            raise ValueError("History.cat: some histories carry generators and some do not")
        out = History(
            torch.cat([tokens for tokens, _ in padded]),
            torch.cat([h.prompt_lens for h in histories]),
            attention_mask=torch.cat([m if m is not None else torch.ones_like(t, dtype=torch.bool)
                                      for (t, m) in padded]) if any_mask else None,
            generators=[g for h in histories for g in h.generators] if all(with_gens) else None,
            state=_cat_states(histories))
        sizes = {h.vocab_size for h in histories} - {None}
        if len(sizes) > 1:
            raise ValueError(f"History.cat: histories built for different vocab sizes {sorted(sizes)}")
        if sizes:
            V = sizes.pop()
            parts = [h.build(V) for h in histories]
            out.vocab_size = V
            out._counts = torch.cat([h._counts for h in parts])
            out._seen = torch.cat([h._seen for h in parts])
        return out

    @staticmethod
    def _built(stat: Tensor | None) -> Tensor:
        if stat is None:
            raise RuntimeError("History statistics are not built yet: pass vocab_size or call build(V)")
        return stat[:, :-1]


def _ids_or_sink(tokens: Tensor, keep: Tensor, V: int) -> Tensor:
    """The token ids where ``keep`` and in [0, V); the sink column V elsewhere."""
    return torch.where(keep & (tokens >= 0) & (tokens < V), tokens, V)


def _left_padded(h: History, T: int) -> tuple[Tensor, Tensor | None]:
    """h's tokens and mask left-padded to T columns (padding: token 0, not real)."""
    pad = T - h.tokens.size(1)
    if not pad:
        return h.tokens, h.attention_mask
    tokens = torch.nn.functional.pad(h.tokens, (pad, 0))
    return tokens, torch.nn.functional.pad(h.real(), (pad, 0), value=False)


def _cat_states(histories: Sequence[History]) -> dict[str, Tensor]:
    """Each state key over all rows; rows whose History lacks it get NaN (not started)."""
    out = {}
    for key in dict.fromkeys(k for h in histories for k in h.state):
        like = next(h.state[key] for h in histories if key in h.state)
        out[key] = torch.cat([h.state[key] if key in h.state else
                              torch.full((h.batch_size, *like.shape[1:]), math.nan, dtype=like.dtype,
                                         device=like.device) for h in histories])
    return out
