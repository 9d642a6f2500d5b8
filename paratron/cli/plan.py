"""`paratron plan`: per-GPU memory of the parallel layouts of a run, and one to pick.

    paratron plan --model-size qwen2.5-7b --num-gpus 8 --gpu-memory-gb 80 \\
        --seq-length 4096 --micro-batch-size 1 --global-batch-size 64 --bf16 \\
        --use-distributed-optimizer

Takes the training command's flags plus the machine (--num-gpus, --gpu-memory-gb in GiB)
and prints every TP x PP x CP (x EP) split `paratron train` would accept with the bytes
the busiest GPU holds, and a recommendation (rule in `paratron.training.memory_plan`).
Parallel sizes given on the command line stay fixed. Exit code 1 when no layout fits.

With --check-communication it plans no memory: it checks that the layout the flags give
(--num-gpus, the parallel sizes, virtual stages, uneven stages, batch sizes) sends and
receives in an order NCCL completes (`paratron.parallel.schedule_check`), prints
"deadlock-free" or the first mismatched pair or circular wait with the ranks' queues, and
exits 1 on a problem.
"""

from __future__ import annotations

import argparse
import copy
import sys

from paratron.cli.args import NumberType, parse_args
from paratron.options import ConfigError
from paratron.parallel.launch import launched_world_size

PROG = "paratron plan"

# Features whose memory the planner does not model: refused rather than ignored.
NOT_MODELLED = (("cpu_offloading", "--cpu-offloading"),
                ("optimizer_cpu_offload", "--optimizer-cpu-offload"))

PINNABLE = {"--tensor-model-parallel-size": "tp", "--pipeline-model-parallel-size": "pp",
            "--context-parallel-size": "cp", "--expert-model-parallel-size": "ep"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def _machine_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, allow_abbrev=False, add_help=False)
    # NaN and infinities are invalid values; the ranges are checked in `build`.
    parser.add_argument("--num-gpus", type=NumberType(int), required=True)
    parser.add_argument("--gpu-memory-gb", type=NumberType(float))
    parser.add_argument("--memory-headroom", type=NumberType(float), default=0.1)
    parser.add_argument("--max-rows", type=NumberType(int), default=30)
    parser.add_argument("--gpus-per-node", type=NumberType(int), default=8)
    parser.add_argument("--check-communication", action="store_true")
    return parser


USAGE = f"""usage: {PROG} --num-gpus N --gpu-memory-gb G [--memory-headroom F] [--max-rows R]
                     [--gpus-per-node P] <paratron train flags>
       {PROG} --check-communication --num-gpus N <paratron train flags>

  --num-gpus N          GPUs of the job
  --gpu-memory-gb G     memory of one GPU in GiB (80 for an H100 80GB)
  --memory-headroom F   fraction of G kept free for the CUDA context, NCCL and
                        allocator fragmentation (default 0.1)
  --max-rows R          layouts shown, best first (default 30)
  --gpus-per-node P     GPUs that share a node's fast links (default 8): tensor
                        parallelism stays within them
  --check-communication check instead that the pipeline's sends and receives and the
                        expert all-to-alls of the given layout cannot hang on NCCL

The model, batch, precision, recompute and parallel flags are those of
'paratron train' (see 'paratron train --help'); parallel sizes given are kept fixed.
"""


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _pinned(argv: list[str], cfg) -> dict[str, int]:
    p = cfg.parallel
    values = {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
              "cp": p.context_parallel_size, "ep": p.expert_model_parallel_size}
    return {dim: values[dim] for flag, dim in PINNABLE.items() if _given(argv, flag)}


