"""Write real Megatron-Core checkpoints and logits for the importer tests.

Hand-written fixtures only prove that the importer agrees with the test author's idea of
Megatron's layout; these files are written by Megatron-Core itself, so the tests check the
mapping against the real thing. The script installs nothing: run it with an interpreter
that can import ``megatron.core`` (e.g. a venv holding ``pip install megatron-core``).

Megatron-Core ships without ``megatron.training``, so the model is built as Megatron's
``pretrain_gpt.py`` would build it: a ``TransformerConfig`` plus the local (non
Transformer-Engine) layer spec through ``get_gpt_decoder_block_spec`` and ``GPTModel``; the
checkpoint ``args`` Namespace carries the same names ``megatron.training.arguments`` stores
(``layernorm_epsilon``, ``bias_gelu_fusion``, ``attention_backend`` as an ``AttnBackend``
enum, ...). ``torch_dist`` goes through ``megatron.core.dist_checkpointing.save`` of
``model.sharded_state_dict()``; the legacy ``torch`` format is the dictionary that
``megatron.training.checkpointing.save_checkpoint`` writes, at the same paths.

Patches, applied at runtime only (site-packages is never edited), all needed for CPU:
- ``grouped_gemm_util``: the ``grouped_gemm`` package is CUDA-only, so ``ops.gmm`` is
  replaced by a per-expert ``torch.matmul`` loop with the same contract.
- ``torch.cuda.current_device`` returns ``"cpu"``: rotary embeddings move ``inv_freq`` to
  it at the first forward; ``torch.cuda.synchronize`` is a no-op (the ``torch_dist`` writer
  calls it before copying tensors); ``Tensor.cuda`` returns the tensor itself (tied
  embeddings under PP are moved there before the embedding-group all-reduce).
- ``CudaRNGStatesTracker.fork`` is a no-op context: the tracker holds CUDA generators,
  and it only scopes dropout, which is 0 here.
- ``GroupedMLP.forward`` sees ``config.bf16`` True while it runs: 0.16.1 asserts "only
  supports bf16" there, though nothing else in it depends on the dtype; the parameters and
  activations stay fp32, as the 1e-5 comparison of the logits needs.
- ``moe_utils.te_general_gemm = None``: 0.16.1 leaves the name undefined without Transformer
  Engine and the router's matmul raises ``NameError``.
- MoE uses the ``allgather`` token dispatcher: ``alltoall`` creates a ``torch.cuda.Stream``.
- MLA's core attention is ``PlainCoreAttention`` (causal softmax with MLA's softmax scale,
  key and value head sizes): 0.16.1's local spec hands MLA the local DotProductAttention,
  which takes neither ``k_channels`` nor ``v_channels``; and ``TELinear``, a stand-in
  without Transformer Engine that MLA passes to ``isinstance``, becomes a class nothing
  is an instance of. MLA's projections, norms and rope are Megatron's own.
- processes use gloo and ``use_cpu_initialization=True``; no CUDA RNG tracker is seeded
  (``torch.manual_seed`` only).

Usage: ``OMP_NUM_THREADS=1 python tools/make_megatron_fixtures.py [--out DIR] [--only NAME]``
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
import types
from argparse import Namespace

try:
    import megatron.core
except ImportError:
    sys.exit("make_megatron_fixtures: megatron.core is not importable; "
             "run it from an environment with `pip install megatron-core`")

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SEQ, BATCH, VOCAB, ITERATION = 8, 2, 256, 1
TOKENS_SEED = 7

_COMMON = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
               max_position_embeddings=32, untie_embeddings_and_output_weights=True)

# Each architecture as the Megatron flags a user would pass (names as `parse_args` stores them).
ARCHITECTURES = {
    "gpt2": dict(normalization="LayerNorm", position_embedding_type="learned_absolute",
                 add_bias_linear=True, add_qkv_bias=True, swiglu=False,
                 bias_gelu_fusion=True, layernorm_epsilon=1e-5,
                 untie_embeddings_and_output_weights=False),
    "llama": dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                  add_bias_linear=False, add_qkv_bias=False, group_query_attention=True,
                  num_query_groups=2, layernorm_epsilon=1e-5, rotary_base=10000),
    "qwen2": dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                  add_bias_linear=False, add_qkv_bias=True, group_query_attention=True,
                  num_query_groups=2, layernorm_epsilon=1e-6, rotary_base=1000000),
    "qwen3": dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                  add_bias_linear=False, add_qkv_bias=False, group_query_attention=True,
                  num_query_groups=2, layernorm_epsilon=1e-6, qk_layernorm=True,
                  kv_channels=16, rotary_base=1000000),
    "qwen3_moe_sequential": dict(
        normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
        add_bias_linear=False, group_query_attention=True, num_query_groups=2,
        layernorm_epsilon=1e-6, qk_layernorm=True, num_experts=4, moe_router_topk=2,
        moe_ffn_hidden_size=16, moe_grouped_gemm=False, moe_router_load_balancing_type="none",
        moe_token_dispatcher_type="allgather"),
    "mixtral_grouped": dict(
        normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
        add_bias_linear=False, group_query_attention=True, num_query_groups=2,
        layernorm_epsilon=1e-5, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
        moe_grouped_gemm=True, moe_router_load_balancing_type="none",
        moe_token_dispatcher_type="allgather"),
    "deepseek_v2": dict(
        normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
        add_bias_linear=False, layernorm_epsilon=1e-6, multi_latent_attention=True,
        q_lora_rank=24, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=8,
        v_head_dim=8, qk_layernorm=True, num_experts=4, moe_router_topk=2,
        moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=16,
        moe_layer_freq=[0, 1], moe_grouped_gemm=False,
        moe_router_load_balancing_type="none", moe_token_dispatcher_type="allgather"),
    "deepseek_v2_lite": dict(
        normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
        add_bias_linear=False, layernorm_epsilon=1e-6, multi_latent_attention=True,
        q_lora_rank=None, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=8,
        v_head_dim=8, qk_layernorm=False),
}

# What the manifest names as missing, and why, so no test mistakes an absence for coverage.
NOT_PRODUCED = []

DENSE_LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1)]  # (tp, pp, ep)
MOE_LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (1, 2, 2)]


def _patch_for_cpu():
    """Let Megatron's CUDA-only spots run on CPU (see the module docstring for the list)."""
    from megatron.core.tensor_parallel import random
    from megatron.core.transformer.moe import experts
    from megatron.core.transformer.moe import grouped_gemm_util as gg
    from megatron.core.transformer.moe import moe_utils
    moe_utils.te_general_gemm = None
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()

    def gmm(a, b, batch_sizes, trans_b=False):
        outs, start = [], 0
        for expert, count in enumerate(batch_sizes.tolist()):
            w = b[expert].t() if trans_b else b[expert]
            outs.append(a[start:start + count] @ w)
            start += count
        return torch.cat(outs) if outs else a.new_zeros(0, b.shape[-1])

    gg.grouped_gemm_is_available = lambda: True
    gg.ops = types.SimpleNamespace(gmm=gmm)

    grouped_forward = experts.GroupedMLP.forward

    def fp32_grouped_forward(self, *args, **kwargs):
        bf16, self.config.bf16 = self.config.bf16, True
        try:
            return grouped_forward(self, *args, **kwargs)
        finally:
            self.config.bf16 = bf16

    experts.GroupedMLP.forward = fp32_grouped_forward

    from megatron.core.transformer import multi_latent_attention as mla
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    build = mla.build_module

    def build_mla_part(spec, *args, **kwargs):
        if spec is DotProductAttention and "k_channels" in kwargs:
            return PlainCoreAttention(**kwargs)
        return build(spec, *args, **kwargs)

    mla.build_module = build_mla_part
    if not isinstance(mla.TELinear, type):  # a stand-in without Transformer Engine
        mla.TELinear = type("NoTransformerEngineLinear", (), {})


