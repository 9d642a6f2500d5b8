"""The parallel layout's settings (`ParallelConfig`, `cfg.parallel`), the pipeline split
and context-parallel checks they ask for. The functions read the run's whole `Config`
(layer count, batch and sequence sizes) without importing it, which sits above."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from paratron.options import ConfigError, opt
from paratron.parallel.pipeline import Chunk, model_chunks


@dataclass
class ParallelConfig:
    """How the run is laid out over processes."""

    GROUP: ClassVar[str] = "distributed"

    tensor_model_parallel_size: int = opt(1, "Tensor-parallel size.", type=int, positive=True)
    pipeline_model_parallel_size: int = opt(1, "Pipeline-parallel size.", type=int, positive=True)
    context_parallel_size: int = opt(1, "Context-parallel size.", type=int, positive=True)
    cp_comm_type: str = opt("p2p", "Context-parallel communication.",
                            choices=["p2p", "all_gather", "a2a"])
    expert_model_parallel_size: int = opt(1, "Expert-parallel size.", type=int, positive=True)
    expert_tensor_parallel_size: int | None = opt(None, "Tensor-parallel size of experts.",
                                                  type=int, positive=True)
    sequence_parallel: bool = opt(False, "Sequence parallelism inside TP regions.")
    num_layers_per_virtual_pipeline_stage: int | None = opt(
        None, "Layers per virtual pipeline stage (interleaved 1F1B).", type=int, positive=True)
    num_virtual_stages_per_pipeline_rank: int | None = opt(
        None, "Virtual stages per pipeline rank (interleaved 1F1B).", type=int, positive=True)
    decoder_first_pipeline_num_layers: int | None = opt(None, "Layers on the first stage.",
                                                        type=int)
    decoder_last_pipeline_num_layers: int | None = opt(None, "Layers on the last stage.",
                                                       type=int)
    account_for_embedding_in_pipeline_split: bool = opt(
        False, "Count the embedding as a layer when splitting stages.")
    account_for_loss_in_pipeline_split: bool = opt(
        False, "Count the loss as a layer when splitting stages.")
    use_distributed_optimizer: bool = opt(False, "Shard optimizer state over data parallel.")
    overlap_grad_reduce: bool = opt(False, "Overlap gradient reduction with backward.")
    overlap_param_gather: bool = opt(False, "Overlap parameter all-gather with forward.")
    ddp_bucket_size: int | None = opt(None, "Gradient bucket size in elements.", type=int,
                                      positive=True)
    distributed_backend: str = opt("nccl", "Collective backend (gloo is used on CPU).",
                                   choices=["nccl", "gloo"])
    distributed_timeout_minutes: float = opt(10, "Minutes a collective may wait before the "
                                             "job stops.", type=float, positive=True)
    world_size: int | None = opt(None, "World size when not launched by torchrun.", type=int,
                                 positive=True)
    rank: int | None = opt(None, "Rank when not launched by torchrun.", type=int)
    local_rank: int | None = opt(None, "Local rank (set by older launchers).", type=int,
                                 flag="--local-rank")
    init_method: str | None = opt(None, "torch.distributed init method, e.g. "
                                  "tcp://host:port.")

    @property
    def model_parallel_size(self) -> int:
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)


def virtual_stages(cfg) -> int:
    """Model chunks per pipeline rank (interleaved 1F1B when more than one)."""
    p = cfg.parallel
    if p.num_virtual_stages_per_pipeline_rank:
        return p.num_virtual_stages_per_pipeline_rank
    if p.num_layers_per_virtual_pipeline_stage:
        return cfg.model.num_layers // (p.pipeline_model_parallel_size
                                        * p.num_layers_per_virtual_pipeline_stage)
    return 1


def rank_chunks(cfg, pp_rank: int) -> list[Chunk]:
    """The model chunks of pipeline rank `pp_rank`: its virtual stages, with the
    uneven-stage flags applied."""
    p = cfg.parallel
    return model_chunks(cfg.model.num_layers, p.pipeline_model_parallel_size, pp_rank,
                        virtual_stages(cfg), first=p.decoder_first_pipeline_num_layers,
                        last=p.decoder_last_pipeline_num_layers,
                        account_for_embedding=p.account_for_embedding_in_pipeline_split,
                        account_for_loss=p.account_for_loss_in_pipeline_split)


def check_pipeline(cfg) -> None:
    """Stages and virtual stages must split the layers, and interleaving needs whole
    rounds of micro-batches."""
    p, t = cfg.parallel, cfg.training
    pp = p.pipeline_model_parallel_size
    if p.num_layers_per_virtual_pipeline_stage and p.num_virtual_stages_per_pipeline_rank:
        raise ConfigError("give --num-layers-per-virtual-pipeline-stage or "
                          "--num-virtual-stages-per-pipeline-rank, not both")
    k = p.num_layers_per_virtual_pipeline_stage
    if k and cfg.model.num_layers % (pp * k):
        raise ConfigError(f"--num-layers {cfg.model.num_layers} is not divisible by "
                          f"--pipeline-model-parallel-size {pp} x "
                          f"--num-layers-per-virtual-pipeline-stage {k}")
    vpp = virtual_stages(cfg)
    if vpp > 1 and pp == 1:
        raise ConfigError("virtual pipeline stages need --pipeline-model-parallel-size > 1")
    try:
        rank_chunks(cfg, 0)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    micro = t.global_batch_size // (t.micro_batch_size * max(cfg.data_parallel_size, 1))
    if vpp > 1 and micro % pp:
        raise ConfigError(f"the interleaved schedule needs the micro-batches per step "
                          f"({micro} = global batch / (micro batch x data-parallel size)) "
                          f"to be a multiple of --pipeline-model-parallel-size {pp}")


def check_context_parallel(cfg) -> None:
    """Context parallelism: a sequence that splits into 2 x CP balanced chunks, and the
    settings its causal layout supports."""
    p, d = cfg.parallel, cfg.data
    cp = p.context_parallel_size
    if cp == 1:
        return
    if d.seq_length % (2 * cp):
        raise ConfigError(f"--seq-length {d.seq_length} is not divisible by 2 x "
                          f"--context-parallel-size ({2 * cp}), as the load-balanced "
                          f"causal layout needs")
    if p.cp_comm_type not in ("p2p", "all_gather"):
        raise ConfigError(f"--cp-comm-type {p.cp_comm_type}: use p2p or all_gather")
    if d.reset_attention_mask or d.sequence_packing:
        raise ConfigError("--context-parallel-size > 1 attends causally over the whole "
                          "sample; --reset-attention-mask and --sequence-packing are "
                          "not supported with it")
    if p.sequence_parallel and (d.seq_length // cp) % p.tensor_model_parallel_size:
        raise ConfigError(f"--seq-length {d.seq_length} / --context-parallel-size {cp} "
                          f"is not divisible by --tensor-model-parallel-size "
                          f"{p.tensor_model_parallel_size}, as --sequence-parallel needs")

