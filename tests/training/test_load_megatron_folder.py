"""A Megatron-LM save folder given where a Paratron checkpoint is expected is refused in
one line that names it and gives the command converting it, never read as a corrupt
Paratron checkpoint (both formats write `latest_checkpointed_iteration.txt` and
`iter_XXXXXXX/`, and torch_dist a `metadata.json` too) and never trained over from
scratch. The folders are copies of the Megatron-Core-written fixtures.
"""

import shutil
from pathlib import Path

import pytest

from paratron.cli.convert import main as convert
from paratron.cli.generate import main as generate
from paratron.cli.train import main as train

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "megatron"
FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 8 "
         "--max-position-embeddings 32 --lr 1e-3 --micro-batch-size 2 --global-batch-size 2 "
         "--mock-data --vocab-size 256 --device cpu --num-workers 0 --eval-iters 0 "
         "--train-iters 2").split()
KINDS = {"torch_dist": "a Megatron-LM torch_dist (distributed) checkpoint",
         "torch": "a Megatron-LM torch (legacy) checkpoint"}


def _megatron_folder(tmp_path: Path, fmt: str) -> Path:
    folder = tmp_path / "megatron run"  # a space: the suggested command quotes it
    shutil.copytree(FIXTURES / "gpt2" / "tp2xpp2" / fmt, folder)
    return folder


def _one_line(capsys, code: int, command: str, folder: Path, fmt: str,
              flag: str = "--load") -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert err.startswith(f"paratron {command}: error: {flag} {folder}: {KINDS[fmt]}"), err
    assert (f"`paratron convert --model-type GPT --loader megatron --saver paratron "
            f"--load-dir '{folder}' --save-dir NEW_DIR`") in err, err
    return err


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
@pytest.mark.parametrize("extra", [[], ["--exit-on-missing-checkpoint"],
                                   ["--use-checkpoint-args"], ["--finetune"]])
def test_train_refuses_a_megatron_folder(tmp_path, capsys, fmt, extra):
    folder = _megatron_folder(tmp_path, fmt)
    before = sorted(p.name for p in folder.rglob("*"))
    save = tmp_path / "save"
    code = train(FLAGS + extra + ["--load", str(folder), "--save", str(save)])
    err = _one_line(capsys, code, "train", folder, fmt)
    assert "corrupt" not in err and "afresh" not in err
    assert not save.exists()  # nothing trained, nothing saved
    assert sorted(p.name for p in folder.rglob("*")) == before


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_train_refuses_one_iteration_of_a_megatron_folder(tmp_path, capsys, fmt):
    iteration = _megatron_folder(tmp_path, fmt) / "iter_0000001"
    code = train(FLAGS + ["--load", str(iteration)])
    _one_line(capsys, code, "train", iteration, fmt)


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_generate_refuses_a_megatron_folder(tmp_path, capsys, fmt):
    folder = _megatron_folder(tmp_path, fmt)
    code = generate(["--load", str(folder), "--prompt", "hello", "--device", "cpu"])
    _one_line(capsys, code, "generate", folder, fmt)


def test_convert_from_paratron_names_the_megatron_loader(tmp_path, capsys):
    folder = _megatron_folder(tmp_path, "torch_dist")
    save = tmp_path / "hf"
    code = convert(["--model-type", "GPT", "--loader", "paratron", "--saver", "hf",
                    "--load-dir", str(folder), "--save-dir", str(save)])
    _one_line(capsys, code, "convert", folder, "torch_dist", flag="--load-dir")
    assert not save.exists()