def build(argv: list[str]):
    """(base config, machine arguments, pinned sizes) from the command line."""
    machine, rest = _machine_parser().parse_known_args(argv)
    if machine.num_gpus <= 0:
        raise ConfigError(f"--num-gpus must be positive, got {machine.num_gpus}")
    if machine.gpu_memory_gb is None and not machine.check_communication:
        raise ConfigError("the following arguments are required: --gpu-memory-gb")
    if machine.gpu_memory_gb is not None and machine.gpu_memory_gb <= 0:
        raise ConfigError(f"--gpu-memory-gb must be positive, got {machine.gpu_memory_gb}")
    if not 0 <= machine.memory_headroom < 1:
        raise ConfigError(f"--memory-headroom must be in [0, 1), got {machine.memory_headroom}")
    if machine.max_rows <= 0:
        raise ConfigError(f"--max-rows must be positive, got {machine.max_rows}")
    if machine.gpus_per_node <= 0:
        raise ConfigError(f"--gpus-per-node must be positive, got {machine.gpus_per_node}")
    if launched_world_size() > 1:
        raise ConfigError("paratron plan runs as one process: unset WORLD_SIZE (the GPUs "
                          "come from --num-gpus)")
    if not (_given(rest, "--global-batch-size") or _given(rest, "--config")):
        raise ConfigError("--global-batch-size is required: the micro-batches per step "
                          "decide how many a pipeline stage holds")
    for flag in ("--world-size", "--rank"):
        if _given(rest, flag):
            raise ConfigError(f"{flag} does not apply to a plan; give --num-gpus")
    cfg = parse_args(rest, prog=PROG, check=False)
    if _given(rest, "--sequence-parallel"):
        # Parsing finalizes at one process, which turns it off; each layout with TP > 1
        # gets it back.
        cfg.parallel.sequence_parallel = True
    for section in (cfg.model, cfg.training, cfg.optimizer):
        for name, flag in NOT_MODELLED:
            if getattr(section, name, False) and not machine.check_communication:
                raise ConfigError(f"{flag}: the planner does not model its memory yet; "
                                  f"plan without it")
    # Settings that change no byte of memory but that validation asks for.
    if cfg.training.train_iters is None and cfg.training.train_samples is None:
        cfg.training.train_iters = 1
    if cfg.optimizer.lr is None:
        cfg.optimizer.lr = 1e-4
        cfg.optimizer.min_lr = min(cfg.optimizer.min_lr, cfg.optimizer.lr)
    m = cfg.model
    if m.padded_vocab_size is None and m.vocab_size is None:
        raise ConfigError("the vocabulary size is unknown: give --vocab-size or "
                          "--padded-vocab-size (or a --model-size preset)")
    return cfg, machine, _pinned(rest, cfg)


def _check_model(cfg):
    """Refuse model and batch settings that no layout could fix, before enumerating;
    the run on one GPU with one micro-batch per step."""
    from paratron.training.memory_plan import Layout, layout_config

    base = copy.deepcopy(cfg)
    base.training.global_batch_size = base.training.micro_batch_size
    p = base.parallel
    p.decoder_first_pipeline_num_layers = p.decoder_last_pipeline_num_layers = None
    p.num_layers_per_virtual_pipeline_stage = p.num_virtual_stages_per_pipeline_rank = None
    p.account_for_embedding_in_pipeline_split = False
    p.account_for_loss_in_pipeline_split = False
    p.sequence_parallel = False
    return layout_config(base, Layout(1))


def _floor_per_gpu(single, num_gpus: int) -> float:
    """What the busiest GPU holds at the very least in any layout: one GPU's state and
    one micro-batch's activations, spread perfectly over all of them. A model far too
    big is answered from this in a moment instead of planning every layout tensor by
    tensor."""
    from paratron.training.memory_plan import minimum_rank_bytes

    return minimum_rank_bytes(single) / num_gpus


def _table(rows, budget: float, title: str, width: int):
    from rich.console import Console
    from rich.table import Table

    from paratron.training.memory_plan import gib

    table = Table(title=title, title_justify="left")
    for name in ("layout", "weights", "grads", "optimizer", "activations", "comm",
                 "total GiB", "total + full recompute", "verdict"):
        table.add_column(name, justify="left" if name in ("layout", "verdict") else "right")
    for cand in rows:
        mem, rc = cand.memory, cand.recompute_memory
        needs = cand.needs_recompute(budget)
        verdict = {False: "fits", True: "fits with recompute", None: "too big"}[needs]
        table.add_row(cand.layout.label(), gib(mem.weights), gib(mem.grads),
                      gib(mem.optimizer), gib(mem.activations), gib(mem.communication),
                      gib(mem.total), gib(rc.total) if rc is not None else "-", verdict)
    Console(file=sys.stdout, width=width, highlight=False, color_system=None).print(table)