class PlainCoreAttention(torch.nn.Module):
    """MLA's core attention for the local spec: causal softmax(q k^T * softmax_scale) v
    over [s, b, heads, dim] inputs with the key and value head sizes MLA passes
    (``k_channels`` = qk_head_dim + qk_pos_emb_head_dim, ``v_channels`` = v_head_dim),
    returning [s, b, heads * v_head_dim] as DotProductAttention does. Only this kernel is
    substituted; MLA's projections, norms and rope stay Megatron's."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale,
                 k_channels, v_channels, cp_comm_type=None, pg_collection=None):
        super().__init__()
        self.softmax_scale = softmax_scale
        self.current_max_attn_logits = None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **kwargs):
        scores = torch.einsum("sbnh,tbnh->bnst", query.float(), key.float())
        scores = scores * self.softmax_scale
        s, t = scores.shape[-2:]
        causal = torch.ones(s, t, dtype=torch.bool).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
        out = torch.einsum("bnst,tbnh->sbnh", probs, value.float()).to(query.dtype)
        return out.reshape(out.shape[0], out.shape[1], -1)


def make_args(arch, tp, pp, ep, ckpt_format):
    """The checkpoint ``args`` as Megatron's ``parse_args`` + ``validate_args`` leave them."""
    from megatron.core.transformer.enums import AttnBackend
    flags = {**_COMMON, **ARCHITECTURES[arch]}
    heads = flags["num_attention_heads"]
    args = Namespace(
        **flags, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, seq_length=SEQ, vocab_size=VOCAB,
        padded_vocab_size=VOCAB, make_vocab_size_divisible_by=128, fp16=False, bf16=False,
        params_dtype=torch.float32, transformer_impl="local", ckpt_format=ckpt_format,
        use_distributed_optimizer=False, attention_backend=AttnBackend.auto,
        apply_layernorm_1p=False, layernorm_zero_centered_gamma=False,
        use_cpu_initialization=True, iteration=ITERATION, micro_batch_size=BATCH,
        global_batch_size=BATCH, hidden_dropout=0.0, attention_dropout=0.0)
    args.kv_channels = flags.get("kv_channels", flags["hidden_size"] // heads)
    args.num_query_groups = flags.get("num_query_groups", heads)
    args.group_query_attention = flags.get("group_query_attention", False)
    for name in ("qk_layernorm", "multi_latent_attention", "swiglu"):
        setattr(args, name, flags.get(name, False))
    args.bias_gelu_fusion = flags.get("bias_gelu_fusion", False)
    args.add_qkv_bias = flags.get("add_qkv_bias", False)
    args.num_experts = flags.get("num_experts")
    return args


def make_config(args):
    """TransformerConfig built from ``args`` the way ``core_transformer_config_from_args`` does."""
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig, TransformerConfig)
    import torch.nn.functional as F
    kw = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, ffn_hidden_size=args.ffn_hidden_size,
        num_query_groups=args.num_query_groups, kv_channels=args.kv_channels,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        sequence_parallel=False, normalization=args.normalization,
        layernorm_epsilon=args.layernorm_epsilon, add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias, gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        bias_activation_fusion=args.bias_gelu_fusion or args.swiglu,
        qk_layernorm=args.qk_layernorm, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=torch.float32, init_method_std=0.05,
        pipeline_dtype=torch.float32,
        masked_softmax_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        attention_backend=args.attention_backend)
    if args.num_experts:
        kw.update(num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
                  moe_ffn_hidden_size=args.moe_ffn_hidden_size,
                  moe_grouped_gemm=args.moe_grouped_gemm,
                  moe_router_load_balancing_type=args.moe_router_load_balancing_type,
                  moe_token_dispatcher_type=args.moe_token_dispatcher_type,
                  moe_aux_loss_coeff=0.0)
        if getattr(args, "moe_shared_expert_intermediate_size", None):
            kw["moe_shared_expert_intermediate_size"] = args.moe_shared_expert_intermediate_size
        if getattr(args, "moe_layer_freq", None):
            kw["moe_layer_freq"] = args.moe_layer_freq
    if args.multi_latent_attention:
        kw.update(q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank,
                  qk_head_dim=args.qk_head_dim, qk_pos_emb_head_dim=args.qk_pos_emb_head_dim,
                  v_head_dim=args.v_head_dim, rope_type="rope", rotary_base=10000)
        return MLATransformerConfig(**kw)
    return TransformerConfig(**kw)


