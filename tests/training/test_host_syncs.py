"""A training step never waits for the device inside its micro-batches and at most once
per iteration outside log steps (DESIGN, principle 8): dense Llama, MoE at EP 1 and 2,
PP 2 with 4 micro-batches. At EP 2 the token dispatch may read one split-size exchange
per MoE layer and micro-batch forward (the all-to-all needs its sizes on the host); the
backward reuses them. The guard counts calls that would sync on CUDA: see sync_guard."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from paratron.cli.args import parse_args
from paratron.parallel.process_groups import ProcessGroups
from paratron.training.metrics import ITERATION_TIMERS
from paratron.training.optimizer import _implementation
from paratron.training.timers import Timers
from paratron.training.trainer import Trainer
from tests.helpers.dist_utils import run_distributed
from tests.helpers.flags import COMMON, LLAMA
from tests.helpers.sync_guard import (HostSyncGuard, in_phase, outside_phase, per_entry,
                                      report)
from tests.helpers.training import PatternData, make_trainer

FLAGS = COMMON + LLAMA + ["--train-iters", "3"]  # --log-interval 1000: none of them logs
MOE = ("--num-experts 4 --moe-ffn-hidden-size 16 --moe-router-topk 2 "
       "--moe-aux-loss-coeff 0.01 --moe-token-dispatcher-type alltoall").split()
MOE_LAYERS = 2  # --num-layers of COMMON, every one an MoE layer
EXCHANGE = "paratron/parallel/expert_parallel.py"  # where the split sizes are read


def _train_guarded(flags, pg=None) -> tuple[list, int]:
    """Records of a short run, with its number of micro-batches per iteration."""
    trainer = Trainer(parse_args(flags), (PatternData(16, 120), None, None), pg=pg,
                      log=lambda line: None)
    with HostSyncGuard() as guard:
        guard.mark(trainer, "train_step", "iteration")
        guard.mark(trainer.stage, "forward_backward", "micro-batches")
        for model in trainer.models:
            guard.mark(model, "forward", "forward")
        guard.mark(torch.autograd, "backward", "backward")
        trainer.train()
    return guard.records, trainer.num_microbatches


def _rank(flags, pp, ep):
    pg = ProcessGroups.build(1, pp, 1, ep)
    return _train_guarded(flags + ["--world-size", str(dist.get_world_size())], pg)


def _check(records, exchanges_allowed: bool = False) -> None:
    """No sync in the micro-batches (but the split-size exchanges at EP > 1, one per MoE
    layer and micro-batch forward, none in the backward), at most one per iteration."""
    inside = in_phase(records, "micro-batches")
    exchanges = [r for r in inside if exchanges_allowed and r.where.startswith(EXCHANGE)
                 and "forward" in r.phases and "backward" not in r.phases]
    others = [r for r in inside if r not in exchanges]
    assert not others, "host syncs inside micro-batches:\n" + report(others)
    assert max(per_entry(exchanges, "forward").values(), default=0) <= MOE_LAYERS, \
        "more than one split-size exchange per MoE layer:\n" + report(exchanges)
    outside = [r for r in outside_phase(records, "micro-batches") if r.entries.get("iteration")]
    worst = max(per_entry(outside, "iteration").values(), default=0)
    assert worst <= 1, "more than one host sync per iteration:\n" + report(outside)


@pytest.mark.parametrize("extra", [[], MOE], ids=["dense", "moe_ep1"])
def test_single_process_steps_do_not_wait_for_the_device(extra):
    records, _ = _train_guarded(FLAGS + extra)
    _check(records)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["moe_ep2", "pp2"])
def test_parallel_steps_do_not_wait_for_the_device(layout):
    flags, pp, ep = {"moe_ep2": (FLAGS + MOE + ["--expert-model-parallel-size", "2"], 1, 2),
                     "pp2": (FLAGS + ["--pipeline-model-parallel-size", "2"], 2, 1)}[layout]
    for records, micro_batches in run_distributed(2, _rank, flags, pp, ep, timeout=240):
        assert micro_batches == (4 if layout == "pp2" else 2)
        _check(records, exchanges_allowed=ep > 1)


def test_loss_counted_on_the_device_is_the_plain_mean_of_the_global_batch():
    """The loss summed and counted on the device, read once with the optimizer's numbers,
    is the per-token mean of the global batch computed plainly (fp32)."""
    trainer = make_trainer("--train-iters", "1", "--micro-batch-size", "2",
                           "--global-batch-size", "8", "--hidden-dropout", "0",
                           "--attention-dropout", "0", *LLAMA)
    model, data = trainer.model.module, trainer.train_ds
    loss_sum, tokens = 0.0, 0.0
    with torch.no_grad():
        for sample in (data[i] for i in range(8)):
            logits = model(torch.as_tensor(sample["tokens"])[None],
                           torch.as_tensor(sample["position_ids"])[None])
            per_token = F.cross_entropy(logits[0].float(), torch.as_tensor(sample["labels"]),
                                        reduction="none")
            mask = torch.as_tensor(sample["loss_mask"])
            loss_sum, tokens = loss_sum + float((per_token * mask).sum()), tokens + float(
                mask.sum())
    loss, stepped, _, _ = trainer.train_step()
    assert stepped and loss == pytest.approx(loss_sum / tokens, rel=1e-5)


def test_auto_optimizer_is_fused_on_cuda_and_foreach_elsewhere():
    assert _implementation("auto", torch.device("cuda", 0)) == {"fused": True}
    assert _implementation("auto", torch.device("cpu")) == {"foreach": True}


def test_timers_wait_for_the_device_only_at_their_reported_level():
    """At the default --timing-log-level 0 no timer of a step waits for the device."""
    timers = Timers(0, torch.device("cuda", 0), world_size=2)
    with HostSyncGuard() as guard:
        for name in ITERATION_TIMERS:
            with timers(name):
                pass
    assert not guard.records, report(guard.records)
