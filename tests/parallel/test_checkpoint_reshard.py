"""A checkpoint saved in one layout loads into another, optimizer state included, and
training continues like the uninterrupted single-process run (fp32, rtol 1e-5)."""

import numpy as np
import pytest

from tests.helpers.dist_utils import run_distributed
from paratron.checkpoint import find_latest_valid, load_checkpoint, save_checkpoint
from paratron.cli.args import parse_args
from paratron.parallel.process_groups import ProcessGroups
from paratron.training.trainer import Trainer
from tests.helpers.flags import COMMON, GPT2, LLAMA
from tests.helpers.training import PatternData

ITERS, SAVED_AT = 6, 3
LAYOUTS = {  # name: (world size, (TP, PP, CP, EP), flags)
    "single": (1, (1, 1, 1, 1), []),
    "tp2": (2, (2, 1, 1, 1), ["--tensor-model-parallel-size", "2"]),
    "dp2_distopt": (2, (1, 1, 1, 1), ["--use-distributed-optimizer"]),
    "pp2": (2, (1, 2, 1, 1), ["--pipeline-model-parallel-size", "2"]),
    "ep2_distopt": (2, (1, 1, 1, 2), ["--expert-model-parallel-size", "2",
                                      "--use-distributed-optimizer"]),
    "tp2_pp2_dp2_distopt": (8, (2, 2, 1, 1), ["--tensor-model-parallel-size", "2",
                                              "--pipeline-model-parallel-size", "2",
                                              "--use-distributed-optimizer"]),
    "dp4": (4, (1, 1, 1, 1), []),
    "tp4_dp2": (8, (4, 1, 1, 1), ["--tensor-model-parallel-size", "4"]),
}
MOE = ("--swiglu --normalization RMSNorm --position-embedding-type rope "
       "--disable-bias-linear --untie-embeddings-and-output-weights --num-experts 4 "
       "--moe-ffn-hidden-size 16 --moe-router-topk 2 --moe-aux-loss-coeff 0.01 "
       "--moe-token-dispatcher-type alltoall --group-query-attention "
       "--num-query-groups 2").split()


def _trainer(flags, layout):
    world, sizes, extra = LAYOUTS[layout]
    pg = ProcessGroups.build(*sizes) if world > 1 else None
    flags = flags + extra + (["--world-size", str(world)] if world > 1 else [])
    return Trainer(parse_args(flags), (PatternData(16, 120), None, None), pg=pg,
                   log=lambda line: None)


def _save_run(flags, layout, save_dir):
    trainer = _trainer(flags, layout)
    for _ in range(SAVED_AT):
        trainer.state.losses.append(trainer.train_step()[0])
        trainer.state.iteration += 1
    save_checkpoint(save_dir, trainer.state.iteration, trainer.models, trainer.pg,
                    trainer.optimizer, config=trainer.cfg.to_dict(),
                    train_state={"iteration": trainer.state.iteration,
                                 "consumed_train_samples":
                                     trainer.state.consumed_train_samples})
    return trainer.state.losses


def _load_run(flags, layout, save_dir):
    trainer = _trainer(flags, layout)
    _, path = find_latest_valid(save_dir)
    meta = load_checkpoint(path, trainer.models, trainer.pg, trainer.optimizer,
                           log=lambda line: None)  # other layout: RNG not restored
    for key, value in meta["train_state"].items():
        setattr(trainer.state, key, value)
    return trainer.train().losses


def _run(flags, layout, fn, save_dir):
    world = LAYOUTS[layout][0]
    if world == 1:
        return fn(flags, layout, save_dir)
    return run_distributed(world, fn, flags, layout, save_dir, timeout=240)[0]


@pytest.mark.parametrize("arch,saved,loaded", [("llama", "tp2", "single"),
                                               ("llama", "dp2_distopt", "tp2"),
                                               ("gpt2", "pp2", "single"),
                                               ("gpt2", "single", "pp2"),
                                               ("moe", "ep2_distopt", "single"),
                                               ("moe", "single", "ep2_distopt")])
@pytest.mark.slow
def test_resume_in_another_layout(tmp_path, arch, saved, loaded):
    flags = COMMON + {"llama": LLAMA, "gpt2": GPT2, "moe": MOE}[arch] + ["--train-iters", str(ITERS)]
    reference = _trainer(flags, "single").train().losses
    first = _run(flags, saved, _save_run, str(tmp_path))
    np.testing.assert_allclose(first, reference[:SAVED_AT], rtol=1e-5)
    rest = _run(flags, loaded, _load_run, str(tmp_path))
    np.testing.assert_allclose(rest, reference[SAVED_AT:], rtol=1e-5)


@pytest.mark.slow
def test_resume_at_tp2_pp2_dp2_checkpoint_at_dp4_and_tp4(tmp_path):
    """Saved by 8 ranks at TP2 x PP2 x DP2 with the distributed optimizer; resumed by 4
    ranks at TP1 PP1 DP4 and by 8 at TP4 PP1 DP2 (GQA with 2 groups: K/V replicated)."""
    flags = COMMON + LLAMA + ["--train-iters", str(ITERS)]
    reference = _trainer(flags, "single").train().losses
    first = _run(flags, "tp2_pp2_dp2_distopt", _save_run, str(tmp_path))
    np.testing.assert_allclose(first, reference[:SAVED_AT], rtol=1e-5)
    for layout in ("dp4", "tp4_dp2"):
        rest = _run(flags, layout, _load_run, str(tmp_path))
        np.testing.assert_allclose(rest, reference[SAVED_AT:], rtol=1e-5, err_msg=layout)
