"""A GPT-2 style decoder whose LM head is tied to the token embedding by default.

Names follow GPT-2's checkpoint layout (transformer.wte / wpe / h.N.{ln_1,attn.c_attn,attn.c_proj,
ln_2,mlp.c_fc,mlp.c_proj} / ln_f, lm_head), so importing GPT-2 weights is a rename plus the
transpose of HF's Conv1D matrices, not a rewrite.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm.model.loss import linear_cross_entropy


@dataclass
class GPTConfig:
    # metadata["help"]: the one-line description train.py --help and the README show
    vocab_size: int = field(default=50257, metadata={"help": "token ids (from the tokenizer)"})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads (n_embd % n_head == 0)"})
    n_embd: int = field(default=128, metadata={"help": "width of the residual stream"})
    block_size: int = field(default=256, metadata={"help": "context length in tokens"})
    dropout: float = field(default=0.0,
                           metadata={"help": "dropout on embeddings, attention and residuals"})
    bias: bool = field(default=True,
                       metadata={"help": "biases in Linear and LayerNorm layers (GPT-2 has them)"})
    tie_embeddings: bool = field(default=True, metadata={
        "help": "the LM head is the token embedding matrix (one Parameter)"})
    lm_head_bias: bool = field(default=False,
                               metadata={"help": "logits z = W·h + b instead of W·h"})
    logit_softcap: float | None = field(default=None, metadata={
        "help": "Gemma 2 logit soft-capping of the model's output, cap · tanh(z / cap), in "
                "training and sampling (null: off)"})
    layer_norm_eps: float = field(default=1e-5,
                                  metadata={"help": "nn.LayerNorm's (and GPT-2's) epsilon"})

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"model.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"model.logit_softcap must be > 0 (or null: off), got "
                             f"{self.logit_softcap!r}")


class KVCache:
    """Keys and values of every layer, preallocated: [n_layer, B, n_head, max_len, head_dim].

    A forward over T new tokens writes positions [length, length + T) of each layer and then
    advances `length`, so a decode step costs one token's work instead of the whole prefix.

    Rows that started at different times (continuous batching) hold different numbers of
    positions: give them with `set_lengths`. A forward of one token per row then writes row b's at
    column lengths[b], at position lengths[b], attends to columns [0, lengths[b]] and advances
    lengths; columns past a row's length are never read (right padding). `length` stays the
    longest row's, so a step knows how many columns to read without asking the device.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        max_len = max_len or config.block_size
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_dim)
        # zeros, not empty: attention multiplies a masked column's value by a weight of 0, and
        # 0 * the NaN that uninitialized memory may hold would be NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self._lengths: torch.Tensor | None = None

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    @property
    def lengths(self) -> torch.Tensor | None:
        """LongTensor [B], the columns each row holds; None while all rows hold `length`."""
        return self._lengths

    def set_lengths(self, lengths: Sequence[int]) -> None:
        """Row b holds columns [0, lengths[b]). Rows all alike take the shared length (no mask)."""
        self.length = max(lengths)
        self._lengths = None if min(lengths) == self.length else \
            torch.tensor(list(lengths), device=self.k.device)

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache of rows [start, stop) that shares this one's memory (a forward on it writes
        here), empty (length 0) and with shared length until its caller says otherwise."""
        view = copy.copy(self)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.length, view._lengths = 0, None
        return view


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attn_dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int | torch.Tensor = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # q, k, v: (B, nh, T, hs)
        if cache is not None:  # write the new keys/values, attend over everything cached so far
            k_cache, v_cache = cache
            if isinstance(start, int):
                k_cache[:, :, start:start + T] = k
                v_cache[:, :, start:start + T] = v
                end = start + T
            else:  # per-row lengths (T = 1): row b's token goes to column start[b]
                rows = torch.arange(B, device=x.device)
                k_cache[rows, :, start] = k[:, :, 0]
                v_cache[rows, :, start] = v[:, :, 0]
                end = mask.size(-1)
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]  # (B, nh, S, hs)
        # Without an explicit mask, a fresh sequence is plain causal and a one-token step sees all.
        is_causal = mask is None and isinstance(start, int) and start == 0 and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, start=0, mask=None):
        x = x + self.attn(self.ln_1(x), cache, start, mask)
        return x + self.mlp(self.ln_2(x))


class LMHead(nn.Module):
    """z = W·h (+ b). Tied, W is the token-embedding Parameter itself, so the state dict, the
    optimizer and the parameter count see that matrix once (nanoGPT's `wte.weight = lm_head.weight`
    would list it under two names)."""

    def __init__(self, config: GPTConfig, embedding: nn.Embedding):
        super().__init__()
        if config.tie_embeddings:
            self._embedding = [embedding]  # a list keeps it out of this module's parameters
        else:
            self.weight = nn.Parameter(torch.empty(config.vocab_size, config.n_embd))
        self.bias = nn.Parameter(torch.zeros(config.vocab_size)) if config.lm_head_bias else None

    @property
    def matrix(self) -> torch.Tensor:
        """The [V, d] head matrix, shared or not."""
        return self._embedding[0].weight if hasattr(self, "_embedding") else self.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.matrix, self.bias)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = LMHead(config, self.transformer.wte)
        self.decode_layout = False  # see set_decode_layout
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2·n_layer), two per block add to the stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if not config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def param_counts(self) -> dict[str, int]:
        """total; embedding (token + position); head (its own matrix and bias: 0 when tied without
        bias); non_embedding = total - embedding - head, the transformer body both heads share."""
        total = sum(p.numel() for p in self.parameters())
        embedding = self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        head = sum(p.numel() for p in self.lm_head.parameters())
        return dict(total=total, embedding=embedding, head=head,
                    non_embedding=total - embedding - head)

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None,
                      positions: torch.Tensor | None = None,
                      key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """Final (post ln_f) hidden states [B, T, d] for tokens idx [B, T].

        kv_cache: continue from the cached prefix and append these tokens to it (with per-row
            `lengths`, one token per row: see KVCache).
        positions: [T] or [B, T] position ids (default: cache length + arange(T)).
        key_padding: [B, S] bool, True for real tokens, S = cache length + T (left-padded batches).
        """
        B, T = idx.shape
        if kv_cache is not None and kv_cache.lengths is not None:
            if T != 1 or key_padding is not None:
                raise ValueError("a cache with per-row lengths takes one token per row and no "
                                 "key_padding")
            start = kv_cache.lengths  # [B]
            end = kv_cache.length + 1  # the longest row's columns, known without a device sync
            mask = (torch.arange(end, device=idx.device) <= start[:, None])[:, None, None]
            # mask: (B, 1, 1, S), each row sees its own columns [0, lengths[b]]
        else:
            start = kv_cache.length if kv_cache is not None else 0
            end = start + T
            mask = self._attention_mask(T, start, key_padding, idx.device)
        if end > self.config.block_size:
            raise ValueError(f"sequence of {end} tokens exceeds block_size "
                             f"{self.config.block_size}")
        if positions is None:
            positions = start[:, None] if isinstance(start, torch.Tensor) else \
                torch.arange(start, end, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for i, block in enumerate(self.transformer.h):
            cache = (kv_cache.k[i], kv_cache.v[i]) if kv_cache is not None else None
            x = block(x, cache, start, mask)
        if kv_cache is not None:
            kv_cache.length = end
            if kv_cache.lengths is not None:
                kv_cache._lengths = kv_cache.lengths + 1
        return self.transformer.ln_f(x)

    @staticmethod
    def _attention_mask(T: int, start: int, key_padding: torch.Tensor | None,
                        device: torch.device) -> torch.Tensor | None:
        """Boolean [B|1, 1, T, start+T] mask (True = may attend), or None where SDPA's own causal
        handling suffices. Each query always sees itself, so a padding row never goes all-False."""
        if key_padding is None and (start == 0 or T == 1):
            return None
        q_pos = torch.arange(start, start + T, device=device)
        k_pos = torch.arange(start + T, device=device)
        mask = k_pos[None, :] <= q_pos[:, None]  # (T, S) causal
        if key_padding is not None:
            mask = (mask & key_padding[:, None, :start + T]) | (k_pos[None, :] == q_pos[:, None])
            return mask[:, None]  # (B, 1, T, S)
        return mask[None, None]

    def logits(self, idx: torch.Tensor, kv_cache: KVCache | None = None,
               positions: torch.Tensor | None = None, key_padding: torch.Tensor | None = None,
               last_n: int | None = 1) -> torch.Tensor:
        """Raw logits (T = 1) for the last `last_n` positions (all when None): [B, last_n, V].

        Only those positions go through the head, which is what generation needs."""
        h = self.hidden_states(idx, kv_cache, positions, key_padding)
        if last_n is not None:
            h = h[:, -last_n:]
        return self.logits_from_hidden(h)

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The head on final hidden states [..., d] -> raw logits [..., V]: the model's output
        function, config.logit_softcap included (the loss applies the same cap)."""
        z = self.lm_head(h)
        cap = self.config.logit_softcap
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        return z

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[GPT]:
        """Eval mode (no dropout) for the block, whatever mode the caller left the model in (a
        notebook's training loop, a fresh GPT(cfg)); the caller's mode is restored after.
        A model already in eval mode is left alone: generation enters this once per decode step,
        and eval() + train() walk every module (about 0.6 ms, a fifth of a char-model step)."""
        was_training = self.training
        if was_training:
            self.eval()
        try:
            yield self
        finally:
            if was_training:
                super().train(True)  # the caller's mode back, not training's layout (see train)

    @contextlib.contextmanager
    def inference(self) -> Iterator[GPT]:
        """Eval mode and no autograd for the block; the mode is restored after."""
        with self.evaluating(), torch.inference_mode():
            yield self

    def train(self, mode: bool = True) -> GPT:
        """nn.Module.train; train() (mode True) is where a notebook's training starts, so it also
        puts back the usual weight layout if generation left the decode layout on (see
        set_decode_layout). evaluating() restores a caller's training mode without this."""
        if mode:
            self.set_decode_layout(False)
        return super().train(mode)

    def set_decode_layout(self, enabled: bool = True) -> GPT:
        """Lay out every matrix a decode step multiplies by (the four per block and the head) as
        [in, out] in memory, like HF's Conv1D (enabled), or back to PyTorch's usual [out, in].
        Shapes and values stay the same (W.t().contiguous().t()). Idempotent; returns the model.

        Why: F.linear(x, W) multiplies by W.t(), and for the few rows of a decode step (batch
        2-16) MKL's sgemm is up to 2x faster when that operand is contiguous (measured on this
        project's CPU box); one token (GEMV) is as fast either way. The embedding lookups of a tied
        head become strided reads of B·d floats, which cost nothing next to the matmuls. On an
        H100 it gains nothing (batch 1-32, fp32 and bf16) and costs 18% at fp32 batch 32.

        The rule: generation switches it on (RunningBatch, on CPU only) and leaves it on, so that
        the next generate() pays no copy; training switches it off where training starts, so that
        gradients, optimizer state and the training matmuls keep the usual layout. The trainer
        does so before it wraps the model; a notebook that samples and then trains does so with
        `model.train()` (PyTorch's start of training, see `train`) or with this method. No
        forward switches it: a step costs no check, and a copy happens only at those calls.
        """
        if enabled == self.decode_layout:
            return self
        matrices = {id(m.weight): m.weight for m in self.modules() if isinstance(m, nn.Linear)}
        matrices[id(self.lm_head.matrix)] = self.lm_head.matrix  # tied: the embedding, once
        with torch.no_grad():
            for w in matrices.values():
                w.data = w.data.t().contiguous().t() if enabled else w.data.contiguous()
        self.decode_layout = enabled
        return self

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean", **loss_options) -> torch.Tensor:
        """With targets [B, T]: the cross-entropy loss, computed from the hidden states and the head
        matrix by `linear_cross_entropy` (loss_options: impl, chunk_size, z_loss).
        Without: the logits of every position [B, T, V]."""
        if targets is None:
            return self.logits(idx, last_n=None)
        h = self.hidden_states(idx)
        return linear_cross_entropy(h, self.lm_head.matrix, targets, bias=self.lm_head.bias,
                                    reduction=reduction, softcap=self.config.logit_softcap,
                                    **loss_options)