def build_model(args, config):
    """GPTModel for this pipeline stage with the local layer spec, as pretrain_gpt builds it."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                      normalization=args.normalization)
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        parallel_output=False,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_base=getattr(args, "rotary_base", 10000))


def fixed_tokens():
    gen = torch.Generator().manual_seed(TOKENS_SEED)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)


def forward(model, args):
    """Megatron's forward on the fixed tokens, the hidden states passed stage to stage."""
    from megatron.core import parallel_state as ps
    tokens = fixed_tokens()
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    hidden_shape = (SEQ, BATCH, args.hidden_size)
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            received = torch.empty(hidden_shape)
            dist.recv(received, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(received)
        out = model(tokens, positions, mask)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    return out


def legacy_name(root, tp_rank, pp_rank, ep_rank, args):
    """``megatron.training.checkpointing.get_checkpoint_name`` for the legacy format."""
    name = f"mp_rank_{tp_rank:02d}"
    if args.pipeline_model_parallel_size > 1:
        name += f"_{pp_rank:03d}"
    if args.expert_model_parallel_size > 1:
        name += f"_{ep_rank:03d}"
    return os.path.join(root, f"iter_{ITERATION:07d}", name, "model_optim_rng.pt")


def save(model, args, root):
    """Both formats, with ``latest_checkpointed_iteration.txt`` as Megatron writes it."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    if args.ckpt_format == "torch_dist":
        state = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
                 "model": model.sharded_state_dict()}
        folder = os.path.join(root, f"iter_{ITERATION:07d}")
        os.makedirs(folder, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(state, folder)
    elif ps.get_expert_data_parallel_rank() == 0:
        path = legacy_name(root, ps.get_tensor_model_parallel_rank(),
                           ps.get_pipeline_model_parallel_rank(),
                           ps.get_expert_model_parallel_rank(), args)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
                    "model": model.state_dict_for_save_checkpoint()}, path)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(ITERATION))


def worker(rank, world, port, arch, layout, out_dir):
    """One rank: build, forward, save both formats; the last stage's rank 0 keeps logits."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _patch_for_cpu()
    from megatron.core import parallel_state as ps
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tp, pp, ep = layout
    ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                 pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep)
    torch.manual_seed(1234)
    args = make_args(arch, tp, pp, ep, "torch_dist")
    model = build_model(args, make_config(args))
    model.eval()
    logits = forward(model, args)
    for fmt in ("torch_dist", "torch"):
        args.ckpt_format = fmt
        save(model, args, os.path.join(out_dir, fmt))
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and \
            ps.get_data_parallel_rank() == 0 and ps.get_expert_model_parallel_rank() == 0:
        np.save(os.path.join(out_dir, "logits.npy"), logits.float().numpy())
        with open(os.path.join(out_dir, "args.json"), "w") as f:
            json.dump({k: str(v) if not isinstance(v, (int, float, str, bool, list, type(None)))
                       else v for k, v in sorted(vars(args).items()) if k != "ckpt_format"},
                      f, indent=1)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def layout_name(tp, pp, ep):
    parts = [f"{n}{s}" for n, s in (("tp", tp), ("pp", pp), ("ep", ep)) if s > 1]
    return "x".join(parts) or "tp1"


