"""--moe-per-layer-logging: per MoE layer, tokens per expert, aux and z losses and the
dropped tokens, on the console and in TensorBoard, checked against the router's choices
recomputed by hand from its captured input and weight; the same global counts at EP2,
TP2 with sequence parallelism and PP2 as at one process; no host sync in a step; refused
on a dense model."""

import math
import re
from functools import partial

import pytest
import torch
import torch.distributed as dist

from paratron.cli.args import parse_args
from paratron.model.moe import moe_layers
from paratron.options import ConfigError
from paratron.parallel.process_groups import ProcessGroups
from paratron.training.moe_logging import layer_expert_load
from paratron.training.trainer import Trainer
from tests.helpers.dist_utils import run_distributed
from tests.helpers.flags import COMMON, LLAMA
from tests.helpers.sync_guard import HostSyncGuard, in_phase, outside_phase, per_entry, report
from tests.helpers.training import PatternData

EXPERTS, TOPK = 4, 2
# Layers 0 and 2 are MoE layers, layer 1 is dense; 4 micro-batches of 2 x 16 tokens.
MOE = COMMON + LLAMA + (
    f"--num-layers 3 --moe-layer-freq [1,0,1] --num-experts {EXPERTS} "
    f"--moe-ffn-hidden-size 16 --moe-router-topk {TOPK} --moe-aux-loss-coeff 0.01 "
    "--moe-z-loss-coeff 0.001 --moe-token-dispatcher-type alltoall").split()
LOGGED = ["--moe-per-layer-logging", "--log-interval", "1", "--train-iters", "2",
          "--eval-interval", "1", "--eval-iters", "1"]  # evaluation forwards do not count
CAPACITY = ["--moe-expert-capacity-factor", "1.0", "--recompute-granularity", "full",
            "--recompute-method", "uniform", "--recompute-num-layers", "1"]


def _trainer(flags, pg=None, log=lambda line: None) -> Trainer:
    data = PatternData(16, 120)
    return Trainer(parse_args(flags), (data, data, None), pg=pg, log=log)


# ------------------------------------------------------------------ counted by hand
class RouterInputs:
    """Each counted router forward's input tokens and weight, by layer number: forwards
    with autograd on, not the recompute in backward."""

    def __init__(self, trainer: Trainer):
        self.calls: dict[int, list] = {}
        for layer in moe_layers(trainer.models):
            layer.router.register_forward_hook(partial(self._record, layer.layer_number))

    def _record(self, number, router, args, output):
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
            self.calls.setdefault(number, []).append(
                (args[0].detach().float().clone(), router.weight.detach().float().clone()))


def _by_hand(calls, capacity_factor: float | None) -> dict:
    """Tokens per expert (top-k of the logits), kept tokens (min of those and the
    capacity, the probs drop policy) and the mean switch and z losses of the forwards."""
    routed, kept = torch.zeros(EXPERTS), torch.zeros(EXPERTS)
    aux, z = [], []
    for tokens, weight in calls:
        logits = tokens @ weight.T
        count = torch.bincount(logits.topk(TOPK).indices.flatten(), minlength=EXPERTS).float()
        routed += count
        n = tokens.shape[0]
        keep = (min(math.ceil(n * TOPK / EXPERTS * capacity_factor), n)
                if capacity_factor else n)
        kept += count.clamp(max=keep)
        scores = torch.softmax(logits.double(), dim=-1)
        aux.append(float(EXPERTS / (TOPK * n * n) * (scores.sum(0) * count.double()).sum()))
        z.append(float(torch.logsumexp(logits.double(), dim=-1).square().mean()))
    mean = sum(routed.tolist()) / EXPERTS
    cv = math.sqrt(sum((c - mean) ** 2 for c in routed.tolist()) / EXPERTS) / mean
    return {"min": float(routed.min()), "max": float(routed.max()), "cv": cv,
            "load_balancing_loss": sum(aux) / len(aux), "z_loss": sum(z) / len(z),
            "dropped": 1.0 - float(kept.sum() / routed.sum())}


LINE = re.compile(r" moe layer (\d+) \| tokens per expert min: ([\d.]+) max: ([\d.]+) "
                  r"cv: ([\d.]+) \| load_balancing_loss: (\S+) \| z_loss: (\S+) \|"
                  r"(?: dropped tokens: ([\d.]+)% \|)?$")


def _console(lines) -> list[dict]:
    out = []
    for line in lines:
        match = LINE.match(line)
        if match:
            layer, low, high, cv, aux, z, dropped = match.groups()
            out.append({"layer": int(layer), "min": float(low), "max": float(high),
                        "cv": float(cv), "load_balancing_loss": float(aux), "z_loss": float(z),
                        "dropped": None if dropped is None else float(dropped) / 100})
    return out


def _scalars(folder) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)}
            for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("extra", [[], CAPACITY], ids=["dropless", "capacity_recompute"])
