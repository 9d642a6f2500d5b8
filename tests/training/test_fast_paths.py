"""Optional fast paths equal the plain path on CPU: the chunked cross entropy (alone,
against F.cross_entropy, at TP2, in training), torch.compile per layer, and FP8 stays
refused."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.helpers.dist_utils import run_distributed
from paratron.cli.args import parse_args
from paratron.options import ConfigError
from paratron.parallel.cross_entropy import chunked_vocab_parallel_cross_entropy
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.tensor_parallel import vocab_parallel_cross_entropy
from paratron.training.trainer import Trainer
from tests.helpers.training import BASE, PatternData

LLAMA = ("--swiglu --normalization RMSNorm --position-embedding-type rope "
         "--disable-bias-linear --micro-batch-size 2 --global-batch-size 4 --train-iters 2 "
         "--num-workers 0 --hidden-dropout 0 --attention-dropout 0").split()


def _logits(dtype=torch.float32, b=3, s=10, v=64, seed=0):
    """[b, s, v] logits laid out as the output layer gives them: a view of [s, b, v]."""
    g = torch.Generator().manual_seed(seed)
    raw = (torch.randn(s, b, v, generator=g) * 3).to(dtype)
    target = torch.randint(0, v, (b, s), generator=g)
    target[0, 1] = target[2, 7] = -100  # ignored positions
    return raw.transpose(0, 1), target


def _loss_and_grad(fn, logits, target, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, target, **kwargs)
    weights = torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)
    (loss * weights).sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("chunk", [1, 4, 7, 30, 10_000])
def test_chunked_cross_entropy_equals_plain_and_torch(chunk):
    logits, target = _logits()
    plain = _loss_and_grad(vocab_parallel_cross_entropy, logits, target)
    chunked = _loss_and_grad(chunked_vocab_parallel_cross_entropy, logits, target,
                             chunk_tokens=chunk)
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked[1], plain[1], rtol=1e-5, atol=1e-7)
    reference = _loss_and_grad(lambda x, t: F.cross_entropy(
        x.transpose(1, 2), t, reduction="none"), logits, target)  # independent
    torch.testing.assert_close(chunked[0], reference[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked[1], reference[1], rtol=1e-6, atol=1e-7)
    assert chunked[1].stride() == logits.stride()  # gradient in the logits' layout


def test_chunked_cross_entropy_bf16_gradient_is_bf16_and_close():
    logits, target = _logits(torch.bfloat16)
    plain = _loss_and_grad(vocab_parallel_cross_entropy, logits, target)
    chunked = _loss_and_grad(chunked_vocab_parallel_cross_entropy, logits, target,
                             chunk_tokens=5)
    assert chunked[0].dtype == torch.float32 and chunked[1].dtype == torch.bfloat16
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-6)
    # softmax - one-hot is rounded to bf16 before the scale: one rounding more.
    torch.testing.assert_close(chunked[1].float(), plain[1].float(), rtol=1e-2, atol=1e-4)


def _tp2_cross_entropy(chunk):
    pg = ProcessGroups.build(2, 1)
    logits, target = _logits(v=64)
    mine = logits[..., 32 * pg.tp.rank:32 * (pg.tp.rank + 1)]
    loss, grad = _loss_and_grad(chunked_vocab_parallel_cross_entropy, mine, target,
                                pg=pg, chunk_tokens=chunk)
    parts = [torch.empty_like(grad) for _ in range(2)]
    dist.all_gather(parts, grad.contiguous(), group=pg.tp.group)
    return loss, torch.cat(parts, dim=-1)


def test_chunked_cross_entropy_vocab_parallel_tp2():
    logits, target = _logits(v=64)
    reference = _loss_and_grad(vocab_parallel_cross_entropy, logits, target)
    for loss, grad in run_distributed(2, _tp2_cross_entropy, 4, timeout=120):
        torch.testing.assert_close(loss, reference[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, reference[1], rtol=1e-6, atol=1e-7)


def _train(*extra):
    cfg = parse_args(BASE + LLAMA + list(extra))
    trainer = Trainer(cfg, (PatternData(cfg.data.seq_length), None, None),
                      log=lambda line: None)
    losses = trainer.train().losses
    return trainer, losses, {n: p.detach().float().clone()
                             for n, p in trainer.model.module.named_parameters()}


@pytest.fixture(scope="module")
def plain():
    return _train("--no-cross-entropy-loss-fusion")


def _assert_same(a, b, rtol=0.0, atol=0.0):
    np.testing.assert_allclose(b[1], a[1], rtol=rtol, atol=atol)
    for name, w in a[2].items():
        torch.testing.assert_close(b[2][name], w, rtol=rtol, atol=atol, msg=name)


def test_training_with_chunked_cross_entropy_equals_plain(plain):
    # The fused loss rounds differently (torch's log-softmax), so a gradient element near
    # zero can change sign and Adam, which normalises it, moves that weight by about lr
    # the other way: weights within 1e-5 (a hundredth of lr 1e-3), losses within 1e-6.
    _assert_same(plain, _train("--cross-entropy-chunk-size", "5"), rtol=1e-6, atol=1e-5)


def test_torch_compile_per_layer_equals_eager():
    # The eager backend runs dynamo's capture of each layer (guards, graph breaks) without
    # inductor's C++ compilation, tens of seconds on a small CPU (inductor matched eager
    # to 5e-7 in a one-off forward check). One layer and two steps keep the capture short.
    small = ["--num-layers", "1"]
    eager = _train(*small)
    trainer, *run = _train(*small, "--torch-compile", "--torch-compile-backend", "eager")
    for layer in trainer.model.module.decoder.layers:
        assert layer._compiled_call_impl is not None  # compiled in place, names unchanged
    assert set(run[1]) == set(eager[2])
    _assert_same(eager, (trainer, *run), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flags,message", [
    (["--fp8-format", "hybrid", "--fp8-recipe", "delayed"],
     "--fp8-recipe delayed is not implemented"),
    (["--torch-compile", "--recompute-activations"], "--torch-compile compiles whole layers"),
    (["--cross-entropy-chunk-size", "0"],
     "--cross-entropy-chunk-size must be positive"),
])
def test_fast_path_refusals(flags, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_args(BASE + LLAMA + flags)
    assert "\n" not in str(info.value)
