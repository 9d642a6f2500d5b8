"""Mean next-token loss of Hugging Face checkpoints on a text sample, with transformers.

The last step of the conversion examples: the model exported by `paratron convert
--saver hf` loads in transformers as it is, and after training its loss on the
training text is lower than the starting checkpoint's.

    python examples/hf_loss.py --text corpus.jsonl --model start-hf trained-hf
"""

from __future__ import annotations

import argparse
import json
import sys


def documents(path: str, count: int) -> list[str]:
    """The first `count` texts of a JSONL corpus ("text") or an Alpaca JSON list."""
    with open(path, encoding="utf-8") as fh:
        if path.endswith(".jsonl"):
            records = [json.loads(line) for line, _ in zip(fh, range(count))]
        else:
            records = json.load(fh)[:count]
    return [r["text"] if "text" in r else " ".join(str(v) for v in r.values())
            for r in records]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", required=True, help="Hugging Face folders")
    p.add_argument("--text", required=True, help="JSONL with a text key, or Alpaca JSON")
    p.add_argument("--documents", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128)
    args = p.parse_args(argv)

    import torch
    import transformers

    texts = documents(args.text, args.documents)
    for folder in args.model:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt").input_ids[:, :args.seq_length]
                if ids.shape[1] < 2:
                    continue
                loss = model(input_ids=ids, labels=ids).loss
                total, count = total + float(loss) * (ids.shape[1] - 1), count + ids.shape[1] - 1
        print(f"{folder}: loss {total / count:.4f} over {count} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
