"""The training loss: LM head + cross-entropy, without materialising the [N, V] logits.

For token i with hidden state h_i, target t_i and logits x_i = W h_i + b:

    y_i    = softcap · tanh(x_i / softcap)        (Gemma 2; y_i = x_i without softcap)
    lse_i  = log Σ_v exp(y_iv)
    loss_i = lse_i − y_i[t_i] + z_loss · lse_i²   (PaLM's z-loss)
    dloss_i/dy_i = softmax(y_i) · (1 + 2 · z_loss · lse_i) − onehot(t_i),  dy/dx = 1 − tanh²

Tokens with t_i = ignore_index have no loss and no gradient; "mean" divides by the count of the
others (at least 1, so an all-ignored batch gives 0, not NaN).

The fused path walks the tokens in chunks of rows. Per chunk it computes the logits in one
[rows, V] buffer, turns them in place into the gradient wrt the logits (the "step"), and from that
accumulates d_hidden, d_weight and d_bias. So the gradients are ready at the end of the forward
pass: backward only scales them by grad_output, in place, so that peak memory holds one d_weight
(reduction="none" recomputes them instead, since its per-token grad_output has to enter before the
sum over tokens). The step is PyTorch ops for impl="chunked" and a Triton kernel
(minilm/kernels/cross_entropy.py) for impl="triton"; the chunk loop is shared.

The fused path is a registered operator, minilm::linear_cross_entropy (torch.library.custom_op,
with a fake impl for tracing and an autograd formula), so torch.compile traces a model that calls
it in one graph, without a break: the operator is opaque to dynamo and Inductor, and its chunk
loop runs eagerly inside the compiled step (cuBLAS and the Triton kernel, as uncompiled). That
also keeps it clear of two torch 2.11 traps: dynamo tracing a chunked linear-CE inside an
autograd.Function can return wrong gradients (pytorch #180642), and addmm(out_dtype=) fails
under compile (pytorch #163880). Tests compare compiled and eager gradients.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

IMPLS = ("auto", "chunked", "triton", "naive", "torch")
REDUCTIONS = ("mean", "sum", "none")

# A chunk's logits buffer may cost this fraction of the fp32 [V, d] weight-gradient accumulator that
# the fused loss holds anyway, so peak extra memory ≈ (1 + budget)·|d_weight| + |d_hidden|. Each
# chunk adds a rank-`rows` update to all of d_weight, a read and a write of it, and small chunks
# make small matmuls: on an H100 at N = 16384 (first kernel) the loss took 17.1 ms at 512 rows,
# 12.2 at 2048, 11.4 at 4096, 11.1 at 8192 (docs/loss_gpu_notes.md). On CUDA 8/3 gives 4096 rows
# for GPT-2 124M's head in bf16, at any vocabulary size. Elsewhere the budget stays 1/3 (256 rows
# in fp32), where the CPU figures in the README were measured: memory is what it is for there.
CHUNK_BUDGET = {"cuda": 8 / 3}
DEFAULT_CHUNK_BUDGET = 1 / 3
MIN_CHUNK_BYTES = 16 * 2**20  # smaller buffers save nothing that matters and make small matmuls
HAVE_TRITON = importlib.util.find_spec("triton") is not None
# mm/addmm with an fp32 output from bf16 inputs (tensor cores, no upcast copies): CUDA, torch >= 2.8
_HAVE_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype_out")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         reduction: str = "mean", z_loss: float = 0.0,
                         softcap: float | None = None, impl: str = "auto",
                         chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of the logits hidden @ weight.T (+ bias) against targets (formulas above).

    hidden [N, d] or [B, T, d]; weight [V, d]; targets [N] or [B, T]; bias [V] or None.
    Returns a scalar for reduction "mean"/"sum", or the per-token loss shaped like targets for
    "none" (fp32, or fp64 for fp64 inputs). impl: "chunked" (PyTorch), "triton" (the GPU kernel),
    "naive" (F.linear + F.cross_entropy), "torch" (F.linear_cross_entropy, torch >= 2.13), or
    "auto" (triton on CUDA when importable, else chunked). chunk_size: rows (tokens) per chunk of
    the fused paths; None derives it from V, d and the device's CHUNK_BUDGET. Under autocast the
    matmuls run in the autocast dtype, as F.linear would; accumulation is fp32 and each gradient
    comes back in its input's dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")
    if not z_loss >= 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., d] and weight [V, d] disagree: {tuple(hidden.shape)} vs "
                         f"{tuple(weight.shape)}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must be hidden's shape without its last "
                         f"dim, {tuple(hidden.shape[:-1])}")
    if impl == "auto":
        impl = "triton" if hidden.is_cuda and HAVE_TRITON else "chunked"

    h = hidden.reshape(-1, hidden.shape[-1])  # [N, d]
    t = targets.reshape(-1)  # [N]
    dtype = _compute_dtype(hidden, weight)
    if impl == "naive":
        loss = _naive(h, weight, bias, t, ignore_index, reduction, z_loss, softcap, dtype)
    elif impl == "torch":
        loss = _torch_lce(h, weight, bias, t, ignore_index, reduction, z_loss, softcap, dtype)
    else:
        rows = chunk_size or _chunk_rows(*weight.shape, dtype, hidden.device.type)
        grad = torch.is_grad_enabled()
        need = [grad and x is not None and x.requires_grad for x in (h, weight, bias)]
        softcap = None if softcap is None else float(softcap)
        loss = torch.ops.minilm.linear_cross_entropy(h, weight, bias, t, reduction, ignore_index,
                                                     float(z_loss), softcap, dtype, rows, impl,
                                                     need)[0]
    return loss.view(targets.shape) if reduction == "none" else loss


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's where it is on (as for F.linear), else the promoted one."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_rows(V: int, d: int, dtype: torch.dtype, device_type: str = "cpu") -> int:
    """Rows per chunk: the [rows, V] buffer may take budget · |fp32 d_weight [V, d]| bytes (or
    MIN_CHUNK_BYTES if more), i.e. rows = budget · d · 4 / itemsize; a multiple of 16.
    Independent of N: the budget is relative to memory the loss needs anyway."""
    fraction = CHUNK_BUDGET.get(device_type, DEFAULT_CHUNK_BUDGET)
    budget = max(fraction * V * d * 4, MIN_CHUNK_BYTES)
    return max(16, int(budget // (V * dtype.itemsize)) // 16 * 16)


def _step_for(impl: str, device: torch.device):
    """The per-chunk step: PyTorch ops ("chunked") or the Triton kernel ("triton")."""
    if impl == "chunked":
        return _torch_step_
    if not HAVE_TRITON:
        raise RuntimeError("impl='triton' needs the triton package (pip install triton)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got "
                         f"{device.type} ones")
    from minilm.model.kernels.cross_entropy import ce_step_
    return ce_step_


def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """loss [N] (zero where ignored) → the reduction; "mean" over the valid tokens, at least 1."""
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / valid.sum().clamp(min=1) if reduction == "mean" else total


def _naive(h, weight, bias, targets, ignore_index, reduction, z_loss, softcap, dtype):
    """The reference: full [N, V] logits through F.linear and F.cross_entropy."""
    logits = F.linear(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    logits = logits.to(torch.promote_types(dtype, torch.float32))  # [N, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = targets != ignore_index
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, dim=-1).square() * valid
    return _reduce(loss, valid, reduction)


def _torch_lce(h, weight, bias, targets, ignore_index, reduction, z_loss, softcap, dtype):
    """PyTorch's own chunked F.linear_cross_entropy (torch >= 2.13), the library peer."""
    for name, value, off in (("z_loss", z_loss, 0.0), ("softcap", softcap, None)):
        if value != off:
            raise ValueError(f"impl='torch' does not support {name} (got {value!r}); "
                             f"use impl='chunked' or 'triton'")
    if not hasattr(F, "linear_cross_entropy"):
        raise RuntimeError(f"impl='torch' needs F.linear_cross_entropy (torch >= 2.13); this is "
                           f"torch {torch.__version__}")
    with torch.autocast(h.device.type, enabled=False):
        loss = F.linear_cross_entropy(
            h.to(dtype), weight.to(dtype), targets,
            linear_bias=None if bias is None else bias.to(dtype),
            reduction="sum" if reduction == "mean" else reduction,  # our "mean" is NaN-free
            ignore_index=ignore_index, options=torch.nn.LinearCrossEntropyOptions())
    if reduction == "mean":
        loss = loss / (targets != ignore_index).sum().clamp(min=1)
    return loss


