"""The Megatron flag mapping: seed scripts parse, bad combinations are refused in one line."""

import subprocess
import sys

import pytest

from paratron.cli.train import main as train_main
from paratron.cli.args import build_parser, parse_args
from paratron.options import ConfigError
from tests.helpers.seed_args import SEED_ARGS, SEED_SCRIPTS

TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--max-position-embeddings 16 --lr 1e-3 --train-iters 2 --vocab-size 64 "
        "--mock-data --device cpu").split()

# The training-script command lines (seed 002's own example script has other flags).
TRAINING_SEEDS = [n for n, script in SEED_SCRIPTS.items()
                  if script != "megatron_core_training_example.py"]


@pytest.mark.parametrize("name", TRAINING_SEEDS)
def test_seed_flag_list_parses(name):
    cfg = parse_args(SEED_ARGS[name], check=False)
    assert cfg.training.global_batch_size is not None


def test_seed_values_land_in_the_tree():
    cfg = parse_args(SEED_ARGS["000_deepseek_v2_lite_launch_json"], check=False)
    assert cfg.model.num_layers == 27 and cfg.model.hidden_size == 2048
    assert cfg.model.add_bias_linear is False  # --disable-bias-linear
    assert cfg.model.position_embedding_type == "rope"
    assert cfg.parallel.pipeline_model_parallel_size == 4
    assert cfg.parallel.decoder_first_pipeline_num_layers == 6
    assert cfg.optimizer.lr == 1e-5 and cfg.optimizer.adam_beta2 == 0.95
    assert cfg.training.bf16 and cfg.model.recompute_granularity == "selective"


def test_megatron_defaults():
    cfg = parse_args(TINY)
    assert cfg.training.seed == 1234 and cfg.optimizer.clip_grad == 1.0
    assert cfg.model.init_method_std == 0.02 and cfg.model.make_vocab_size_divisible_by == 128
    assert cfg.training.initial_loss_scale == 2.0 ** 32 and cfg.training.hysteresis == 2
    assert cfg.model.ffn_hidden_size == 128 and cfg.model.kv_channels == 8
    swiglu = parse_args(TINY + ["--swiglu", "--hidden-size", "96"])
    assert swiglu.model.ffn_hidden_size == 256  # int(4 * 96 * 2 / 3 / 64) * 64


def test_no_effect_flags_are_accepted_and_documented():
    args = TINY + ["--use-mcore-models", "--transformer-impl", "local",
                   "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion",
                   "--attention-backend", "flash", "--tensorboard-queue-size", "1"]
    parse_args(args)
    text = build_parser().format_help()
    assert "no effect in Paratron" in text and "--no-rope-fusion" in text


def test_help_groups_flags_like_megatron():
    text = build_parser().format_help()
    for group in ("network size", "regularization", "training", "learning rate",
                  "checkpointing", "mixed precision", "distributed", "validation",
                  "data and dataloader", "tokenizer", "logging", "moe", "mla"):
        assert f"\n{group}:" in text, group


def test_unknown_flag_names_the_closest_one():
    with pytest.raises(ConfigError, match="did you mean --num-layers"):
        parse_args(TINY + ["--num-layer", "3"])


