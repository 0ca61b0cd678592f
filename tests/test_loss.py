"""Tests of minilm.loss.linear_cross_entropy against an independent float64 reference.

The Triton kernel runs under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) in a
subprocess that executes this file as a script (see the bottom): the variable has to be set
before triton is first imported, which this pytest process may already have done.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minilm.model.loss import IMPLS, linear_cross_entropy

N, V, D = 252, 507, 123  # not multiples of any chunk or block size


def reference(hidden, weight, targets, bias=None, ignore_index=-100, reduction="mean", z_loss=0.0,
              softcap=None):
    """The loss written out in float64 from its formulas: full logits, log-sum-exp, z-loss."""
    h, w = hidden.double().reshape(-1, hidden.shape[-1]), weight.double()
    logits = h @ w.T + (0 if bias is None else bias.double())  # [N, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    t = targets.reshape(-1)
    valid = t != ignore_index
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
    loss = torch.where(valid, lse - target_logit + z_loss * lse ** 2, 0.0)
    if reduction == "none":
        return loss.view(targets.shape)
    return loss.sum() / (valid.sum().clamp(min=1) if reduction == "mean" else 1)


def make(n=N, v=V, d=D, dtype=torch.float32, bias=False, ignore_every=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, b, targets


def loss_and_grads(fn, hidden, weight, bias, targets, **kw):
    """Loss, then grads of (hidden, weight, bias) for a random upstream gradient (fixed seed)."""
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    for x in inputs:
        x.grad = None
    loss = fn(hidden, weight, targets, bias=bias, **kw)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss.dtype)
    (loss * upstream).sum().backward()
    return [loss.detach()] + [x.grad.clone() for x in inputs]


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()


def assert_close(got, want, tol):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert torch.isfinite(g).all()
        assert rel_err(g, w) < tol, (rel_err(g, w), tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, dict(bias=True), dict(z_loss=1e-2),
                                     dict(softcap=2.0), dict(bias=True, z_loss=1e-3, softcap=5.0)])
@pytest.mark.parametrize("impl", ["chunked", "naive"])
def test_matches_float64_reference_fp32(impl, options, reduction):
    options = dict(options)
    hidden, weight, bias, targets = make(bias=options.pop("bias", False))
    want = loss_and_grads(reference, hidden, weight, bias, targets, reduction=reduction, **options)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, bias, targets, reduction=reduction,
                         impl=impl, chunk_size=100, **options)
    assert got[0].dtype == torch.float32 and hidden.grad.dtype == torch.float32
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("chunk_size", [7, 64, N - 1, N, 1000, None])
def test_chunk_sizes(chunk_size):
    hidden, weight, bias, targets = make(bias=True)
    want = loss_and_grads(reference, hidden, weight, bias, targets, z_loss=1e-3)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, bias, targets, z_loss=1e-3,
                         impl="chunked", chunk_size=chunk_size)
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("options", [{}, dict(z_loss=1e-3, softcap=5.0)])
def test_bf16_no_worse_than_naive(options):
    """bf16 inputs: the fused path's error vs float64 is at most the naive bf16 path's + 2e-3."""
    hidden, weight, bias, targets = make(dtype=torch.bfloat16, bias=True)
    want = loss_and_grads(reference, hidden, weight, bias, targets, **options)
    naive = loss_and_grads(linear_cross_entropy, hidden, weight, bias, targets, impl="naive",
                           **options)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, bias, targets, impl="chunked",
                         chunk_size=64, **options)
    assert [g.dtype for g in got[1:]] == [torch.bfloat16] * 3
    for g, n, w in zip(got, naive, want):
        assert rel_err(g, w) <= rel_err(n, w) + 2e-3, (rel_err(g, w), rel_err(n, w))
        assert rel_err(g, w) < 2e-2


def test_autocast_mixed_dtypes():
    """Under bf16 autocast, an fp32 weight and an fp32 hidden: bf16 matmuls, fp32 gradients back,
    and accuracy no worse than F.linear + F.cross_entropy under the same autocast."""
    hidden, weight, bias, targets = make(bias=True)
    want = loss_and_grads(reference, hidden, weight, bias, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = loss_and_grads(linear_cross_entropy, hidden, weight, bias, targets, impl="naive")
        got = loss_and_grads(linear_cross_entropy, hidden, weight, bias, targets, impl="chunked")
    assert [g.dtype for g in got] == [torch.float32] * 4
    for g, n, w in zip(got, naive, want):
        assert rel_err(g, w) <= rel_err(n, w) + 2e-3
    assert rel_err(got[0], want[0]) > 1e-6  # the matmul really ran in bf16


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_grads(reduction):
    hidden, weight, bias, targets = make(bias=True)
    targets[:] = -100
    for impl in ("chunked", "naive"):
        loss, *grads = loss_and_grads(linear_cross_entropy, hidden, weight, bias, targets,
                                      reduction=reduction, impl=impl, z_loss=1e-2, softcap=3.0)
        assert torch.equal(loss, torch.zeros_like(loss))
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


def test_ignored_tokens_get_no_gradient_and_custom_ignore_index():
    hidden, weight, _, targets = make(ignore_every=0)
    targets[::3] = 7  # a real class used as the ignore index
    loss, dh, *_ = loss_and_grads(linear_cross_entropy, hidden, weight, None, targets,
                                  ignore_index=7, reduction="none", impl="chunked", chunk_size=50)
    assert (loss[::3] == 0).all() and (dh[::3] == 0).all()
    assert (loss[1::3] > 0).all() and (dh[1::3].abs().sum(1) > 0).all()
    want = reference(hidden, weight, targets, ignore_index=7, reduction="none")
    assert_close([loss], [want], 1e-5)


def test_non_contiguous_inputs_and_3d_shapes():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 21, 3, D, generator=g).transpose(1, 2).requires_grad_()  # [2, 3, 21, D]
    weight = torch.randn(D, V, generator=g).T.requires_grad_()  # [V, D], column-major
    bias = torch.randn(2 * V, generator=g)[::2].requires_grad_()  # [V], stride 2
    targets = torch.randint(0, V, (2, 21, 3), generator=g).transpose(1, 2)  # [2, 3, 21]
    assert not any(x.is_contiguous() for x in (hidden, weight, bias, targets))
    want = loss_and_grads(reference, hidden, weight, bias, targets, reduction="none")
    got = loss_and_grads(linear_cross_entropy, hidden, weight, bias, targets, reduction="none",
                         impl="chunked", chunk_size=16)
    assert got[0].shape == targets.shape and got[1].shape == hidden.shape
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(reduction, chunk_size):
    hidden, weight, bias, targets = make(n=6, v=11, d=5, dtype=torch.float64, bias=True,
                                         ignore_every=4)

    def f(h, w, b):
        return linear_cross_entropy(h, w, targets, bias=b, reduction=reduction, impl="chunked",
                                    chunk_size=chunk_size, z_loss=0.1, softcap=2.0)

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_only_requested_grads_and_no_grad_mode():
    hidden, weight, _, targets = make()
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, targets, impl="chunked")
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        again = linear_cross_entropy(hidden, weight, targets, impl="chunked")
    assert again.grad_fn is None and torch.allclose(again, loss)


def test_backward_twice_with_retain_graph():
    hidden, weight, _, targets = make()
    loss = linear_cross_entropy(hidden, weight, targets, reduction="sum", impl="chunked")
    loss.backward(retain_graph=True)
    first = hidden.grad.clone()
    hidden.grad = None
    (3 * loss).backward()  # the second backward recomputes
    torch.testing.assert_close(hidden.grad, 3 * first, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="needs torch >= 2.13")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_impl_matches_reference(reduction):
    hidden, weight, bias, targets = make(bias=True)
    want = loss_and_grads(reference, hidden, weight, bias, targets, reduction=reduction)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, bias, targets, reduction=reduction,
                         impl="torch")
    assert_close(got, want, 1e-5)


def test_invalid_arguments_raise():
    hidden, weight, _, targets = make()
    bad = [dict(impl="fast"), dict(reduction="avg"), dict(chunk_size=0), dict(softcap=0.0),
           dict(z_loss=-1.0), dict(impl="torch", z_loss=1e-4), dict(impl="torch", softcap=3.0)]
    for kw in bad:
        with pytest.raises(ValueError, match=str(next(iter(kw.values())))):
            linear_cross_entropy(hidden, weight, targets, **kw)
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_cross_entropy(hidden, weight, targets, impl="fast")
    with pytest.raises(ValueError):
        linear_cross_entropy(hidden[:, :-1], weight, targets)
    with pytest.raises(ValueError):
        linear_cross_entropy(hidden, weight, targets[:-1])
    assert set(IMPLS) == {"auto", "chunked", "triton", "naive", "torch"}


@pytest.mark.parametrize("tie", [True, False])
def test_training_step_chunked_matches_naive(tie):
    """One SGD step of the model: the same updated weights with the fused loss as with the naive
    one, with the tied head (d_weight adds into the embedding) and an untied head with a bias."""
    from minilm.model.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=97, n_layer=1, n_head=2, n_embd=16, block_size=12,
                    tie_embeddings=tie, lm_head_bias=not tie)
    idx = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(0))
    targets = idx.roll(-1, dims=1)
    targets[0, :4] = -100
    states = {}
    for impl in ("naive", "chunked"):
        torch.manual_seed(0)
        model = GPT(cfg)
        if not tie:  # a nonzero bias, so its gradient path matters
            torch.nn.init.normal_(model.lm_head.bias, std=0.5)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        loss = model(idx, targets, reduction="sum", impl=impl, chunk_size=5, z_loss=1e-3)
        (loss / (targets != -100).sum()).backward()
        opt.step()
        states[impl] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    start = GPT(cfg).state_dict()
    wte = "transformer.wte.weight"
    assert not torch.allclose(states["naive"][wte], start[wte])  # the step did move the weights
    for name, want in states["naive"].items():
        torch.testing.assert_close(states["chunked"][name], want, rtol=1e-5, atol=1e-6)


# --- The registered operator, and the model's training step under torch.compile ------------------
#
# The fused loss is the custom op minilm::linear_cross_entropy. On CPU the step is compiled with the
# aot_eager backend: dynamo, AOTAutograd and the op's fake impl and autograd formula (where torch
# 2.11's wrong-gradient bug #180642 lives) are all exercised; Inductor's C++ compile of even this
# one-layer model takes over a minute on a 2-core CI machine. On a GPU the same tests use Inductor.

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OP = torch.ops.minilm.linear_cross_entropy.default
OP_BACKWARD = torch.ops.minilm.linear_cross_entropy_backward.default


def op_args(n=20, v=30, d=8, bias=True, reduction="mean", impl="chunked", device="cpu"):
    hidden, weight, b, targets = (None if x is None else x.detach().to(device).requires_grad_(
        x.is_floating_point()) for x in make(n=n, v=v, d=d, bias=bias, ignore_every=3))
    return (hidden, weight, b, targets, reduction, -100, 1e-3, 3.0, torch.float32, 7, impl,
            [True, True, bias])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction, bias", [("mean", False), ("sum", True), ("none", True)])
def test_opcheck(reduction, bias, device):
    """Schema, fake impl, autograd registration and AOT dispatch of the op, and of its backward
    (which is not differentiable itself: second-order gradients are not supported)."""
    impl = "triton" if device == "cuda" else "chunked"
    torch.library.opcheck(OP, op_args(bias=bias, reduction=reduction, impl=impl, device=device))
    args = op_args(bias=bias, impl=impl, device=device)
    tensors, (_, *rest) = args[:4], args[4:]
    grad_loss = torch.randn(len(tensors[3]), generator=torch.Generator().manual_seed(2)).to(device)
    no_grad = [None if x is None else x.detach() for x in tensors]  # first-order only
    torch.library.opcheck(OP_BACKWARD, (*no_grad, grad_loss, *rest))


def tiny_gpt(tie: bool, device: str = "cpu"):
    """A one-layer GPT; untied with a nonzero head bias (so its gradient path matters)."""
    from minilm.model.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=97, n_layer=1, n_head=2, n_embd=16, block_size=12,
                    tie_embeddings=tie, lm_head_bias=not tie)
    torch.manual_seed(0)
    model = GPT(cfg)
    if not tie:
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    idx = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(0))
    targets = idx.roll(-1, dims=1)
    targets[0, :4] = -100
    return model.to(device), idx.to(device), targets.to(device)


def step_loss_and_grads(model, forward, idx, targets, dtype=None, **loss_kw):
    """The trainer's step: forward (under autocast when dtype is given), backward of the loss
    weighted by a fixed random upstream gradient; returns [loss, every parameter's grad]."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(idx.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = forward(idx, targets, **loss_kw)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss)
    (loss * upstream).sum().backward()
    return [loss.detach().float()] + [p.grad.float().clone() for p in model.parameters()]


COMPILE_CASES = {
    "tied-sum": dict(tie=True, reduction="sum", chunk_size=5, z_loss=1e-3),  # the trainer's call
    "untied-bias-mean-softcap": dict(tie=False, reduction="mean", chunk_size=16, z_loss=1e-2,
                                     softcap=3.0),
    "tied-none": dict(tie=True, reduction="none", chunk_size=7),
    "tied-sum-bf16-autocast": dict(tie=True, reduction="sum", dtype=torch.bfloat16),
}


def compiled_vs_eager(case, device, impl, backend):
    """[loss, grads] of the eager step and of the torch.compile(fullgraph=True) step, and dynamo's
    explain() of the model's forward."""
    case = dict(case)
    model, idx, targets = tiny_gpt(case.pop("tie"), device)
    model.config.logit_softcap = case.pop("softcap", None)
    dtype = case.pop("dtype", None)
    eager = step_loss_and_grads(model, model, idx, targets, dtype, impl=impl, **case)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got = step_loss_and_grads(model, compiled, idx, targets, dtype, impl=impl, **case)
    explain = torch._dynamo.explain(model)(idx, targets, impl=impl, **case)
    return got, eager, explain


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", COMPILE_CASES.values(), ids=COMPILE_CASES.keys())
def test_compiled_training_step_matches_eager(case, device):
    """torch.compile(model, fullgraph=True): the loss and every parameter's gradient equal the
    eager step's (bf16 autocast: same rounding, so a bf16-level tolerance still fails a wrong
    gradient). Dynamo sees one graph, no break, with the fused op inside it."""
    impl, backend = ("auto", "inductor") if device == "cuda" else ("chunked", "aot_eager")
    got, eager, explain = compiled_vs_eager(case, device, impl, backend)
    assert_close(got, eager, 2e-2 if "dtype" in case else 1e-5)
    assert_one_graph_with_the_op(explain)


def assert_one_graph_with_the_op(explain):
    assert (explain.graph_count, explain.graph_break_count) == (1, 0), explain.break_reasons
    assert "minilm.linear_cross_entropy" in explain.graphs[0].code


# --- The Triton kernel under the interpreter ------------------------------------------------------


def test_triton_kernel_under_interpreter():
    pytest.importorskip("triton", reason="triton is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "triton kernel ok" in out.stdout


def _check_triton_interpreted():
    """fp32 at small sizes: every reduction, bias, z_loss, softcap, ignored and all-ignored rows;
    the op with impl="triton" through opcheck, and a compiled training step against eager."""
    cases = [dict(reduction=r, **o) for r in ("mean", "sum", "none")
             for o in ({}, dict(bias=True, z_loss=1e-2, softcap=3.0))]
    for case in cases:
        case = dict(case)
        hidden, weight, bias, targets = make(n=37, v=300, d=24, bias=case.pop("bias", False))
        want = loss_and_grads(reference, hidden, weight, bias, targets, **case)
        got = loss_and_grads(linear_cross_entropy, hidden, weight, bias, targets, impl="triton",
                             chunk_size=16, **case)
        assert_close(got, want, 1e-5)
    # several BLOCK-wide pieces per row: the per-lane online max and sum across pieces
    hidden, weight, bias, targets = make(n=6, v=9000, d=8, bias=True, ignore_every=4)
    for case in (dict(), dict(z_loss=1e-2, softcap=30.0)):
        want = loss_and_grads(reference, hidden, weight, bias, targets, **case)
        got = loss_and_grads(linear_cross_entropy, hidden, weight, bias, targets, impl="triton",
                             **case)
        assert_close(got, want, 1e-5)
    targets[:] = -100
    loss, *grads = loss_and_grads(linear_cross_entropy, hidden, weight, None, targets,
                                  impl="triton")
    assert loss == 0 and all(not g.any() for g in grads)
    torch.library.opcheck(OP, op_args(impl="triton"))
    got, eager, explain = compiled_vs_eager(COMPILE_CASES["untied-bias-mean-softcap"], "cpu",
                                            "triton", "aot_eager")
    assert_close(got, eager, 1e-5)
    assert_one_graph_with_the_op(explain)
    print("triton kernel ok")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    _check_triton_interpreted()
