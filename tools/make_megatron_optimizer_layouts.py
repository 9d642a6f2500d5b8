"""Write a Megatron-Core distributed-optimizer checkpoint whose buffer layout is the hard one.

``make_megatron_optimizer_fixture.py`` trains at TP2 x DP2 with one bucket; an importer that
rebuilds Megatron's gradient-buffer layout must also get pipeline stages, several buckets and
the tied embedding's bucket of its own right. This script builds the fixture script's tiny
GPT-2 (tied embeddings, biases, LayerNorm, learned positions) at TP2 x PP2 x DP2 with
Megatron-Core's own ``DistributedDataParallel`` (``overlap_grad_reduce`` with 600-element
buckets, which Megatron applies on the first stage only) and ``DistributedOptimizer``,
takes three optimizer steps on made-up gradients (the layout is the point, not the
training: each parameter's gradient is drawn from its global name and the step, so data-
parallel and tensor-parallel copies agree) and saves both formats as
``make_megatron_optimizer_fixture.py`` does (legacy folders ``mp_rank_TT_PPP``).
``record.npz`` holds every parameter's main weight and Adam moments (TP shards put together
along the partition dimension, global layer numbers). The CPU patches are the other script's.

Usage: ``OMP_NUM_THREADS=1 python tools/make_megatron_optimizer_layouts.py [--out DIR]``
"""

import json
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_megatron_optimizer_fixture as trained  # noqa: E402  (the sibling script)
from make_megatron_fixtures import (  # noqa: E402
    ARCHITECTURES, _COMMON, _patch_for_cpu, build_model, make_args, make_config)

import megatron.core  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ARCH, TP, PP, DP, STEPS, BUCKET = "gpt2", 2, 2, 2, trained.STEPS, 600


def layout_args():
    args = make_args(ARCH, TP, PP, 1, "torch_dist")
    args.__dict__.update(trained.HYPER)
    args.use_distributed_optimizer, args.data_parallel_size = True, DP
    args.overlap_grad_reduce, args.ddp_bucket_size = True, BUCKET
    args.world_size = TP * PP * DP
    args.micro_batch_size, args.global_batch_size = 1, DP
    args.optimizer, args.lr_decay_iters, args.lr_warmup_init = "adam", None, 0.0
    args.iteration, args.consumed_train_samples = STEPS, STEPS * DP
    return args


def build(args):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    config = make_config(args)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True, overlap_grad_reduce=True,
        bucket_size=BUCKET)
    model = DistributedDataParallel(config, ddp_config, build_model(args, config))
    opt_config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        use_distributed_optimizer=True, bf16=False, fp16=False, clip_grad=args.clip_grad,
        params_dtype=torch.float32)
    with trained.cuda_type_names():
        optimizer = get_megatron_optimizer(opt_config, [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=DP, lr_decay_steps=args.train_iters * DP,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters * DP,
        wd_incr_style="constant")
    return model, optimizer, scheduler


def global_name(name: str) -> str:
    """The model-wide name of a stage-local parameter (one layer per stage here)."""
    from megatron.core import parallel_state as ps
    prefix = "decoder.layers."
    if name.startswith(prefix):
        layer, rest = name[len(prefix):].split(".", 1)
        layers = _COMMON["num_layers"] // PP
        return f"{prefix}{int(layer) + ps.get_pipeline_model_parallel_rank() * layers}.{rest}"
    if name == "output_layer.weight":  # the tied copy: the same gradient as the embedding
        return "embedding.word_embeddings.weight"
    return name


def made_up_gradients(model, step: int) -> None:
    """Every parameter's gradient drawn from its global name and the step (the same on
    every data-parallel rank, as after Megatron's reduction)."""
    for name, param in model.module.named_parameters():
        seed = zlib.crc32(f"{global_name(name)}:{step}".encode())
        gen = torch.Generator().manual_seed(seed)
        param.main_grad.copy_(torch.randn(param.shape, generator=gen) * 0.01)


def record(model, optimizer) -> dict:
    shards = trained.local_shards(optimizer)
    out = {}
    for name, param in model.module.named_parameters():
        span, shard, state = shards.get(param, (None, None, {}))
        for key, local in (("main", shard), ("exp_avg", state.get("exp_avg")),
                           ("exp_avg_sq", state.get("exp_avg_sq"))):
            out[f"{key}/{global_name(name)}"] = trained.full_tensor(param, span, local)
    return {k: v.detach().numpy() for k, v in out.items()}


def gather_records(local: dict) -> dict:
    """Every pipeline stage's record, merged (the tied output copy is the last stage's)."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged = {}
    for part in parts:
        merged.update({k: v for k, v in part.items() if k not in merged})
    return merged


def worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _patch_for_cpu()
    trained.route_cuda_to_cpu()
    from megatron.core import parallel_state as ps
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ps.initialize_model_parallel(tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP)
    torch.manual_seed(1234)
    args = layout_args()
    model, optimizer, scheduler = build(args)
    for step in range(STEPS):
        made_up_gradients(model, step)
        with trained.cuda_type_names():
            optimizer.step()
        scheduler.step(increment=args.global_batch_size)
    trained.save_torch_dist(model, optimizer, scheduler, args,
                            os.path.join(out_dir, "torch_dist"), "dp_reshardable")
    trained.save_legacy(model, optimizer, scheduler, args, os.path.join(out_dir, "torch"))
    trained.finish(rank, out_dir, gather_records(record(model, optimizer)),
                   ("torch_dist", "torch"))


def main():
    world = TP * PP * DP
    out_dir = trained.run(worker, world, "optimizer_layouts", __doc__.splitlines()[0])
    with open(os.path.join(out_dir, "RECORD.json"), "w") as f:
        json.dump(dict(
            megatron_core=megatron.core.__version__, torch=torch.__version__,
            architecture=ARCH, layout=f"tp{TP}xpp{PP}xdp{DP}", tp=TP, pp=PP, dp=DP,
            world_size=world, steps=STEPS, bucket_size=BUCKET,
            command="OMP_NUM_THREADS=1 python tools/make_megatron_optimizer_layouts.py",
            flags={**_COMMON, **ARCHITECTURES[ARCH]}, hyper_parameters=trained.HYPER,
            gradients="made up: N(0, 0.01^2) drawn from crc32('<global name>:<step>'); the "
                      "tied output layer takes the embedding's",
            folders={"torch_dist": "dist_checkpointing.save, sharding dp_reshardable",
                     "torch": "legacy mp_rank_TT_PPP/model_optim_rng.pt + distrib_optim.pt"},
            record_npz="main/, exp_avg/, exp_avg_sq/<global name>: full tensors after the "
                       "last step (TP shards concatenated along the partition dimension)"),
            f, indent=1)


if __name__ == "__main__":
    main()
