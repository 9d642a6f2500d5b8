"""Write a Megatron-Core distributed-optimizer checkpoint after 3 real training steps.

The model-only fixtures cannot show where Megatron keeps the fp32 main weights and the Adam
moments, nor how ``DistributedOptimizer`` shards them over data-parallel ranks; this script
trains the fixture script's tiny fp32 ``llama`` with Megatron-Core's own
``DistributedDataParallel`` + ``get_megatron_optimizer`` (Adam, distributed optimizer) and
``OptimizerParamScheduler`` at TP2 x DP2, saves it the way
``megatron.training.checkpointing.save_checkpoint`` does, and records the same state as plain
arrays (``record.npz``) so a test can compare an importer against Megatron without Megatron.

Each data-parallel rank trains on one row of the fixture tokens (micro batch 1, global batch
2); the loss is the mean cross entropy of the tokens shifted by one. Folders written:
``torch_dist`` (optimizer sharding ``dp_reshardable``, ``save_checkpoint``'s default) and
``torch`` (legacy ``mp_rank_*/model_optim_rng.pt`` + ``distrib_optim.pt``). In 0.16.1
``fully_reshardable`` and ``dp_zero_gather_scatter`` also save on CPU (add them to
``SHARDINGS``; left out to keep the fixture small); ``fully_sharded_model_space`` raises
"ShardedTensor.flattened_range is not supported" (``distrib_optimizer.py:1753``).

Patches, at runtime only, beyond ``make_megatron_fixtures._patch_for_cpu`` (which makes
``torch.cuda.current_device`` return ``"cpu"``, so DDP's grad buffers live on the CPU):
- ``Tensor.type()`` reports ``torch.cuda.FloatTensor`` for CPU fp32 tensors while the
  optimizer is built: ``DistributedOptimizer._build_model_and_main_param_groups`` refuses any
  other type name.
- ``torch.tensor`` and ``torch.zeros`` called with ``device="cuda"`` build on the CPU:
  ``MegatronOptimizer.__init__`` (``optimizer.py``, ``_dummy_overflow_buf``) and
  ``clip_grads.py`` (the grad-norm buffers) name the device literally.
- no RNG state is saved (``rng_state`` needs CUDA generators; it is optional on load).

Usage: ``OMP_NUM_THREADS=1 python tools/make_megatron_optimizer_fixture.py [--out DIR]``
"""

import argparse
import contextlib
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_megatron_fixtures import (  # noqa: E402  (the sibling script, read-only)
    _patch_for_cpu, build_model, fixed_tokens, make_args, make_config)

import megatron.core  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

ARCH, TP, DP, STEPS = "llama", 2, 2, 3
HYPER = dict(lr=1e-2, min_lr=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
             adam_eps=1e-8, clip_grad=1.0, lr_warmup_iters=1, train_iters=10,
             lr_decay_style="cosine")
SHARDINGS = {"torch_dist": "dp_reshardable"}


@contextlib.contextmanager
def cuda_type_names():
    """CPU tensors answer ``type()`` with the CUDA name the optimizer insists on."""
    plain = torch.Tensor.type

    def type_name(self, *args, **kwargs):
        name = plain(self, *args, **kwargs)
        if args or kwargs or self.is_cuda:
            return name
        return name.replace("torch.", "torch.cuda.", 1)
    torch.Tensor.type = type_name
    try:
        yield
    finally:
        torch.Tensor.type = plain


def route_cuda_to_cpu():
    """``device="cuda"`` in ``torch.tensor``/``torch.zeros`` means the CPU in these processes."""
    for name in ("tensor", "zeros"):
        make = getattr(torch, name)

        def on_cpu(*args, make=make, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return make(*args, **kwargs)
        setattr(torch, name, on_cpu)


def training_args():
    """The checkpoint ``args`` with the training flags ``parse_args`` would store."""
    args = make_args(ARCH, TP, 1, 1, "torch_dist")
    args.__dict__.update(HYPER)
    args.use_distributed_optimizer = True
    args.data_parallel_size = DP
    args.world_size = TP * DP
    args.micro_batch_size, args.global_batch_size = 1, DP
    args.optimizer, args.lr_decay_iters, args.lr_warmup_init = "adam", None, 0.0
    args.start_weight_decay = args.end_weight_decay = HYPER["weight_decay"]
    args.weight_decay_incr_style = "constant"
    args.iteration = STEPS
    args.consumed_train_samples = STEPS * args.global_batch_size
    args.seq_length = fixed_tokens().shape[1] - 1
    return args


def build_training(args):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    config = make_config(args)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    module = build_model(args, config)
    # pretrain_gpt's parallel_output=True: the loss is vocab-parallel cross entropy over each
    # rank's logits. The fixture builder gathers the logits (it records them whole), and
    # the vocab-parallel loss of whole logits is another function.
    module.output_layer.gather_output = False
    model = DistributedDataParallel(config, ddp_config, module)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        use_distributed_optimizer=True, bf16=False, fp16=False, clip_grad=args.clip_grad,
        params_dtype=torch.float32)
    with cuda_type_names():
        optimizer = get_megatron_optimizer(opt_config, [model])
    samples = args.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * samples,
        lr_decay_steps=args.train_iters * samples, lr_decay_style=args.lr_decay_style,
        start_wd=args.start_weight_decay, end_wd=args.end_weight_decay,
        wd_incr_steps=args.train_iters * samples, wd_incr_style=args.weight_decay_incr_style)
    return model, optimizer, scheduler


