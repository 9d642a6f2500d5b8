"""The runnable examples under examples/ run end to end at their smallest size.

Each test runs an example the way its README section says (a subprocess on the CPU,
gloo between processes), only smaller, and checks what the example promises: files
written, a loss that is finite and goes down, a launcher that builds the same
arguments as the users' script. Tests that read ../shared/data skip when it is absent.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paratron.parallel.launch import CUDA_CONNECTIONS, set_cuda_device_max_connections


# --------------------------------------------------------------- CUDA_DEVICE_MAX_CONNECTIONS
@pytest.mark.parametrize("tp,cp,before,after,warns", [
    (1, 1, None, None, False),   # nothing to overlap: left alone
    (2, 1, None, "1", False),    # TP: set before the GPU is touched
    (1, 2, None, "1", False),    # CP likewise
    (2, 1, "1", "1", False),     # already right
    (2, 2, "8", "8", True),      # the user's value is kept, with a warning
])
def test_cuda_device_max_connections(tp, cp, before, after, warns):
    env = {} if before is None else {CUDA_CONNECTIONS: before}
    warning = set_cuda_device_max_connections(tp, cp, env)
    assert env.get(CUDA_CONNECTIONS) == after
    assert (warning is not None) == warns
    if warns:
        assert "\n" not in warning and f"{CUDA_CONNECTIONS}=1" in warning


def test_cuda_device_max_connections_too_late():
    env = {}
    warning = set_cuda_device_max_connections(2, 1, env, cuda_initialized=True)
    assert CUDA_CONNECTIONS not in env and "already initialised" in warning


# --------------------------------------------------------------------------- helpers
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "gpt2" / "gpt2-vocab.json").exists(),
                                reason="../shared/data (C4 sample, GPT-2 vocabulary) is absent")


def _free_port() -> int:
    """A port nobody listens on now, for torchrun's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(command, cwd, timeout=300, **env) -> str:
    proc = subprocess.run(command, cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout


def _losses(output: str, pattern: str = r"lm loss: (\S+) \|") -> list[float]:
    return [float(x) for x in re.findall(pattern, output)]


# --------------------------------------------------------------------------- gpt2
@needs_data
@pytest.mark.slow
def test_gpt2_pretrain_preprocess_then_tp2_pp2(tmp_path):
    """A user's own data (INPUT) and GPT-2's own tokenizer files -> GPT-2 BPE .bin/.idx
    -> 4 gloo processes at TP2 x PP2; the loss falls. (Without INPUT, from a fresh
    clone: tests/test_first_hour_examples.py.)"""
    out = _run(["bash", str(EXAMPLES / "gpt2_pretrain" / "run.sh")], tmp_path,
               INPUT=DATA / "pretrain" / "c4_demo.jsonl",
               VOCAB_FILE=DATA / "gpt2" / "gpt2-vocab.json",
               MERGE_FILE=DATA / "gpt2" / "gpt2-merges.txt",
               OUT=tmp_path / "out", TRAIN_ITERS=6, LOG_INTERVAL=2, EVAL_INTERVAL=6,
               MASTER_PORT=_free_port())
    assert (tmp_path / "out" / "c4_demo_text_document.bin").stat().st_size > 0
    assert not (tmp_path / "out" / "sample").exists()
    assert "4 processes, TP=2 PP=2" in out
    losses = _losses(out)  # at iterations 2, 4, 6 (and 1, when the first is shown)
    assert len(losses) >= 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert out.count("validation loss at iteration 6 |") == 1


def test_gpt2_pretrain_names_a_missing_file(tmp_path):
    proc = subprocess.run(["bash", str(EXAMPLES / "gpt2_pretrain" / "run.sh")], cwd=tmp_path,
                          env=_env(INPUT=tmp_path / "nope.jsonl"), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"gpt2_pretrain/run.sh: error: INPUT={tmp_path / 'nope.jsonl'} not found; "
        "set INPUT to your file, or unset it to use the sample"]


# --------------------------------------------------------------- megatron_core example
MCORE = ["--num-layers=2", "--hidden-size=64", "--num-attention-heads=4", "--batch-size=4",
         "--seq-length=32", "--train-steps=6", "--dataset-size=100", "--device=cpu",
         "--vocab-size=128"]


@pytest.mark.slow
def test_megatron_core_example_tp2_sp_equals_one_process(tmp_path):
    """Seed 002's interface: one process, then torchrun TP2 + SP; same losses (fp32)."""
    script = str(EXAMPLES / "megatron_core_training_example.py")
    single = _run([sys.executable, script, *MCORE, "--monitor-memory-continuously",
                   "--memory-monitor-interval=0.05", "--save-performance-summary"], tmp_path)
    summary = json.loads((tmp_path / "performance_summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens_per_second"] > 0
    assert summary["peak_memory_mib"] > 0 and summary["memory_samples"] >= 2
    tp2 = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port()), script, *MCORE,
                "--tensor-model-parallel-size=2", "--sequence-parallel"], tmp_path)
    pattern = r"\| loss (\S+) \|"
    assert len(_losses(single, pattern)) == 6
    assert _losses(tp2, pattern) == pytest.approx(_losses(single, pattern), rel=1e-5)
    assert _losses(single, pattern)[-1] < _losses(single, pattern)[0]


