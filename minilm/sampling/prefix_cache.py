"""Automatic prefix caching: the keys, values and final hidden states of token blocks that earlier
requests computed, reused by later requests whose window starts with the same tokens.

    cache = PrefixCache(model.config, capacity_tokens=16384)
    blocks = cache.lookup(window)            # ids of the cached blocks its first tokens fill
    cache.read(blocks, batch_cache, slot)    # their keys and values into the slot's first columns
    cache.insert(window, batch_cache, slot, hidden, owner=request)   # after the slot computed it

Block-granular, as vLLM's (not a radix tree as SGLang's): a block holds `block_tokens` tokens and
is keyed by (its parent block, its tokens), so a key names the whole prefix up to it exactly (no
hash collisions) and a lookup is one dictionary probe per block. Fixed-size blocks make the
budget (`capacity_tokens`, the server's --kv_cache_tokens) exact and eviction one block at a time;
a radix tree would also reuse the last partial block (< block_tokens tokens per request) at the
price of splitting variable-length nodes. The rows of a batch that share a prefix but are not
cached yet share it token by token anyway (RunningBatch copies it from the row that computes it).

Positions are absolute (learned wpe), so a block is only valid at the columns it was computed at:
keys are chains from the window's first token, never a block found in the middle of another
prompt. Eviction is LRU over leaves (a block whose children are gone): a child is unreachable
without its parent, so parents always outlive their children; a lookup touches a chain from its
last block to its first, which keeps the oldest entries leaves.

The hidden states (post ln_f, [block_tokens, n_embd] per block, 4% of the keys and values of
GPT-2) are kept so that a prompt's log-probabilities can be read off a cached prefix with the LM
head alone (the server's prompt_logprobs), without running the blocks again.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Sequence

import torch
from torch import Tensor

from minilm.model.gpt import GPTConfig, KVCache

BLOCK_TOKENS = 16  # vLLM's default block size

Key = tuple[int, tuple[int, ...]]  # (parent block id or -1, the block's tokens)


class PrefixCache:
    """A pool of `capacity_tokens // block_tokens` blocks of keys, values and hidden states."""

    def __init__(self, config: GPTConfig, capacity_tokens: int, block_tokens: int = BLOCK_TOKENS,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        if capacity_tokens < block_tokens:
            raise ValueError(f"the prefix cache needs room for at least one block of "
                             f"{block_tokens} tokens, got {capacity_tokens}")
        self.block_tokens = block_tokens
        n_blocks = capacity_tokens // block_tokens
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, config.n_head, n_blocks, block_tokens, head_dim)
        # empty, not zeros: only blocks that were written are ever read, and untouched pages of
        # a large pool cost no memory until used
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.hidden = torch.empty(n_blocks, block_tokens, config.n_embd, device=device,
                                  dtype=dtype)
        self._ids: dict[Key, int] = {}
        self._keys: dict[int, Key] = {}
        self._children: dict[int, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._free = list(range(n_blocks - 1, -1, -1))
        self._owner: dict[int, Hashable] = {}  # block -> the request that inserted it ...
        self._shared: set[int] = set()  # ... unless another one has read it since

    @property
    def capacity_blocks(self) -> int:
        return self.hidden.size(0)

    @property
    def used_blocks(self) -> int:
        return len(self._keys)

    def lookup(self, tokens: Sequence[int], limit: int | None = None, reader: Hashable = None
               ) -> list[int]:
        """The ids of the cached blocks that hold the first tokens of `tokens`, longest chain
        first found, at most `limit` tokens' worth (the caller's last token must be computed).
        A `reader` other than a block's inserter shares it (release keeps it)."""
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        blocks = self._chain(tokens, limit)
        for b in reversed(blocks):  # the last block first: parents stay more recent than children
            self._lru.move_to_end(b)
            if reader is not self._owner.get(b, reader):
                self._shared.add(b)
        return blocks

    def _chain(self, tokens: Sequence[int], limit: int) -> list[int]:
        blocks, parent, B = [], -1, self.block_tokens
        for start in range(0, limit - B + 1, B):
            parent = self._ids.get((parent, tuple(tokens[start:start + B])), -2)
            if parent == -2:
                break
            blocks.append(parent)
        return blocks

    def read(self, blocks: list[int], cache: KVCache, slot: int) -> Tensor:
        """Copy the blocks' keys and values into columns [0, n) of the batch cache's slot; returns
        their hidden states [n, n_embd] (n = len(blocks) * block_tokens)."""
        if not blocks:
            return self.hidden.new_zeros(0, self.hidden.size(-1))
        idx = torch.tensor(blocks, device=self.k.device)
        n = len(blocks) * self.block_tokens
        for pool, dest in ((self.k, cache.k), (self.v, cache.v)):
            L, H, _, B, D = pool.shape
            dest[:, slot, :, :n] = pool[:, :, idx].reshape(L, H, n, D)
        return self.hidden[idx].reshape(n, -1)

    def insert(self, tokens: Sequence[int], cache: KVCache, slot: int, hidden: Tensor,
               owner: Hashable = None) -> None:
        """Keep the full blocks of `tokens`, whose keys and values the batch cache's slot holds
        at columns [0, len(tokens)) and whose hidden states are `hidden` [len(tokens), n_embd].
        Blocks already cached are only touched; when the pool is full the least recently used
        leaf goes (never a block of this chain); with no block to evict the rest is not kept."""
        B, parent, chain = self.block_tokens, -1, []
        for start in range(0, len(tokens) - B + 1, B):
            key = (parent, tuple(tokens[start:start + B]))
            block = self._ids.get(key)
            if block is None:
                block = self._allocate(set(chain))
                if block is None:
                    break
                self._store(block, key, cache, slot, start, hidden[start:start + B], owner)
            chain.append(block)
            parent = block
        for b in reversed(chain):
            self._lru.move_to_end(b)

    def release(self, owner: Hashable) -> int:
        """Free the blocks `owner` inserted that no other request has read (its caller went
        away); returns how many. Children go before their parents."""
        mine = [b for b, o in self._owner.items() if o is owner]
        freed = 0
        for b in sorted(mine, key=self._depth, reverse=True):
            self._owner.pop(b)
            if b not in self._shared and not self._children.get(b):
                self._evict(b)
                freed += 1
        return freed

    def forget(self, owner: Hashable) -> None:
        """`owner` finished: its blocks stay cached, now as anyone's."""
        for b in [b for b, o in self._owner.items() if o is owner]:
            self._owner.pop(b)

    def _depth(self, block: int) -> int:
        depth = 0
        while block >= 0:
            block, depth = self._keys[block][0], depth + 1
        return depth

    def _allocate(self, pinned: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        victim = next((b for b in self._lru if not self._children.get(b) and b not in pinned),
                      None)
        if victim is None:
            return None
        self._evict(victim)
        return self._free.pop()

    def _store(self, block: int, key: Key, cache: KVCache, slot: int, start: int,
               hidden: Tensor, owner: Hashable) -> None:
        B = self.block_tokens
        self.k[:, :, block] = cache.k[:, slot, :, start:start + B]
        self.v[:, :, block] = cache.v[:, slot, :, start:start + B]
        self.hidden[block] = hidden
        self._ids[key], self._keys[block] = block, key
        self._lru[block] = None
        if key[0] >= 0:
            self._children[key[0]] = self._children.get(key[0], 0) + 1
        if owner is not None:
            self._owner[block] = owner

    def _evict(self, block: int) -> None:
        key = self._keys.pop(block)
        del self._ids[key]
        self._lru.pop(block, None)
        self._children.pop(block, None)
        self._owner.pop(block, None)
        self._shared.discard(block)
        if key[0] >= 0:
            self._children[key[0]] -= 1
        self._free.append(block)