def _flags(layout, recompute: bool) -> str:
    parts = [f"--tensor-model-parallel-size {layout.tp}",
             f"--pipeline-model-parallel-size {layout.pp}"]
    if layout.first_stage_layers:
        parts.append(f"--decoder-first-pipeline-num-layers {layout.first_stage_layers}")
    if layout.cp > 1:
        parts.append(f"--context-parallel-size {layout.cp}")
    if layout.ep > 1:
        parts.append(f"--expert-model-parallel-size {layout.ep}")
    if recompute:
        parts.append("--recompute-granularity full --recompute-method uniform "
                     "--recompute-num-layers 1")
    return " ".join(parts)


def _check_communication(cfg, num_gpus: int) -> int:
    """--check-communication: the layout the flags give, its training step and its
    evaluation checked under NCCL's rules; 0 when deadlock-free."""
    from paratron.parallel.config import rank_chunks, virtual_stages
    from paratron.parallel.schedule_check import check_communication
    from paratron.training.memory_plan import Layout, layout_config

    p = cfg.parallel
    layout = Layout(num_gpus, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                    p.context_parallel_size, p.expert_model_parallel_size,
                    p.expert_tensor_parallel_size)
    cfg = layout_config(cfg, layout)
    t, vpp = cfg.training, virtual_stages(cfg)
    micro = t.global_batch_size // (t.micro_batch_size * layout.dp)
    problem = check_communication(layout.pp, vpp, micro, ep=layout.ep,
                                  chunks_of=lambda rank: rank_chunks(cfg, rank))
    if problem:
        print(problem)
        return 1
    print(f"deadlock-free: {layout.label()} with {vpp} virtual stage{'s' * (vpp > 1)} "
          f"and {micro} micro-batches per step, training and evaluation")
    return 0


def main(argv: list[str] | None = None) -> int:
    from paratron.training.memory_plan import GIB, gib, plan, preference, recommend

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        sys.stdout.write(USAGE)
        return 0
    try:
        cfg, machine, pinned = build(argv)
        if machine.check_communication:
            return _check_communication(cfg, machine.num_gpus)
        floor = _floor_per_gpu(_check_model(cfg), machine.num_gpus)
        budget = machine.gpu_memory_gb * GIB * (1 - machine.memory_headroom)
        if floor > budget:
            print(f"recommendation: none fits in {gib(budget)} GiB per GPU; even spread "
                  f"evenly over {machine.num_gpus} GPUs the run needs at least {gib(floor)} "
                  f"GiB per GPU: add GPUs, or shrink the model, --micro-batch-size or "
                  f"--seq-length")
            return 1
        candidates, refused = plan(cfg, machine.num_gpus, pinned,
                                   max_tp=machine.gpus_per_node)
    except ConfigError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    if not candidates:
        layout, why = refused[0]
        sys.stderr.write(f"{PROG}: error: no split of {machine.num_gpus} GPUs is valid "
                         f"({layout.label()}: {why})\n")
        return 2
    ranked = sorted(candidates, key=lambda c: preference(c, budget))
    name = cfg.model_size or "model"
    title = (f"{name} on {machine.num_gpus} x {machine.gpu_memory_gb:g} GiB: per-GPU "
             f"memory in GiB of the busiest rank (usable {gib(budget)} GiB, "
             f"{machine.memory_headroom:.0%} headroom)")
    _table(ranked[:machine.max_rows], budget, title, width=150)
    if len(ranked) > machine.max_rows:
        print(f"({len(ranked) - machine.max_rows} more layouts not shown; --max-rows)")
    if refused:
        print(f"({len(refused)} other splits refused by validation, e.g. "
              f"{refused[0][0].label()}: {refused[0][1]})")
    best = recommend(candidates, budget)
    if best is None:
        smallest = min(candidates, key=lambda c: (c.recompute_memory or c.memory).total)
        need = (smallest.recompute_memory or smallest.memory).total
        print(f"recommendation: none fits in {gib(budget)} GiB per GPU; the smallest, "
              f"{smallest.layout.label()}, needs {gib(need)} GiB: add GPUs, lower "
              f"--micro-batch-size or --seq-length")
        return 1
    recompute = bool(best.needs_recompute(budget))
    memory = best.recompute_memory if recompute else best.memory
    print(f"recommendation: {best.layout.label()}"
          f"{' with full recompute' if recompute else ''}, {gib(memory.total)} of "
          f"{machine.gpu_memory_gb:g} GiB per GPU: {_flags(best.layout, recompute)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
