"""`paratron inspect-data` prints exactly the tokens the training datasets hold."""

from __future__ import annotations

import json

import pytest

from paratron.cli.inspect_data import main as inspect_data
from paratron.cli.preprocess import main as preprocess
from paratron.data.gpt_dataset import build_train_valid_test_datasets, get_train_valid_test_num_samples
from paratron.data.tokenizer import NullTokenizer


@pytest.fixture
def corpus(tmp_path):
    lines = [" ".join(str((7 * d + i) % 90) for i in range(5 + d % 11)) for d in range(200)]
    (tmp_path / "ids.txt").write_text("\n".join(lines) + "\n")
    preprocess(["--input", str(tmp_path / "ids.txt"), "--output-prefix", str(tmp_path / "ids"),
                "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--append-eod", "--log-interval", "0"])
    return str(tmp_path / "ids_text_document")


@pytest.mark.parametrize("split_name,index", [("train", 0), ("valid", 1)])
def test_inspect_prints_the_training_samples(tmp_path, corpus, capsys, split_name, index):
    args = ["--data-path", corpus, "--split", "90,10,0", "--seq-length", "12", "--seed", "5",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--train-iters", "20",
            "--global-batch-size", "4", "--eval-interval", "10", "--eval-iters", "2",
            "--data-cache-path", str(tmp_path / "cache"), "--split-name", split_name, "--show", "6", "--decode"]
    assert inspect_data(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 12
    counts = get_train_valid_test_num_samples(4, train_iters=20, eval_interval=10, eval_iters=2)
    dataset = build_train_valid_test_datasets([corpus], "90,10,0", 12, 5, counts, NullTokenizer(100),
                                              cache_path=str(tmp_path / "cache"))[index]
    for k in range(6):
        tokens = json.loads(lines[2 * k])
        assert tokens == dataset[k]["tokens"].tolist()
        assert json.loads(lines[2 * k + 1]) == " ".join(map(str, tokens))


def test_inspect_mock_and_errors(tmp_path, capsys):
    assert inspect_data(["--mock-data", "--vocab-size", "64", "--seq-length", "256", "--show", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    with pytest.raises(SystemExit) as info:
        inspect_data(["--data-path", str(tmp_path / "missing"), "--seq-length", "8",
                      "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"])
    assert "does not exist" in str(info.value.code) and "\n" not in str(info.value.code)