def _torch_step_(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                 loss: torch.Tensor, ignore_index: int, z_loss: float, softcap: float | None,
                 compute_grad: bool) -> None:
    """Per-token loss into `loss` [n] and, if compute_grad, scale·dloss/dlogits into `logits`
    [n, V] in place; formulas in the module docstring. Same contract as the Triton kernel
    (kernels/cross_entropy.py: ce_step_), in PyTorch ops that reuse the buffer."""
    x = logits if logits.dtype.itemsize >= 4 else logits.float()  # compute in fp32 at least
    valid = targets != ignore_index  # [n]
    t = targets.masked_fill(~valid, 0).unsqueeze(1)  # [n, 1]
    if softcap is not None:
        x.div_(softcap).tanh_()  # tanh(x / c)
        # 1 − tanh², kept for the chain rule: the one extra chunk-sized buffer of this path
        dcap = torch.mul(x, x).neg_().add_(1) if compute_grad else None
        x.mul_(softcap)  # y
    m = x.amax(dim=1, keepdim=True)  # [n, 1]
    y_t = x.gather(1, t)  # [n, 1]
    x.sub_(m).exp_()  # exp(y − m)
    sumexp = x.sum(dim=1, keepdim=True)  # [n, 1]
    lse = sumexp.log().add_(m)  # [n, 1]
    row_loss = (lse - y_t).squeeze(1)
    if z_loss:
        row_loss += z_loss * lse.squeeze(1).square()
    loss.copy_(row_loss.masked_fill_(~valid, 0))
    if not compute_grad:
        return
    w = (scale * valid).unsqueeze(1).to(x.dtype)  # [n, 1]: reduction factor, 0 when ignored
    coef = w / sumexp
    if z_loss:
        coef *= 1 + 2 * z_loss * lse
    x.mul_(coef)  # softmax · (1 + 2·z·lse) · w
    x.scatter_add_(1, t, -w)  # − onehot · w
    if softcap is not None:
        x.mul_(dcap)
    if x is not logits:
        logits.copy_(x)


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out = a @ b, or out += a @ b (beta = 1, no separate zero-fill and add); out may be fp32
    (or fp64) while a, b are bf16/fp16: on CUDA the matmul writes fp32 itself (out_dtype)."""
    kw = {}
    if a.dtype != out.dtype:
        if out.is_cuda and _HAVE_OUT_DTYPE:
            kw["out_dtype"] = out.dtype
        else:
            a, b = a.to(out.dtype), b.to(out.dtype)
    if accumulate:
        torch.addmm(out, a, b, out=out, **kw)
    else:
        torch.mm(a, b, out=out, **kw)


def _padded_head(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    """The head in the matmul dtype; on CUDA with its rows padded by zeros to a multiple of 64.

    cuBLAS takes its fast Hopper kernels only for 16-byte aligned leading dimensions; GPT-2's
    V = 50257 is not, and on an H100 the unpadded matmuls fell back to sm75 kernels at ~4x the
    time (nanoGPT pads the vocabulary to 50304 for the same reason). The padded logits are 0 and
    never reach the softmax: the step only sees the first V columns."""
    V, d = weight.shape
    Vp = -(-V // 64) * 64 if weight.is_cuda else V
    if Vp == V:
        return weight.to(dtype), None if bias is None else bias.to(dtype)
    w = torch.empty(Vp, d, dtype=dtype, device=weight.device)
    w[:V], w[V:] = weight, 0
    b = None
    if bias is not None:
        b = torch.empty(Vp, dtype=dtype, device=weight.device)
        b[:V], b[V:] = bias, 0
    return w, b


def _chunk_loop(step, hidden, weight, bias, targets, scale, ignore_index, z_loss, softcap, dtype,
                rows, need_dh, need_dw, need_db):
    """Walk the tokens in chunks of `rows`; returns the per-token loss [N] and the gradients
    flagged by need_*, each row of dloss weighted by scale [N]: d_hidden [N, d] (in `dtype`),
    d_weight [V, d] and d_bias [V] (fp32, or fp64 for fp64 inputs). Peak extra memory: the
    gradients plus one [rows, V] logits buffer. One pass over each chunk gives its loss and all
    its gradient contributions; nothing here waits for the device."""
    N, d = hidden.shape
    V = weight.shape[0]
    acc = torch.promote_types(dtype, torch.float32)
    opts = dict(device=hidden.device)
    new = torch.zeros if N == 0 else torch.empty  # the first chunk writes d_weight and d_bias
    h = hidden.to(dtype)  # [N, d]: a copy only when dtypes differ
    w, b = _padded_head(weight, bias, dtype)  # [Vp, d], [Vp] with Vp >= V, zero rows past V
    Vp = w.shape[0]
    loss = torch.empty(N, dtype=acc, **opts)
    dh = torch.empty(N, d, dtype=dtype, **opts) if need_dh else None
    dw = new(Vp, d, dtype=acc, **opts) if need_dw else None
    db = new(V, dtype=acc, **opts) if need_db else None
    compute_grad = need_dh or need_dw or need_db
    buf = torch.empty(min(rows, N), Vp, dtype=dtype, **opts)
    for start in range(0, N, rows):
        end = min(start + rows, N)
        zp = buf[:end - start]  # [n, Vp]; columns past V hold h·0 = 0 and stay 0
        z = zp[:, :V]  # [n, V]
        h_c = h[start:end]  # [n, d]
        if b is None:
            torch.mm(h_c, w.t(), out=zp)
        else:
            torch.addmm(b, h_c, w.t(), out=zp)
        step(z, targets[start:end], scale[start:end], loss[start:end], ignore_index, z_loss,
             softcap, compute_grad)  # z: logits → scale · dloss/dlogits
        if need_dh:
            torch.mm(zp, w, out=dh[start:end])  # [n, d]
        if need_dw:
            _matmul_into(dw, zp.t(), h_c, accumulate=start > 0)  # (+)= [Vp, n] @ [n, d]
        if need_db:
            if start == 0:
                torch.sum(z, dim=0, dtype=acc, out=db)
            else:
                db += z.sum(dim=0, dtype=acc)
    dw = dw[:V] if dw is not None else None
    return loss, dh, dw, db


# --- The registered operator ------------------------------------------------------------------
#
# minilm::linear_cross_entropy(hidden [N, d], weight [V, d], bias [V]?, targets [N], ...)
#   -> (loss, d_hidden, d_weight, d_bias)
# loss: the reduced scalar, or [N] for "none". For "mean"/"sum" the gradients of that loss wrt the
# inputs flagged by need_grads come out of the same pass (empty [0] tensors for the others, and
# for "none"); its backward scales them by grad_output, in place where it may (_may_scale_in_place):
# linear_cross_entropy passes on only the loss: the gradient outputs are the op's hand-over to its
# backward, which consumes them. For "none" the backward recomputes them through
# minilm::linear_cross_entropy_backward, with the per-token grad_output as row weights.
# Explicit schemas: stable across torch versions, unlike inference from annotations.

_ARGS = ("int ignore_index, float z_loss, float? softcap, ScalarType dtype, int rows, str impl, "
         "bool[] need_grads")


@torch.library.custom_op(
    "minilm::linear_cross_entropy", mutates_args=(),
    schema=f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, str reduction, {_ARGS})"
           " -> (Tensor, Tensor, Tensor, Tensor)")
def _fused_op(hidden, weight, bias, targets, reduction, ignore_index, z_loss, softcap, dtype, rows,
              impl, need_grads):
    acc = torch.promote_types(dtype, torch.float32)
    if reduction == "mean":  # a device tensor: no host sync
        factor = (targets != ignore_index).sum().to(acc).clamp(min=1).reciprocal()
    else:
        factor = torch.ones((), dtype=acc, device=hidden.device)
    need = [reduction != "none" and n for n in need_grads]
    with torch.autocast(hidden.device.type, enabled=False):
        loss, *grads = _chunk_loop(_step_for(impl, hidden.device), hidden, weight, bias, targets,
                                   factor.expand(len(targets)), ignore_index, z_loss, softcap,
                                   dtype, rows, *need)
    loss = loss if reduction == "none" else loss.sum() * factor
    return loss, *_like(grads, hidden, weight, bias)


@torch.library.custom_op(
    "minilm::linear_cross_entropy_backward", mutates_args=(),
    schema=f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor grad_loss, "
           f"{_ARGS}) -> (Tensor, Tensor, Tensor)")
def _fused_backward_op(hidden, weight, bias, targets, grad_loss, ignore_index, z_loss, softcap,
                       dtype, rows, impl, need_grads):
    """The gradients of sum_i grad_loss[i] · loss_i, recomputed chunk by chunk."""
    acc = torch.promote_types(dtype, torch.float32)
    with torch.autocast(hidden.device.type, enabled=False):
        _, *grads = _chunk_loop(_step_for(impl, hidden.device), hidden, weight, bias, targets,
                                grad_loss.to(acc), ignore_index, z_loss, softcap, dtype, rows,
                                *need_grads)
    return _like(grads, hidden, weight, bias)


def _like(grads, hidden, weight, bias):
    """Each gradient in its input's dtype; an empty [0] tensor for one not computed."""
    return tuple(hidden.new_empty(0) if g is None else g.to(x.dtype)
                 for g, x in zip(grads, (hidden, weight, bias)))


