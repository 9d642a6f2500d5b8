"""The fused (chunked) vocabulary-parallel cross entropy is the default and equals the
plain one: fp32 to rtol 1e-5, bf16 within 1 %, eager or compiled, alone and at TP2;
its forward makes no fp32 copy of the whole logits and its backward no second pass."""

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from paratron.cli.args import parse_args
from paratron.parallel.cross_entropy import (chunked_vocab_parallel_cross_entropy,
                                             default_chunk_tokens)
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.tensor_parallel import vocab_parallel_cross_entropy
from tests.helpers.dist_utils import run_distributed
from tests.helpers.training import BASE

VOCAB = 512


def _logits(dtype, b=2, s=24, v=VOCAB):
    """[b, s, v] as the output layer gives them (a view of [s, b, v]), some ignored."""
    g = torch.Generator().manual_seed(0)
    raw = (torch.randn(s, b, v, generator=g) * 4).to(dtype)
    target = torch.randint(0, v, (b, s), generator=g)
    target[0, 3] = target[1, 20] = -100
    return raw.transpose(0, 1), target


def _loss_and_grad(fn, logits, target, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, target, **kwargs)
    (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum().backward()
    return loss.detach(), x.grad


def _assert_equivalent(fast, plain, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast[1], plain[1], rtol=1e-5, atol=1e-7)
    else:
        torch.testing.assert_close(fast[0], plain[0], rtol=1e-2, atol=1e-3)
        assert fast[1].dtype == dtype
        error = (fast[1].float() - plain[1].float()).norm() / plain[1].float().norm()
        assert error < 1e-2, error


def test_fused_cross_entropy_is_the_default():
    cfg = parse_args(BASE + ["--train-iters", "1", "--micro-batch-size", "2",
                             "--global-batch-size", "2"])
    assert cfg.model.cross_entropy_loss_fusion and cfg.model.cross_entropy_chunk_size is None
    assert default_chunk_tokens(32768, "cpu") == 8  # 1 MiB of fp32 logits: cache-sized
    assert default_chunk_tokens(32768, "cuda") == 4096


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_fused_equals_plain(dtype, backend):
    logits, target = _logits(dtype)
    plain = _loss_and_grad(vocab_parallel_cross_entropy, logits, target)
    fast = _loss_and_grad(chunked_vocab_parallel_cross_entropy, logits, target,
                          chunk_tokens=10, compile_backend=backend)
    _assert_equivalent(fast, plain, dtype)


class _Recorder(TorchDispatchMode):
    """The aten operations run, with the dtype and size of each tensor they return."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((func.overloadpacket.__name__, t.dtype, t.numel()))
        return out


def test_no_fp32_copy_of_the_logits_and_a_single_backward_pass():
    logits, target = _logits(torch.bfloat16)
    x = logits.detach().requires_grad_(True)
    with _Recorder() as forward:
        loss = chunked_vocab_parallel_cross_entropy(x, target, chunk_tokens=8)
    assert max(n for _, dtype, n in forward.outputs if dtype == torch.float32) == 8 * VOCAB
    weighted = (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum()
    with _Recorder() as backward:
        weighted.backward()
    wide = [op for op, _, n in backward.outputs if n == logits.numel() and op != "detach"]
    assert wide == ["mul_"]  # the saved gradient scaled in place; detach: AccumulateGrad
    bf16_plain = _loss_and_grad(vocab_parallel_cross_entropy, logits, target)
    _assert_equivalent((loss.detach(), x.grad), bf16_plain, torch.bfloat16)


def _tp2(dtype_name):
    dtype = getattr(torch, dtype_name)
    pg = ProcessGroups.build(2, 1)
    logits, target = _logits(dtype)
    half = VOCAB // 2
    mine = logits[..., half * pg.tp.rank:half * (pg.tp.rank + 1)]
    loss, grad = _loss_and_grad(chunked_vocab_parallel_cross_entropy, mine, target,
                                pg=pg, chunk_tokens=10)
    parts = [torch.empty_like(grad) for _ in range(2)]
    dist.all_gather(parts, grad.contiguous(), group=pg.tp.group)
    return loss, torch.cat(parts, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_plain_at_tp2(dtype):
    logits, target = _logits(dtype)
    plain = _loss_and_grad(vocab_parallel_cross_entropy, logits, target)
    for fast in run_distributed(2, _tp2, str(dtype).removeprefix("torch."), timeout=120):
        _assert_equivalent(fast, plain, dtype)
