"""The single-process trainer: micro-batch split, recompute and seeds change nothing."""

import numpy as np
import pytest
import torch

from tests.helpers.training import make_trainer


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.module.named_parameters()}


@pytest.mark.parametrize("optimizer,atol", [(("--optimizer", "sgd"), 1e-10),
                                             (("--adam-eps", "1e-5"), 1e-7)])
def test_micro_batch_split_gives_the_same_update(optimizer, atol):
    """Global batch 8 as 1x8, 2x4 and 8x1 micro-batches.

    The key bias has an analytically zero gradient (softmax ignores a shift shared by
    all keys), so its float noise differs with the summation order; Adam's first step
    turns any nonzero gradient into +-lr unless eps damps it, hence SGD and a damped
    Adam, with an absolute floor far below the updates' size (1e-3).
    """
    results = []
    for micro in (1, 2, 8):
        trainer = make_trainer("--train-iters", "2", "--global-batch-size", "8",
                               "--micro-batch-size", str(micro), "--hidden-dropout", "0",
                               "--attention-dropout", "0", *optimizer)
        assert trainer.num_microbatches == 8 // micro
        state = trainer.train()
        results.append((state.losses, weights(trainer)))
    for losses, w in results[1:]:
        np.testing.assert_allclose(losses, results[0][0], rtol=1e-6)
        for name, value in w.items():
            torch.testing.assert_close(value, results[0][1][name], rtol=1e-6, atol=atol,
                                       msg=name)


def _grads_after_one_backward(*flags):
    trainer = make_trainer("--train-iters", "1", "--global-batch-size", "4",
                           "--micro-batch-size", "2", "--num-layers", "4",
                           "--swiglu", "--normalization", "RMSNorm",
                           "--position-embedding-type", "rope", *flags)
    torch.manual_seed(7)  # same dropout masks in every variant
    trainer.train_step()
    return {n: p.main_grad.clone() for n, p in trainer.model.module.named_parameters()}


@pytest.mark.parametrize("flags", [
    ("--recompute-granularity", "full", "--recompute-method", "uniform",
     "--recompute-num-layers", "1"),
    ("--recompute-granularity", "full", "--recompute-method", "uniform",
     "--recompute-num-layers", "2"),
    ("--recompute-granularity", "full", "--recompute-method", "block",
     "--recompute-num-layers", "3"),
    ("--recompute-granularity", "selective"),
    ("--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp",
     "layernorm"),
    ("--recompute-activations",),
])
def test_recompute_gives_the_same_gradients(flags):
    reference = _grads_after_one_backward()
    recomputed = _grads_after_one_backward(*flags)
    for name, grad in reference.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=0, atol=0, msg=name)


def test_recompute_actually_recomputes():
    """Full recompute keeps fewer activations: the layer forward runs twice per step."""
    trainer = make_trainer("--train-iters", "1", "--global-batch-size", "2",
                           "--recompute-granularity", "full", "--recompute-method",
                           "uniform", "--recompute-num-layers", "1")
    calls = []
    layer = trainer.model.module.decoder.layers[0]
    layer.mlp.register_forward_hook(lambda *a: calls.append(1))
    trainer.train_step()
    assert len(calls) == 2 * trainer.num_microbatches


def test_same_seed_gives_bit_identical_losses():
    runs = [make_trainer("--train-iters", "5", "--global-batch-size", "4",
                         "--micro-batch-size", "2").train().losses for _ in range(2)]
    assert runs[0] == runs[1]
    other = make_trainer("--train-iters", "5", "--global-batch-size", "4",
                         "--micro-batch-size", "2", "--seed", "99").train().losses
    assert other != runs[0]


def test_a_trainer_is_freed_without_the_cycle_collector():
    """No reference cycle through the trainer: a data loader's worker processes are
    stopped by its iterator's finaliser, which cannot reach them when the cyclic
    collector has already torn the loader's queues down (each worker then costs a 5 s
    join timeout at exit)."""
    import gc
    import weakref

    trainer = make_trainer("--train-iters", "1", "--global-batch-size", "2",
                           "--micro-batch-size", "2", "--num-workers", "1")
    trainer.train()
    ref = weakref.ref(trainer)
    gc.disable()
    try:
        del trainer
        assert ref() is None
    finally:
        gc.enable()