def test_preset_yaml_and_command_line_precedence(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("num-layers: 3\nhidden_size: 64\nswiglu: true\nlr: 0.002\n")
    cfg = parse_args(["--model-size", "qwen3-0.6b", "--config", str(yaml_file),
                      "--num-attention-heads", "4", "--num-query-groups", "2",
                      "--kv-channels", "16", "--seq-length", "32", "--train-iters", "1",
                      "--lr", "0.003", "--device", "cpu"])
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 64  # from YAML
    assert cfg.optimizer.lr == 0.003  # command line beats YAML
    assert cfg.model.qk_layernorm and cfg.model.norm_epsilon == 1e-6  # from the preset
    assert cfg.model.num_query_groups == 2


def test_yaml_unknown_key_is_refused(tmp_path):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("num-layer: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'num-layer'; did you mean"):
        parse_args(TINY + ["--config", str(yaml_file)])


@pytest.mark.parametrize("name", ["gpt2-124m", "llama3-8b", "qwen2.5-7b", "qwen2.5-72b",
                                  "qwen3-8b", "qwen3-32b"])
def test_presets_validate(name):
    cfg = parse_args(["--model-size", name, "--lr", "1e-4", "--train-iters", "10"])
    assert cfg.model.num_layers > 0


def test_preset_published_shapes():
    q = parse_args(["--model-size", "qwen2.5-7b", "--lr", "1", "--train-iters", "1"]).model
    assert (q.num_layers, q.hidden_size, q.num_attention_heads, q.num_query_groups,
            q.ffn_hidden_size, q.add_qkv_bias) == (28, 3584, 28, 4, 18944, True)
    g = parse_args(["--model-size", "gpt2-1.5b", "--lr", "1", "--train-iters", "1"]).model
    assert (g.num_layers, g.hidden_size, g.num_attention_heads) == (48, 1600, 25)


INVALID = [
    (["--num-attention-heads", "3"], "--hidden-size 32 is not divisible by --num-attention-heads 3"),
    (["--group-query-attention", "--num-query-groups", "3"], "not divisible by --num-query-groups 3"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], "--global-batch-size 6 is not divisible"),
    (["--seq-length", "32"], "--seq-length 32 exceeds --max-position-embeddings 16"),
    (["--lr-warmup-iters", "5"], "--lr-warmup-iters 5 exceeds --lr-decay-iters 2"),
    (["--fp16", "--bf16"], "--fp16 and --bf16 are both set"),
    (["--recompute-granularity", "full"], "needs --recompute-method"),
    (["--recompute-method", "uniform"], "applies only with --recompute-granularity full"),
    (["--min-lr", "0.1"], "--min-lr 0.1 is above --lr"),
    (["--lr-decay-style", "WSD"], "needs --lr-wsd-decay-iters"),
    (["--tensor-model-parallel-size", "2"], "world size is not divisible by tensor x pipeline"),
    (["--num-experts", "4", "--moe-router-topk", "5"],
     "--moe-router-topk 5 must be between 1 and --num-experts 4"),
    (["--hidden-dropout", "1.5"], "--attention-dropout and --hidden-dropout must be in [0, 1)"),
    (["--rotary-percent", "0"], "--rotary-percent must be in (0, 1]"),
    (["--num-layers", "0"], "--num-layers must be positive"),
    (["--micro-batch-size", "x"], "argument --micro-batch-size: invalid int value"),
    (["--normalization", "BatchNorm"], "argument --normalization: invalid choice"),
    (["--model-size", "qwen9-1b"], "--model-size qwen9-1b: unknown preset"),
]


@pytest.mark.parametrize("extra,message", INVALID)
def test_invalid_combination_is_one_line(extra, message, capsys):
    assert train_main(TINY + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_refusal_from_the_command_line_exits_nonzero_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "paratron", "train", *TINY, "--fp16", "--bf16"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "paratron train: error: --fp16 and --bf16 are both set; choose one"]


