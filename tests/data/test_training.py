"""`paratron train --data-path <prefix> --split 98,2,0` on a real corpus: it trains,
evaluates on the held-out documents, and the loss falls."""

import re
import subprocess
import sys

from paratron.data.preprocess import preprocess_data
from paratron.data.tokenizer import train_bpe_tokenizer

from tests.helpers.shared_data import shared_file


def test_train_on_tinyshakespeare_with_split(tmp_path):
    text = shared_file("tinyshakespeare/input.txt")
    tokenizer = train_bpe_tokenizer([str(text)], str(tmp_path / "tok"), vocab_size=512)
    prefix = str(tmp_path / "shakespeare")
    preprocess_data(str(text), prefix, "HuggingFaceTokenizer", tokenizer_model=tokenizer,
                    append_eod=True, log=lambda line: None)
    flags = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 "
             "--max-position-embeddings 64 --micro-batch-size 8 --global-batch-size 16 "
             "--train-iters 80 --lr 3e-3 --lr-decay-style cosine --lr-warmup-iters 5 "
             "--log-interval 20 --eval-interval 40 --eval-iters 4 --device cpu "
             "--attention-dropout 0 --hidden-dropout 0 --num-workers 0 "
             "--tokenizer-type HuggingFaceTokenizer --split 98,2,0").split()
    flags += ["--tokenizer-model", tokenizer, "--data-path", prefix + "_text_document",
              "--data-cache-path", str(tmp_path / "cache")]
    proc = subprocess.run([sys.executable, "-m", "paratron", "train", *flags],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    train = [float(x) for x in re.findall(r"\| lm loss: (\S+) \|", proc.stdout)]
    valid = [float(x) for x in re.findall(r"lm loss value: (\S+) \|", proc.stdout)]
    assert len(train) == 4 and train[-1] < train[0] - 0.5, train
    assert len(valid) == 2 and valid[1] < valid[0], valid
    assert "validation loss at iteration 40 |" in proc.stdout