def loss_and_backward(model):
    """Mean next-token cross entropy of this data-parallel rank's row, backward included."""
    from megatron.core import parallel_state as ps
    row = fixed_tokens()[ps.get_data_parallel_rank()].unsqueeze(0)
    inputs, labels = row[:, :-1], row[:, 1:]
    seq = inputs.shape[1]
    positions = torch.arange(seq).unsqueeze(0)
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    model.zero_grad_buffer()
    loss = model(inputs, positions, mask, labels=labels).mean()
    loss.backward()
    model.finish_grad_sync()
    mean = loss.detach().clone()
    dist.all_reduce(mean, group=ps.get_data_parallel_group())
    return mean.item() / DP


def full_tensor(param, span=None, local_flat=None):
    """One parameter's whole logical tensor from the data-parallel shard this rank holds.

    ``DistributedOptimizer`` lists only the parameters whose range meets this rank's shard, so
    a rank without a piece (``span`` None) contributes zeros to the data-parallel sum.
    """
    from megatron.core import parallel_state as ps
    flat = torch.zeros(param.numel())
    if span is not None:
        flat[span.start:span.end] = local_flat
    dist.all_reduce(flat, group=ps.get_data_parallel_group())
    tensor = flat.view(param.shape)
    if not getattr(param, "tensor_model_parallel", False):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(TP)]
    dist.all_gather(parts, tensor, group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=param.partition_dim)


def local_shards(optimizer):
    """Model parameter -> (its range in this rank's shard, the fp32 main shard, Adam state)."""
    shards = {}
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for model_group, shard_group in zip(inner.model_fp32_groups, inner.shard_fp32_groups):
            for param, shard in zip(model_group, shard_group):
                span = inner._get_model_param_range_map(param)["param"]
                shards[param] = (span, shard, inner.optimizer.state[shard])
    return shards


def local_main(param, optimizer):
    span, shard, _ = local_shards(optimizer).get(param, (None, None, None))
    return span, None if shard is None else shard.detach()


def optimizer_record(model, optimizer):
    """Main weights, Adam moments and next gradients of every parameter, by Megatron name."""
    shards = local_shards(optimizer)
    steps = {float(state["step"]) for _, _, state in shards.values()}
    assert len(steps) == 1, steps
    record = {"adam_step": torch.tensor(steps.pop())}
    for name, param in model.module.named_parameters():
        span, shard, state = shards.get(param, (None, None, {}))
        grad = None if span is None else param.main_grad.view(-1)[span.start:span.end]
        record[f"main/{name}"] = full_tensor(param, span, shard)
        record[f"exp_avg/{name}"] = full_tensor(param, span, state.get("exp_avg"))
        record[f"exp_avg_sq/{name}"] = full_tensor(param, span, state.get("exp_avg_sq"))
        record[f"grad_step4/{name}"] = full_tensor(param, span, grad)
    return {k: v.detach() for k, v in record.items()}


def save_torch_dist(model, optimizer, scheduler, args, folder, sharding):
    from megatron.core import dist_checkpointing
    model_sd = model.module.sharded_state_dict()
    state = {"args": args, "checkpoint_version": 3.0, "iteration": STEPS, "model": model_sd,
             "optimizer": optimizer.sharded_state_dict(
                 model_sd, metadata={"distrib_optim_sharding_type": sharding}),
             "opt_param_scheduler": scheduler.state_dict(),
             "num_floating_point_operations_so_far": 0}
    path = os.path.join(folder, f"iter_{STEPS:07d}")
    os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, path)


def save_legacy(model, optimizer, scheduler, args, folder):
    """``mp_rank_TT[_PPP]/model_optim_rng.pt`` on data-parallel rank 0, ``distrib_optim.pt``
    beside (every data-parallel rank writes its part of it)."""
    from megatron.core import parallel_state as ps
    name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
    if ps.get_pipeline_model_parallel_world_size() > 1:
        name += f"_{ps.get_pipeline_model_parallel_rank():03d}"
    rank_dir = os.path.join(folder, f"iter_{STEPS:07d}", name)
    os.makedirs(rank_dir, exist_ok=True)
    dist.barrier()
    optimizer.save_parameter_state(os.path.join(rank_dir, "distrib_optim.pt"))
    if ps.get_data_parallel_rank() == 0:
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": STEPS,
                    "model": model.module.state_dict_for_save_checkpoint(),
                    "optimizer": optimizer.state_dict(),
                    "opt_param_scheduler": scheduler.state_dict(),
                    "num_floating_point_operations_so_far": 0},
                   os.path.join(rank_dir, "model_optim_rng.pt"))


def worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _patch_for_cpu()
    route_cuda_to_cpu()
    from megatron.core import parallel_state as ps
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ps.initialize_model_parallel(tensor_model_parallel_size=TP)
    torch.manual_seed(1234)
    args = training_args()
    model, optimizer, scheduler = build_training(args)
    losses = []
    for _ in range(STEPS):
        losses.append(loss_and_backward(model))
        with cuda_type_names():
            optimizer.step()
        scheduler.step(increment=args.global_batch_size)
    for folder, sharding in SHARDINGS.items():
        save_torch_dist(model, optimizer, scheduler, args, os.path.join(out_dir, folder),
                        sharding)
    save_legacy(model, optimizer, scheduler, args, os.path.join(out_dir, "torch"))
    loss4 = loss_and_backward(model)
    record = {k: v.numpy() for k, v in optimizer_record(model, optimizer).items()}
    with cuda_type_names():
        optimizer.step()
    for name, param in model.module.named_parameters():
        record[f"main_step4/{name}"] = full_tensor(param, *local_main(param, optimizer)).numpy()
    group = optimizer.param_groups[0]
    record.update(losses=np.array(losses), loss_step4=np.array(loss4),
                  lr_step4=np.array(group["lr"]), weight_decay=np.array(group["weight_decay"]))
    finish(rank, out_dir, record, (*SHARDINGS, "torch"))


def finish(rank, out_dir, record, folders):
    """Rank 0 writes record.npz and each folder's latest_checkpointed_iteration.txt; then
    every rank leaves its groups."""
    from megatron.core import parallel_state as ps
    if rank == 0:
        np.savez_compressed(os.path.join(out_dir, "record.npz"), **record)
        for folder in folders:
            with open(os.path.join(out_dir, folder, "latest_checkpointed_iteration.txt"),
                      "w") as f:
                f.write(str(STEPS))
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def run(worker, world, default_name, description):
    """Parse --out (default tests/fixtures/megatron/<default_name>), empty it, run `world`
    ranks of `worker`; returns the folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                      "fixtures", "megatron", default_name))
    out_dir = os.path.abspath(parser.parse_args().out)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    mp.spawn(worker, args=(world, 29000 + os.getpid() % 1000, out_dir), nprocs=world,
             join=True)
    return out_dir


def main():
    write_record_json(run(worker, TP * DP, "optimizer", __doc__.splitlines()[0]))


def write_record_json(out_dir):
    """What the folder holds and how it was made; written last, once the folder is complete."""
    from make_megatron_fixtures import ARCHITECTURES, _COMMON
    record = dict(
        megatron_core=megatron.core.__version__, torch=torch.__version__,
        architecture=ARCH, layout=f"tp{TP}xdp{DP}", tp=TP, dp=DP, world_size=TP * DP,
        command="OMP_NUM_THREADS=1 python tools/make_megatron_optimizer_fixture.py",
        flags={**_COMMON, **ARCHITECTURES[ARCH]}, hyper_parameters=HYPER, steps=STEPS,
        micro_batch_size=1, global_batch_size=DP, tokens=fixed_tokens().tolist(),
        data="data-parallel rank r trains on row r of tokens; inputs row[:-1], labels row[1:]; "
             "loss = mean cross entropy",
        lr_schedule="OptimizerParamScheduler: linear warmup from 0 over 1 iteration "
                    "(2 samples), cosine to min_lr over train_iters (20 samples); step 1 "
                    "runs at lr 0",
        folders={
            "torch_dist": "dist_checkpointing.save of save_checkpoint's state: args, "
                          "checkpoint_version 3.0, iteration 3, model, optimizer "
                          "(DistributedOptimizer sharding dp_reshardable), "
                          "opt_param_scheduler, num_floating_point_operations_so_far "
                          "(no rng_state: it needs CUDA)",
            "torch": "legacy: iter_0000003/mp_rank_XX/model_optim_rng.pt (args, model, "
                     "optimizer.state_dict(), opt_param_scheduler) and distrib_optim.pt "
                     "(optimizer.save_parameter_state)"},
        record_npz={
            "main/<name>": "fp32 main weight after step 3, full unsharded (TP shards "
                           "concatenated along partition_dim); names as in GPTModel",
            "exp_avg/<name>, exp_avg_sq/<name>": "Adam moments after step 3, same layout",
            "grad_step4/<name>": "data-parallel averaged gradient of step 4 (same batch, "
                                 "saved weights), before clipping",
            "main_step4/<name>": "main weight after Megatron's step 4 on grad_step4 (clipping "
                                 "and the lr_step4 included)",
            "adam_step": "the Adam step count (3)",
            "losses": "global loss of steps 1-3", "loss_step4": "loss at the saved weights",
            "lr_step4": "lr the scheduler gives for step 4",
            "weight_decay": "decoupled weight decay (AdamW: torch.optim.AdamW is the "
                            "optimizer without Apex/Transformer Engine)"},
        patches="see the script docstring")
    with open(os.path.join(out_dir, "RECORD.json"), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
