"""Generation at TP2 gives the tokens one process gives: greedy and sampled, for GQA and
for multi-latent attention with MoE layers, a batch of prompts of different lengths, the
model split from a whole one or loaded from a checkpoint written by one process."""

import pytest

from tests.helpers.dist_utils import run_distributed
from tests.helpers.hf_utils import randomize
from paratron.checkpoint import save_checkpoint
from paratron.cli.args import parse_args
from paratron.inference import Sampling, generate, load_paratron_model, shard_model
from paratron.model.gpt import GPTModel
from paratron.parallel.process_groups import ProcessGroups

COMMON = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
          "--max-position-embeddings 64 --lr 1e-3 --train-iters 1 --padded-vocab-size 128 "
          "--swiglu --normalization RMSNorm --position-embedding-type rope "
          "--disable-bias-linear --untie-embeddings-and-output-weights").split()
ARCHS = {
    "gqa": "--group-query-attention --num-query-groups 2 --qk-layernorm".split(),
    "mla_moe": ("--multi-latent-attention --kv-lora-rank 16 --qk-head-dim 8 "
                "--qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 --moe-router-topk 2 "
                "--moe-ffn-hidden-size 16 --moe-layer-freq ([0]+[1]*1)").split(),
}
VOCAB = 120  # ids 120..127 are padding rows and never chosen
PROMPTS = [[5, 17, 3, 99, 42], [7, 8], [64, 1, 2, 3, 4, 5, 6, 119]]
NEW = 10
SAMPLINGS = {"greedy": dict(greedy=True), "sampled": dict(top_k=20, top_p=0.9,
                                                          temperature=0.8, seed=5)}


def _whole_model(arch):
    cfg = parse_args(COMMON + ARCHS[arch])
    model = GPTModel(cfg.model)
    randomize(model)
    return cfg, model.eval()


def _all_runs(model):
    return {name: generate(model, PROMPTS, NEW, sampling=Sampling(**kw), vocab_size=VOCAB)
            for name, kw in SAMPLINGS.items()}


def _rank(arch, checkpoint_dir):
    pg = ProcessGroups.build(2, 1)
    split = _all_runs(shard_model(_whole_model(arch)[1], pg))
    _, loaded, _ = load_paratron_model(checkpoint_dir, pg, log=lambda line: None)
    from_checkpoint = generate(loaded, PROMPTS, NEW, vocab_size=VOCAB)
    return split, from_checkpoint


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tp2_generates_what_one_process_generates(arch, tmp_path):
    cfg, whole = _whole_model(arch)
    save_checkpoint(tmp_path, 1, [whole], ProcessGroups.single(), config=cfg.to_dict(),
                    save_rng=False)
    results = run_distributed(2, _rank, arch, str(tmp_path), timeout=120)
    reference = _all_runs(whole)
    assert all(len(ids) == NEW for run in reference.values() for ids in run)
    assert all(i < VOCAB for run in reference.values() for ids in run for i in ids)
    for split, from_checkpoint in results:
        assert split == reference
        assert from_checkpoint == reference["greedy"]
