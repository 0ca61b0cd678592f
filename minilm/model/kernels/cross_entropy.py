"""Triton kernel for the per-chunk step of the fused linear + cross-entropy loss.

One program per row (token) of a [n, V] logits chunk, Liger-style: pass 1 walks the row in
BLOCK-wide pieces with an online log-sum-exp, pass 2 overwrites the row in place with the gradient
of the row's loss (the row is back from L2). The matmuls around it stay in cuBLAS (minilm/loss.py
owns the chunk loop).

Written to also run under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) for CI: all
arithmetic is on fp32 values (bf16 tl.sum/tl.dot compute on raw bits there), tanh is written with
exp (libdevice returns nothing there), offsets are int64, and the launch config is fixed (autotune
needs a GPU).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # 2·sigmoid(2x) − 1, written out: libdevice's tanh is missing under the interpreter.
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _ce_step_kernel(
    logits_ptr, row_stride,  # [n, V] logits in, grad wrt logits out (in place)
    targets_ptr, scale_ptr, loss_ptr,  # [n] int64, [n] fp32, [n] fp32 out
    n_cols, ignore_index, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row)
    cols0 = tl.arange(0, BLOCK).to(tl.int64)

    if target == ignore_index:  # no loss, no gradient
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            zeros = tl.zeros([BLOCK], tl.float32).to(logits_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK):
                cols = start + cols0
                tl.store(row_ptr + cols, zeros, mask=cols < n_cols)
        return

    # Pass 1: max m and sum s of exp(y − m) over the row, y = softcap·tanh(x/softcap) or x, kept
    # per lane and reduced once after the loop: no block-wide reduction (and barrier) per block,
    # so the loads stream. One exp per element: of the two terms of the online update, the one
    # for the larger of (running max, new value) is exp(0) = 1.
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + cols0
        mask = cols < n_cols
        y = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            y = softcap * _tanh(y / softcap)
        y = tl.where(mask, y, float("-inf"))
        d = y - m  # NaN only where both are -inf: a lane not yet reached, masked below
        e = tl.where(mask, tl.exp(-tl.abs(d)), 0.0)
        s = tl.where(d > 0, s * e + 1.0, s + e)
        m = tl.maximum(m, y)
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))

    y_target = tl.load(row_ptr + target).to(tl.float32)
    if HAS_SOFTCAP:
        y_target = softcap * _tanh(y_target / softcap)
    tl.store(loss_ptr + row, lse - y_target + z_loss * lse * lse)

    # Pass 2: dloss/dy = softmax(y)·(1 + 2·z·lse) − onehot(target), times the row's scale; through
    # the softcap, dy/dx = 1 − tanh². The one-hot is subtracted in fp32, before rounding to the
    # buffer's dtype (p_target − 1 cancels badly in bf16).
    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr + row).to(tl.float32)
        coef = scale * (1.0 + 2.0 * z_loss * lse)
        for start in range(0, n_cols, BLOCK):
            cols = start + cols0
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                y = softcap * t
            else:
                y = x
            g = tl.exp(y - lse) * coef - tl.where(cols == target, scale, 0.0)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


# Launch config on a GPU: the fastest of bench/ce_kernel.py's sweep on an H100 for a 4096-row
# chunk at V = 50257 (462 us, 1781 GB/s against a copy's 2973; docs/loss_gpu_notes.md).
GPU_BLOCK, GPU_WARPS = 2048, 16


def ce_step_(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, loss: torch.Tensor,
             ignore_index: int, z_loss: float, softcap: float | None, compute_grad: bool,
             block: int | None = None, num_warps: int | None = None) -> None:
    """Per-token loss into `loss` and, if compute_grad, scale·dloss/dlogits into `logits` in place.

    logits [n, V] (rows contiguous), targets [n] int64, scale [n] fp32, loss [n] fp32.
    block, num_warps: the launch config (bench/ce_kernel.py sweeps it); None for the default.
    """
    n, V = logits.shape
    if n == 0:
        return
    assert logits.stride(1) == 1 and loss.is_contiguous()
    on_gpu = logits.is_cuda
    # Under the interpreter, which runs each block as numpy arrays, one warp and <= 4096 columns.
    block = block or min(triton.next_power_of_2(V), GPU_BLOCK if on_gpu else 4096)
    _ce_step_kernel[(n,)](
        logits, logits.stride(0), targets.contiguous(), scale.contiguous(), loss,
        V, ignore_index, float(z_loss), float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=compute_grad, BLOCK=block,
        num_warps=num_warps or (GPU_WARPS if on_gpu else 1),
    )
