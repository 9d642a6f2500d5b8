"""Memory savers train exactly like the plain run: activation offload (alone, under full
and selective recompute) and optimizer offload (whole or a fraction, fp32 and bf16), and
the optimizer's kernel choices give the same update."""

import pytest
import torch

from paratron.cli.args import parse_args
from paratron.options import ConfigError
from paratron.training.trainer import Trainer
from tests.helpers.training import BASE, PatternData

LLAMA = ("--swiglu --normalization RMSNorm --position-embedding-type rope "
         "--disable-bias-linear --micro-batch-size 2 --global-batch-size 4 --train-iters 2 "
         "--num-workers 0 --hidden-dropout 0.1").split()
OFFLOAD_ONE = ["--cpu-offloading", "--cpu-offloading-num-layers", "1"]
OFFLOAD_ALL = ["--cpu-offloading", "--cpu-offloading-num-layers", "2"]


def _trainer(*extra):
    cfg = parse_args(BASE + LLAMA + list(extra))
    return Trainer(cfg, (PatternData(cfg.data.seq_length), None, None), log=lambda line: None)


def _train(*extra):
    trainer = _trainer(*extra)
    losses = trainer.train().losses
    weights = {n: p.detach().float().clone()
               for n, p in trainer.model.module.named_parameters()}
    return trainer, losses, weights


def _assert_same_run(a, b, rtol=0.0, atol=0.0):
    (_, losses_a, weights_a), (_, losses_b, weights_b) = a, b
    assert losses_a == pytest.approx(losses_b, rel=rtol, abs=atol)
    for name, w in weights_a.items():
        torch.testing.assert_close(weights_b[name], w, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(scope="module")
def plain():
    return {precision: _train(*precision) for precision in ((), ("--bf16",))}


def _offload_counts(trainer):
    o = trainer.model.module.decoder.activation_offload
    return o.packed, o.unpacked, o.bytes


# Recompute replays the same arithmetic (and dropout masks), so these equal the plain run.
@pytest.mark.parametrize("recompute", [
    ["--recompute-granularity", "full", "--recompute-method", "uniform"],
    ["--recompute-activations", "--recompute-modules", "core_attn", "mlp"]],
    ids=["full_uniform", "selective"])
def test_activation_offload_under_recompute_equals_plain_run(plain, recompute):
    run = _train(*OFFLOAD_ALL, *recompute)
    packed, unpacked, moved = _offload_counts(run[0])
    assert packed > 0 and unpacked == packed and moved > 0
    _assert_same_run(plain[()], run)


def test_activation_offload_equals_plain_run_and_covers_the_first_layers_only(plain):
    one, both = _train(*OFFLOAD_ONE), _train(*OFFLOAD_ALL)
    _assert_same_run(plain[()], one)
    _assert_same_run(plain[()], both)
    packed_one, unpacked_one, bytes_one = _offload_counts(one[0])
    packed_both, unpacked_both, bytes_both = _offload_counts(both[0])
    assert packed_one > 0 and unpacked_one == packed_one and unpacked_both == packed_both
    # Two identical layers: offloading both moves twice what offloading the first moves.
    assert 2 * packed_one == packed_both and 2 * bytes_one == bytes_both


def test_activation_offload_leaves_weights_and_evaluation_alone():
    trainer = _trainer(*OFFLOAD_ALL)
    model = trainer.model.module
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []
    offload = model.decoder.activation_offload
    original = offload._pack
    offload._pack = lambda w, t: saved.append(t.untyped_storage().data_ptr()) or original(w, t)
    tokens = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        model(tokens, labels=tokens)
    model.eval()
    model(tokens, labels=tokens).sum().backward()
    assert offload.packed == 0  # nothing saved without grad, nothing offloaded in eval
    model.train()
    model(tokens, labels=tokens).sum().backward()
    assert offload.packed > 0 and offload.unpacked == offload.packed
    assert saved and len(saved) > offload.packed  # the weights were saved, not copied
    assert weights & set(saved)


@pytest.mark.parametrize("precision,fraction", [((), "1.0"), (("--bf16",), "0.5")],
                         ids=["fp32_all", "bf16_half"])
def test_optimizer_offload_equals_plain_run(plain, precision, fraction):
    run = _train(*precision, "--optimizer-cpu-offload", "--optimizer-offload-fraction",
                 fraction)
    optimizer = run[0].optimizer
    n = len(optimizer.segments)
    assert len(optimizer.offloaded) == (n if fraction == "1.0" else n // 2)
    model_storage = {p.untyped_storage().data_ptr()
                     for p in run[0].model.module.parameters()}
    for s in optimizer.offloaded:  # its own fp32 copy and gradient staging, on the CPU
        assert s.main.device.type == "cpu" and s.main.dtype == torch.float32
        assert s.main.untyped_storage().data_ptr() not in model_storage
        assert s.host_grad.untyped_storage().data_ptr() != s.grad.untyped_storage().data_ptr()
        assert set(optimizer.optimizer.state[s.main]) >= {"exp_avg", "exp_avg_sq"}
    _assert_same_run(plain[precision], run)


# The fused kernel rounds differently: one float32 ulp (1.2e-7 at the norms' 1.0) apart.
@pytest.mark.parametrize("impl,tol", [("for-loop", 0.0), ("foreach", 0.0), ("fused", 1e-6)])
def test_optimizer_implementations_give_the_same_update(plain, impl, tol):
    run = _train("--optimizer-implementation", impl)
    kernels = run[0].optimizer.optimizer.defaults
    assert kernels["foreach"] is (True if impl == "foreach" else
                                  False if impl == "for-loop" else None)
    assert kernels["fused"] is (True if impl == "fused" else None)
    _assert_same_run(plain[()], run, rtol=tol, atol=tol / 10)


@pytest.mark.parametrize("flags,message", [
    (["--cpu-offloading"], "--cpu-offloading needs --cpu-offloading-num-layers between 1"),
    (["--cpu-offloading", "--cpu-offloading-num-layers", "3"], "between 1 and --num-layers 2"),
    (["--optimizer-cpu-offload", "--optimizer-offload-fraction", "1.5"],
     "--optimizer-offload-fraction must be in"),
])
def test_offload_flags_refused_with_one_line(flags, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_args(BASE + LLAMA + flags)
    assert "\n" not in str(info.value)
