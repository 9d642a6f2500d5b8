"""`paratron replay`: re-run one training iteration of a saved run on the CPU.

    paratron replay --load checkpoints/gpt2 --iteration 1200
    paratron replay --load checkpoints/gpt2 --iteration 1200 --micro-batch 3 --dump dump/

Rebuilds the global batch of iteration N from the data settings the checkpoint records,
loads the newest checkpoint saved before N (any layout), trains up to N-1 and runs N at
one process watching every op: the loss, the loss of each sample and the worst sample's
tokens, the first NaN/Inf with the module and op that produced it, statistics of each
module's output and gradient, and the expert load of MoE layers. Training flags given
here replace the recorded ones (a checkpoint imported from Megatron-LM records no data
settings: give --data-path and the data flags the run had).
"""

from __future__ import annotations

import sys

from paratron.checkpoint.files import CheckpointError
from paratron.cli.args import NumberType, build_parser
from paratron.data.errors import DataError
from paratron.options import ConfigError

PROG = "paratron replay"
_REPLAY_FLAGS = ("iteration", "micro_batch", "dump", "config", "model_size")


def parse(argv: list[str]):
    """(replay flags, training flags given, by dest name) of the command line."""
    parser = build_parser(PROG)
    parser.description = ("Re-run iteration N of a saved run on the CPU at one process, "
                          "watching every op. Training flags replace the checkpoint's.")
    group = parser.add_argument_group("replay")
    group.add_argument("--iteration", type=NumberType(int), required=True, metavar="N",
                       help="The iteration to replay (1 is the first step of the run).")
    group.add_argument("--micro-batch", type=NumberType(int), metavar="K",
                       help="Run only micro-batch K (0-based, of the global batch split "
                            "into micro-batches at one process) of iteration N.")
    group.add_argument("--dump", metavar="DIR",
                       help="Write the batch, each module's output and output gradient and "
                            "each weight's gradient to DIR/iteration_<N>.safetensors.")
    ns = parser.parse_args(argv)
    if getattr(ns, "config", None) or getattr(ns, "model_size", None):
        raise ConfigError("--config and --model-size: replay takes the run's settings from "
                          "the checkpoint; give single flags to change them")
    if getattr(ns, "load", None) is None:
        raise ConfigError("--load <checkpoint directory> is required")
    if ns.iteration < 1:
        raise ConfigError(f"--iteration {ns.iteration}: no such iteration (the first is 1)")
    overrides = {k: v for k, v in vars(ns).items()
                 if k not in (*_REPLAY_FLAGS, "load") and not k.startswith("_ignored_")}
    return ns, overrides


def main(argv: list[str] | None = None) -> int:
    from paratron.debug.replay import ReplayError, dump, load_replay, replay, report

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ns, overrides = parse(argv)
        trainer, _, tokenizer = load_replay(ns.load, ns.iteration, overrides)
        result = replay(trainer, ns.iteration, micro_batch=ns.micro_batch,
                        keep_tensors=ns.dump is not None)
    except (ConfigError, DataError, ReplayError, CheckpointError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    print("\n".join(report(result, tokenizer)))
    if ns.dump is not None:
        print(f" wrote the step's tensors to {dump(result, ns.dump)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