def run_one(arch, layout, root, port):
    tp, pp, ep = layout
    out_dir = os.path.join(root, arch, layout_name(*layout))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    world = pp * max(tp, ep)
    mp.spawn(worker, args=(world, port, arch, layout, out_dir), nprocs=world, join=True)
    return out_dir, world


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                      "fixtures", "megatron"))
    parser.add_argument("--only", help="one architecture name")
    opts = parser.parse_args()
    root = os.path.abspath(opts.out)
    manifest_path = os.path.join(root, "MANIFEST.json")
    manifest = {"fixtures": [], "not_produced": []}
    if os.path.exists(manifest_path):
        manifest = json.load(open(manifest_path))
    manifest.update(megatron_core=megatron.core.__version__, torch=torch.__version__,
                    tokens=fixed_tokens().tolist(),
                    built_with="TransformerConfig + local layer spec + GPTModel "
                               "(megatron.training is not in the megatron-core wheel)")
    manifest["not_produced"] = NOT_PRODUCED
    skipped = {entry.get("architecture") for entry in NOT_PRODUCED}
    archs = [opts.only] if opts.only else [a for a in ARCHITECTURES if a not in skipped]
    manifest["fixtures"] = [f for f in manifest["fixtures"] if f["architecture"] not in archs]
    port = 29500 + os.getpid() % 1000
    for arch in archs:
        layouts = MOE_LAYOUTS if ARCHITECTURES[arch].get("num_experts") else DENSE_LAYOUTS
        for layout in layouts:
            port += 1
            start = time.time()
            out_dir, world = run_one(arch, layout, root, port)
            rel = os.path.relpath(out_dir, root)
            for fmt in ("torch_dist", "torch"):
                manifest["fixtures"].append(dict(
                    architecture=arch, layout=layout_name(*layout),
                    tp=layout[0], pp=layout[1], ep=layout[2], world_size=world, format=fmt,
                    path=f"{rel}/{fmt}", logits=f"{rel}/logits.npy", args=f"{rel}/args.json",
                    megatron_core=megatron.core.__version__, torch=torch.__version__,
                    command=f"OMP_NUM_THREADS=1 python tools/make_megatron_fixtures.py "
                            f"--only {arch}",
                    flags={**_COMMON, **ARCHITECTURES[arch]}))
            print(f"{arch} {layout_name(*layout)}: {time.time() - start:.1f}s", flush=True)
            with open(manifest_path, "w") as f:
                json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