def test_feature_of_a_later_release_is_refused_not_ignored(monkeypatch):
    with pytest.raises(ConfigError, match="--ckpt-format zarr .use torch_dist. is not supported"):
        parse_args(TINY + ["--save", "/tmp/run", "--ckpt-format", "zarr"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--rampup-batch-size is not supported yet"):
        parse_args(TINY + ["--rampup-batch-size", "2", "2", "100"])


TP_REFUSALS = [
    (["--tensor-model-parallel-size", "8", "--world-size", "8"],
     "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 8"),
    (["--tensor-model-parallel-size", "2", "--world-size", "2", "--group-query-attention",
      "--num-query-groups", "2", "--num-attention-heads", "4", "--ffn-hidden-size", "33"],
     "--ffn-hidden-size 33 is not divisible by --tensor-model-parallel-size 2"),
    (["--tensor-model-parallel-size", "2", "--world-size", "2", "--padded-vocab-size", "99"],
     "--padded-vocab-size 99 is not divisible by --tensor-model-parallel-size 2"),
    (["--tensor-model-parallel-size", "4", "--world-size", "4", "--num-attention-heads", "4",
      "--group-query-attention", "--num-query-groups", "4", "--hidden-size", "48",
      "--num-attention-heads", "12", "--num-query-groups", "3"],
     "--num-query-groups 3 and --tensor-model-parallel-size 4: one must divide the other"),
    (["--tensor-model-parallel-size", "2", "--world-size", "3"],
     "world size is not divisible by tensor x pipeline x context parallel size (2)"),
    (["--world-size", "2", "--global-batch-size", "6", "--micro-batch-size", "2"],
     "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
    (["--tensor-model-parallel-size", "2", "--world-size", "2", "--sequence-parallel",
      "--seq-length", "15", "--max-position-embeddings", "16"],
     "--seq-length 15 is not divisible by --tensor-model-parallel-size 2"),
]


@pytest.mark.parametrize("extra,message", TP_REFUSALS)
def test_parallel_layout_refusals(extra, message, capsys):
    assert train_main(TINY + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_job_that_cannot_join_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert train_main(TINY + ["--world-size", "2", "--rank", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init-method" in err, err


PIPELINE_REFUSALS = [
    (["--pipeline-model-parallel-size", "2", "--world-size", "2", "--num-layers", "3"],
     "--num-layers 3 does not split evenly"),
    (["--pipeline-model-parallel-size", "3", "--world-size", "3", "--num-layers", "7",
      "--decoder-first-pipeline-num-layers", "2"],
     "the remaining 5 must divide evenly over the 2 other stages"),
    (["--pipeline-model-parallel-size", "2", "--world-size", "2", "--num-layers", "4",
      "--num-virtual-stages-per-pipeline-rank", "2", "--global-batch-size", "3"],
     "needs the micro-batches per step (3 = global batch / (micro batch x data-parallel "
     "size)) to be a multiple of --pipeline-model-parallel-size 2"),
    (["--pipeline-model-parallel-size", "2", "--world-size", "2", "--num-layers", "2",
      "--num-virtual-stages-per-pipeline-rank", "2", "--global-batch-size", "4"],
     "--num-layers 2 is not enough for 4 pipeline stages (pipeline size 2 x virtual "
     "stages 2)"),
    (["--pipeline-model-parallel-size", "2", "--world-size", "2", "--num-layers", "6",
      "--num-layers-per-virtual-pipeline-stage", "2"],
     "--num-layers 6 is not divisible by --pipeline-model-parallel-size 2 x "
     "--num-layers-per-virtual-pipeline-stage 2"),
]


@pytest.mark.parametrize("extra,message", PIPELINE_REFUSALS)
def test_pipeline_refusals(extra, message, capsys):
    assert train_main(TINY + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


MOE_MLA_CP_REFUSALS = [
    (["--num-experts", "6", "--expert-model-parallel-size", "4", "--world-size", "4"],
     "--num-experts 6 is not divisible by --expert-model-parallel-size 4"),
    (["--num-experts", "4", "--moe-router-topk", "5"],
     "--moe-router-topk 5 must be between 1 and --num-experts 4"),
    (["--context-parallel-size", "2", "--world-size", "2", "--seq-length", "14",
      "--max-position-embeddings", "16"],
     "--seq-length 14 is not divisible by 2 x --context-parallel-size (4)"),
    (["--multi-latent-attention", "--position-embedding-type", "rope",
      "--tensor-model-parallel-size", "8", "--world-size", "8"],
     "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 8"),
    (["--multi-latent-attention", "--position-embedding-type", "rope",
      "--qk-pos-emb-head-dim", "5"],
     "--qk-pos-emb-head-dim 5 must be even"),
    (["--multi-latent-attention", "--position-embedding-type", "rope", "--kv-lora-rank", "0"],
     "--kv-lora-rank 0 must be positive with --multi-latent-attention"),
    (["--multi-latent-attention"],
     "--multi-latent-attention needs --position-embedding-type rope"),
    (["--num-experts", "4", "--moe-layer-freq", "([0]+[1]*5)"],
     "--moe-layer-freq '([0]+[1]*5)' must list 2 zeros and ones"),
    (["--num-experts", "4", "--moe-layer-freq", "__import__('os')"],
     "--moe-layer-freq \"__import__('os')\": give an integer or a list pattern"),
]


@pytest.mark.parametrize("extra,message", MOE_MLA_CP_REFUSALS)
def test_moe_mla_cp_refusals(extra, message, capsys):
    assert train_main(TINY + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