def test_megatron_core_example_epochs_bound_the_steps(tmp_path):
    out = _run([sys.executable, str(EXAMPLES / "megatron_core_training_example.py"),
                *MCORE, "--train-steps=1000", "--epochs=2", "--dataset-size=10"], tmp_path)
    assert "5 steps of 4 samples" in out  # ceil(2 x 10 / 4)


def test_megatron_core_example_refuses_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "megatron_core_training_example.py"),
                           *MCORE, "--num-attention-heads=3"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("megatron_core_training_example.py: error: ")


# ------------------------------------------------------------ run_mcore_deepseek.sh
from tests.helpers.seed_args import SEED_ARGS  # noqa: E402

LAUNCHER = EXAMPLES / "deepseek_v2" / "run_mcore_deepseek.sh"
# The seed documents' calls (000: pretraining at TP1 PP4 EP2 with MP_PP0_LAYERS=6;
# 003: pretraining at TP2 EP4, and SFT on raw Alpaca JSON at TP=PP=CP=EP=1).
SEED_CALLS = {
    "000_deepseek_v2_lite_run_mcore_sh": (
        {"MP_PP0_LAYERS": "6"},
        "dsw A2.4B 1 8 1e-5 1e-6 1024 1024 bf16 1 4 1 2 true true true false sel false 100000 "
        "/data/mmap_deepseekv2_datasets_text_document /data/mmap_deepseekv2_datasets_text_document "
        "/ckpt/DeepSeek-V2-Lite-to-mcore-tp1-pp4-ep2 1000000000 10000 /output/ds2-pretrain"),
    "003_deepseek_pretrain": (
        {},
        "dsw A2.4B 1 8 1e-5 1e-6 128 128 bf16 2 1 1 4 true true true false false false 100000 "
        "/data/mmap_deepseekv2_datasets_text_document /data/mmap_deepseekv2_datasets_text_document "
        "/ckpt/DeepSeek-V2-Lite-to-mcore-tp2-pp1-ep4 10000 100 /output/ds2-pretrain"),
    "003_deepseek_sft_raw_json": (
        {"MP_DATASET_TYPE": "raw"},
        "dsw A2.4B 1 8 1e-5 1e-6 128 128 bf16 1 1 1 1 true true true true false false 100000 "
        "/data/alpaca_zh-train.json /data/alpaca_zh-train.json "
        "/ckpt/DeepSeek-V2-Lite-to-mcore-tp2-pp1-ep4 10000 100 /output/ds2-finetune"),
}


def _flag_values(tokens: list[str]) -> dict[str, list[str]]:
    """{flag: its values} of a Megatron argument list (a repeated flag is an error)."""
    flags: dict[str, list[str]] = {}
    for token in tokens:
        if token.startswith("--"):
            assert token not in flags, f"{token} given twice"
            current = flags[token] = []
        else:
            current.append(token)
    return flags


@pytest.mark.parametrize("seed", list(SEED_CALLS))
def test_run_mcore_deepseek_builds_the_seed_arguments(seed, tmp_path):
    """The 26 positional arguments and MP_* variables give the flags the seed's script
    gives Megatron (tests/seed_args.py), plus the preset that carries what those flags
    leave implicit, DeepSeek-V2-Lite's dense first layer and its context length."""
    env, args = SEED_CALLS[seed]
    out = _run(["bash", str(LAUNCHER), *args.split()], tmp_path, DRY_RUN=1, MASTER_PORT=29650,
               GPUS_PER_NODE=8, **env)
    command = shlex.split(out)
    launcher, train = command[:command.index("paratron")], command[command.index("train") + 1:]
    assert launcher[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "8", "--nnodes",
                            "1", "--node_rank", "0", "--master_addr", "localhost",
                            "--master_port", "29650", "-m"]
    got, want = _flag_values(train), _flag_values(SEED_ARGS[seed])
    output = args.split()[-1]
    assert got.pop("--save")[0].startswith(output + "/checkpoint/")
    assert got.pop("--tensorboard-dir")[0].startswith(output + "/tensorboard/")
    want.pop("--save"), want.pop("--tensorboard-dir")
    assert got.pop("--model-size") == ["deepseek-v2-lite"]
    assert got.pop("--moe-layer-freq") == ["([0]+[1]*26)"] and want.pop("--moe-layer-freq") == ["1"]
    # The model's context rather than SEQ_LEN, so that an export keeps it.
    assert got.pop("--max-position-embeddings") == ["163840"]
    want.pop("--max-position-embeddings")
    assert got == want