def test_console_and_tensorboard_match_tokens_counted_by_hand(tmp_path, extra):
    lines = []
    trainer = _trainer(MOE + LOGGED + extra + ["--tensorboard-dir", str(tmp_path)],
                       log=lines.append)
    inputs = RouterInputs(trainer)
    trainer.train()
    factor = 1.0 if extra else None
    micro_batches = trainer.num_microbatches
    assert micro_batches == 4 and sorted(inputs.calls) == [0, 2]
    console = _console(lines)
    assert [c["layer"] for c in console] == [0, 2, 0, 2]  # one line per layer and log step
    scalars = _scalars(tmp_path)
    suffixes = ["load_balancing_loss", "z_loss", "tokens_per_expert_min",
                "tokens_per_expert_max", "tokens_per_expert_cv"]
    suffixes += ["dropped_token_fraction"] if factor else []
    assert {t for t in scalars if t.startswith("moe/")} == {
        f"moe/{name}_layer_{layer}" for name in suffixes for layer in (0, 2)}
    for iteration in (1, 2):
        for layer in (0, 2):
            calls = inputs.calls[layer][(iteration - 1) * micro_batches:][:micro_batches]
            want = _by_hand(calls, factor)
            logged = console[2 * (iteration - 1) + (layer == 2)]
            assert (logged["min"], logged["max"]) == (want["min"], want["max"])
            assert logged["cv"] == pytest.approx(want["cv"], abs=1e-4)
            for name in ("load_balancing_loss", "z_loss"):
                assert logged[name] == pytest.approx(want[name], rel=1e-5)
                tag = scalars[f"moe/{name}_layer_{layer}"]
                assert tag[iteration] == pytest.approx(want[name], rel=1e-5)
            for stat in ("min", "max", "cv"):
                tag = scalars[f"moe/tokens_per_expert_{stat}_layer_{layer}"]
                assert tag[iteration] == pytest.approx(want[stat], rel=1e-6)
            if factor:
                assert want["dropped"] > 0
                # Printed in per cent with two decimals.
                assert logged["dropped"] == pytest.approx(want["dropped"], abs=1e-4)
                tag = scalars[f"moe/dropped_token_fraction_layer_{layer}"]
                assert tag[iteration] == pytest.approx(want["dropped"], rel=1e-6)
            else:
                assert logged["dropped"] is None


def test_counts_are_a_mean_per_iteration_over_the_log_interval():
    lines = []
    trainer = _trainer(MOE + ["--moe-per-layer-logging", "--log-interval", "2",
                              "--train-iters", "2"], log=lines.append)
    inputs = RouterInputs(trainer)
    trainer.train()
    console = _console(lines)
    assert [c["layer"] for c in console] == [0, 2]
    for logged in console:
        want = _by_hand(inputs.calls[logged["layer"]], None)
        assert (logged["min"], logged["max"]) == (want["min"] / 2, want["max"] / 2)


def test_refused_on_a_dense_model():
    with pytest.raises(ConfigError) as error:
        parse_args(COMMON + LLAMA + ["--moe-per-layer-logging", "--train-iters", "1"])
    message = str(error.value)
    assert "--moe-per-layer-logging" in message and "--num-experts" in message
    assert "\n" not in message


def test_a_dense_model_has_no_expert_load():
    trainer = _trainer(COMMON + LLAMA + ["--train-iters", "1"])
    assert layer_expert_load(trainer.models, trainer.pg) == []


def test_a_step_does_not_wait_for_the_device_to_count():
    """Counting queues device work only: no sync inside the micro-batches, at most the
    step's one outside them (no step here is a log step)."""
    trainer = _trainer(MOE + ["--moe-per-layer-logging", "--train-iters", "2"])
    with HostSyncGuard() as guard:
        guard.mark(trainer, "train_step", "iteration")
        guard.mark(trainer.stage, "forward_backward", "micro-batches")
        trainer.train()
    inside = in_phase(guard.records, "micro-batches")
    assert not inside, "host syncs inside micro-batches:\n" + report(inside)
    outside = [r for r in outside_phase(guard.records, "micro-batches")
               if r.entries.get("iteration")]
    assert max(per_entry(outside, "iteration").values(), default=0) <= 1, report(outside)
    assert all(layer.router.load_counts.sum() > 0 for layer in moe_layers(trainer.models))


# ------------------------------------------------------------------ layouts
LAYOUTS = {  # ProcessGroups.build's (tp, pp, ep[, cp]), flags
    "ep2": ((1, 1, 2), ["--expert-model-parallel-size", "2"]),
    "tp2": ((2, 1, 1), ["--tensor-model-parallel-size", "2"]),  # TP ranks share tokens
    "tp2_sp": ((2, 1, 1), ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "cp2": ((1, 1, 1, 2), ["--context-parallel-size", "2"]),
    "pp2": ((1, 2, 1), ["--pipeline-model-parallel-size", "2"]),
}
# Four layers, so that PP2's stages hold MoE layer 0 and MoE layers 2 and 3.
STEP = MOE + ["--num-layers", "4", "--moe-layer-freq", "[1,0,1,1]", "--moe-per-layer-logging",
              "--train-iters", "1"]


def _one_step_load(flags, pg=None):
    trainer = _trainer(flags, pg)
    trainer.train_step()
    return layer_expert_load(trainer.models, trainer.pg)


def _rank(flags, tp, pp, ep, cp=1):
    pg = ProcessGroups.build(tp, pp, cp, ep)
    return _one_step_load(flags + ["--world-size", str(dist.get_world_size())], pg)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_global_counts_equal_one_process(layout):
    reference = _one_step_load(STEP)
    assert [load.layer for load in reference] == [0, 2, 3]
    assert sum(reference[0].tokens_per_expert) == 8 * 16 * TOPK  # the whole global batch
    sizes, extra = LAYOUTS[layout]
    for loads in run_distributed(2, _rank, STEP + extra, *sizes, timeout=240):
        assert [load.layer for load in loads] == [0, 2, 3]
        for load, ref in zip(loads, reference):
            assert load.tokens_per_expert == ref.tokens_per_expert
            assert load.kept_per_expert == ref.kept_per_expert
            assert load.losses.keys() == ref.losses.keys() == {"load_balancing_loss", "z_loss"}
            for name, value in load.losses.items():
                assert value == pytest.approx(ref.losses[name], rel=1e-5)