@_fused_op.register_fake
def _(hidden, weight, bias, targets, reduction, ignore_index, z_loss, softcap, dtype, rows, impl,
      need_grads):
    acc = torch.promote_types(dtype, torch.float32)
    loss = hidden.new_empty(hidden.shape[:1] if reduction == "none" else (), dtype=acc)
    need = [reduction != "none" and n for n in need_grads]
    return loss, *_fake_grads(hidden, weight, bias, need)


@_fused_backward_op.register_fake
def _(hidden, weight, bias, targets, grad_loss, ignore_index, z_loss, softcap, dtype, rows, impl,
      need_grads):
    return _fake_grads(hidden, weight, bias, need_grads)


def _fake_grads(hidden, weight, bias, need):
    return tuple(x.new_empty(x.shape) if n else hidden.new_empty(0)
                 for x, n in zip((hidden, weight, bias), need))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, reduction, *args = inputs
    ctx.mark_non_differentiable(*output[1:])
    # The gradient outputs get no gradient: pass None for them, not gradient-sized zeros.
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.args = reduction, args[:-1]  # need_grads comes from ctx in backward
    if reduction == "none":  # recomputed in backward: keep the inputs (no copies)
        ctx.save_for_backward(hidden, weight, bias, targets)
    else:  # computed already: keep the gradients
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, *_):
    need = list(ctx.needs_input_grad[:3])
    saved = ctx.saved_tensors
    if grad_loss is None:  # no gradient reached the loss (grads are not materialised): zero
        grads = [None] * 3
    elif ctx.reduction == "none":
        grads = torch.ops.minilm.linear_cross_entropy_backward(*saved, grad_loss, *ctx.args, need)
    elif _may_scale_in_place(grad_loss, *saved):  # no second d_weight
        grads = [g.mul_(grad_loss) if n else None for g, n in zip(saved, need)]
    else:
        grads = [g * grad_loss if n else None for g, n in zip(saved, need)]
    return *(g if n else None for g, n in zip(grads, need)), *(None,) * 9


def _may_scale_in_place(*tensors: torch.Tensor) -> bool:
    """Whether backward may scale the saved gradients in place: in eager autograd (plain tensors)
    when the running backward does not keep the graph (retain_graph, create_graph), since autograd
    frees the saved tensors right after it and nothing can read them again (the test AOTAutograd
    makes before a compiled backward reuses saved tensors' memory). Under AOTAutograd's tracing
    (FunctionalTensors) a mutation would become a copy anyway, and one of a forward output cannot
    be expressed: out of place there; Inductor's backward then reuses the saved buffers in place
    itself (donated buffers). Where this torch cannot tell whether the graph is kept, out of place
    too: correct, at the cost of a copy."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return (keep_graph is not None and not keep_graph()
            and all(type(t) is torch.Tensor for t in tensors))


_fused_op.register_autograd(_backward, setup_context=_setup_context)