def _launch_error(tmp_path, args: str, **env) -> str:
    proc = subprocess.run(["bash", str(LAUNCHER), *args.split()], cwd=tmp_path,
                          env=_env(**env), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run_mcore_deepseek.sh: error: "), lines
    return lines[0]


TINY_CALL = ("dsw tiny 1 4 1e-3 1e-4 64 64 {pr} 1 1 1 1 true true true false {ac} false 1000 "
             "{data} {data} none 2560 0 {out}")


def test_run_mcore_deepseek_refuses_in_one_line(tmp_path):
    call = dict(pr="bf16", ac="false", data=tmp_path / "d", out=tmp_path / "o")
    assert "expected 26 arguments, got 3" in _launch_error(tmp_path, "dsw A2.4B 1")
    assert "PR=fp9: use one of fp16 bf16 fp8" in _launch_error(
        tmp_path, TINY_CALL.format(**dict(call, pr="fp9")))
    assert "AC=some: use one of" in _launch_error(
        tmp_path, TINY_CALL.format(**dict(call, ac="some")))
    if not torch.cuda.is_available():
        assert "PR=fp8 needs GPUs" in _launch_error(
            tmp_path, TINY_CALL.format(**dict(call, pr="fp8")))
    # Paratron's own checks run before any process starts.
    assert "--num-attention-heads 4 is not divisible by" in _launch_error(
        tmp_path, TINY_CALL.format(**call).replace(" 1 1 1 1 true", " 8 1 1 1 true"),
        GPUS_PER_NODE=8)


# ------------------------------------------------------- HF -> train -> HF workflows
# The Qwen and DeepSeek-V2 workflows run from a fresh clone, on the sample data they
# make themselves: tests/test_first_hour_examples.py.


# ------------------------------------------------------------ launchers and debugging
def _vscode_configurations() -> dict[str, dict]:
    text = (EXAMPLES / "vscode" / "launch.json").read_text()
    data = json.loads("\n".join(line for line in text.splitlines()
                                if not line.strip().startswith("//")))
    return {c["name"]: c for c in data["configurations"]}


def test_vscode_launch_configurations_are_valid_runs(monkeypatch):
    """Every launch.json configuration is a run Paratron accepts at its process count
    (the one-process one is run by the pdb test, the TP2 flags by the SLURM test)."""
    from paratron.cli.args import parse_args
    for name, config in _vscode_configurations().items():
        args = config["args"]
        if config["module"] == "torch.distributed.run":
            assert config["subProcess"] is True, name
            monkeypatch.setenv("WORLD_SIZE", args[args.index("--nproc_per_node") + 1])
            args = args[args.index("train") + 1:]
        else:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
            args = args[1:]
        cfg = parse_args(args)
        assert cfg.training.device == "cpu" and cfg.data.num_workers == 0, name


def test_python_m_pdb_stops_in_the_trainer(tmp_path):
    """The README's single-process pdb recipe: a breakpoint in Trainer.train_step is hit
    and the trainer's state can be printed."""
    line = next(i for i, text in enumerate(
        (ROOT / "paratron" / "training" / "trainer.py").read_text().splitlines(), 1)
        if text.startswith("    def train_step"))
    commands = (f"b {ROOT / 'paratron' / 'training' / 'trainer.py'}:{line + 3}\nc\n"
                "p ('STATE', self.state.iteration, self.num_microbatches)\nq\n")
    proc = subprocess.run([sys.executable, "-m", "pdb", "-m", "paratron", *_vscode_configurations()[
        "Paratron: one process, no launcher"]["args"]], cwd=tmp_path, env=_env(),
        input=commands, capture_output=True, text=True, timeout=300)
    assert "('STATE', 0, 2)" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_slurm_template_launches_torchrun(tmp_path):
    """examples/slurm/train.sbatch on a one-node allocation, with srun and scontrol
    stood in for by scripts: torchrun rendezvous on the first node, flags passed on."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho localhost\necho node2\n")
    (bin_dir / "srun").write_text('#!/bin/bash\nshift\nexec "$@"\n')  # drop --kill-on-bad-exit
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    tp2 = _vscode_configurations()["Paratron: torchrun 2 processes, TP2 on CPU (gloo)"]["args"]
    out = _run(["bash", str(EXAMPLES / "slurm" / "train.sbatch"), *tp2[tp2.index("train") + 1:]],
        tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES=1, SLURM_NODEID=0, SLURM_JOB_ID=7, GPUS_PER_NODE=2, MASTER_PORT=_free_port(),
        PARATRON_HOME=ROOT)
    assert len(_losses(out)) == 5
