"""Make the examples' sample inputs on the spot, so that a fresh clone needs no data.

The text is the documentation every Python installation ships (the docstrings of its
standard library, as `paratron demo` uses): real English prose, the same on every
machine, nothing downloaded. From it this writes, into --out:

    corpus.jsonl                       one {"text": ...} a line (a pretraining corpus)
    alpaca.json                        Alpaca-format instructions ("What does the Python
                                       function X do?" -> its docstring), for SFT

With --gpt2-bpe CORPUS it writes instead a byte-level BPE trained on CORPUS (a JSONL
file, key "text": the sample or the user's) in the two files GPT2BPETokenizer reads,
gpt2-vocab.json and gpt2-merges.txt (the real GPT-2 files are 1.5 MB and not needed
to try the workflow).

    python examples/sample_data.py --out sample
    python examples/sample_data.py --out sample --gpt2-bpe sample/corpus.jsonl

Files already there are kept; each file is written under a temporary name and renamed
when complete (paratron's write_atomic), so an interrupted run leaves no half-written
input behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paratron.checkpoint.files import copy_atomic, write_atomic  # noqa: E402
from paratron.cli.demo import stdlib_documented  # noqa: E402

GPT2_VOCAB = 2048  # tokens of the sample BPE: enough for the corpus, cheap to train


def write_corpus(path: str, documented: list[tuple[str, str]]) -> None:
    write_atomic(path, "".join(json.dumps({"text": doc}) + "\n" for _, doc in documented))


def write_alpaca(path: str, documented: list[tuple[str, str]]) -> None:
    """Instruction records for every function and method (modules and classes, whose
    docstrings are long overviews, are left to the corpus)."""
    records = [{"instruction": f"What does the Python function {name} do?", "input": "",
                "output": doc} for name, doc in documented if _public_function(name)]
    write_atomic(path, json.dumps(records, indent=0))


def _public_function(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 1 and parts[-1][:1].islower() and not any(
        part.startswith("_") for part in parts)


def write_gpt2_bpe(corpus: str, vocab_path: str, merges_path: str) -> None:
    """A byte-level BPE with <|endoftext|>, saved as GPT-2's vocab.json + merges.txt."""
    from tokenizers import Tokenizer

    from paratron.data.tokenizer import train_bpe_tokenizer

    with tempfile.TemporaryDirectory() as work:
        text = os.path.join(work, "corpus.txt")
        with open(text, "w", encoding="utf-8") as dst:
            dst.writelines(doc + "\n" for doc in corpus_texts(corpus))
        train_bpe_tokenizer([text], work, vocab_size=GPT2_VOCAB)
        # BPE.save writes (and returns) the vocabulary first, then the merges.
        saved = Tokenizer.from_file(os.path.join(work, "tokenizer.json")).model.save(work, "gpt2")
        for source, path in zip(saved, (vocab_path, merges_path)):
            copy_atomic(source, path)


def corpus_texts(path: str) -> list[str]:
    """The "text" of each line of a JSONL corpus; a bad line stops with its number."""
    texts = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
                sys.exit(f"sample_data.py: error: {path}:{number}: not a JSON object with a "
                         f"\"text\" key; fix that line or give VOCAB_FILE and MERGE_FILE")
    return texts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write into")
    p.add_argument("--gpt2-bpe", metavar="CORPUS",
                   help="write gpt2-vocab.json and gpt2-merges.txt trained on this JSONL")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.gpt2_bpe is not None:
        vocab, merges = (os.path.join(args.out, n) for n in ("gpt2-vocab.json", "gpt2-merges.txt"))
        if not (os.path.isfile(vocab) and os.path.isfile(merges)):
            write_gpt2_bpe(args.gpt2_bpe, vocab, merges)
            print(f"sample_data.py: a {GPT2_VOCAB}-token BPE trained on {args.gpt2_bpe} in "
                  f"{vocab} and {merges}")
        return 0
    corpus, alpaca = (os.path.join(args.out, n) for n in ("corpus.jsonl", "alpaca.json"))
    if not (os.path.isfile(corpus) and os.path.isfile(alpaca)):
        documented = stdlib_documented()
        write_corpus(corpus, documented)
        write_alpaca(alpaca, documented)
        print(f"sample_data.py: wrote {corpus} ({len(documented)} documents from the Python "
              f"standard library's docstrings) and {alpaca}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
