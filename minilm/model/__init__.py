"""The model: GPT-2 blocks, the tied (or untied) LM head that gives raw logits, the KV cache, and
the fused linear + cross-entropy loss (kernels/ holds its Triton step)."""
