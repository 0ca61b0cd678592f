"""From logits to tokens: the sampler settings, the stages that reshape a distribution, the stack
that applies them and draws, and generation over the KV cache (continuous batching included)."""
