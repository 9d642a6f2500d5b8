"""`paratron preprocess`: Megatron-identical ids, all input forms, and bad input that leaves nothing behind."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from tests.helpers.shared_data import shared_file
from paratron.cli.preprocess import main as preprocess
from paratron.data.indexed_dataset import IndexedDataset


def outputs(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".bin", ".idx")) or ".tmp" in p.name)


def run_fails(argv, capsys):
    """Run preprocess expecting failure; return its one-line message."""
    with pytest.raises(SystemExit) as info:
        preprocess(argv)
    message = str(info.value.code)
    assert info.value.code not in (0, None)
    assert "\n" not in message.strip()
    return message


@pytest.mark.parametrize("workers", [1, 2])
def test_c4_ids_equal_gpt2_tokenizer_fast(tmp_path, gpt2_args, gpt2_folder, workers):
    from transformers import GPT2TokenizerFast

    c4 = shared_file("pretrain/c4_demo.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    preprocess(["--input", str(c4), "--output-prefix", str(out / "c4"), "--append-eod",
                "--workers", str(workers), "--log-interval", "100000", *gpt2_args])
    ds = IndexedDataset(str(out / "c4_text_document"))
    reference = GPT2TokenizerFast.from_pretrained(str(gpt2_folder))
    texts = [json.loads(line)["text"] for line in c4.read_text().splitlines()]
    assert ds.dtype == np.uint16
    assert ds.num_documents == len(texts) == 300
    for d, text in enumerate(texts):
        assert ds.document(d).tolist() == reference(text)["input_ids"] + [50256]
    assert outputs(out) == ["c4_text_document.bin", "c4_text_document.idx"]


def test_without_eod_and_input_forms(tmp_path, gpt2_args, gpt2_folder):
    """JSONL, gzipped JSONL, a glob, plain text and an Alpaca JSON list all give the expected ids."""
    from transformers import GPT2TokenizerFast

    reference = GPT2TokenizerFast.from_pretrained(str(gpt2_folder))
    docs = ["Hello world.", "", "Second document, with more words."]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "other": "x"}) for d in docs) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "Gzipped text."}) + "\n")
    preprocess(["--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "plain"), *gpt2_args])
    ds = IndexedDataset(str(tmp_path / "plain_text_document"))
    # The empty document stays as an empty entry; no eod without --append-eod.
    assert [ds.document(d).tolist() for d in range(3)] == [reference(d)["input_ids"] for d in docs]
    assert ds.document_indices.tolist() == [0, 1, 1, 2]

    preprocess(["--input", str(tmp_path / "*.jsonl*"), "--output-prefix", str(tmp_path / "glob"),
                "--append-eod", *gpt2_args])
    ds = IndexedDataset(str(tmp_path / "glob_text_document"))
    assert ds.num_documents == 4
    assert ds.document(1).tolist() == []  # eod only after non-empty documents
    assert ds.document(3).tolist() == reference("Gzipped text.")["input_ids"] + [50256]

    (tmp_path / "t.txt").write_text("line one\n\nline two\n")
    preprocess(["--input", str(tmp_path / "t.txt"), "--output-prefix", str(tmp_path / "txt"), *gpt2_args])
    ds = IndexedDataset(str(tmp_path / "txt_text_document"))
    assert [ds.document(d).tolist() for d in range(ds.num_documents)] == [
        reference("line one")["input_ids"], reference("line two")["input_ids"]]

    alpaca = [{"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    (tmp_path / "al.json").write_text(json.dumps(alpaca, indent=2))
    preprocess(["--input", str(tmp_path / "al.json"), "--output-prefix", str(tmp_path / "al"), *gpt2_args])
    assert IndexedDataset(str(tmp_path / "al_text_document")).document(0).tolist() == \
        reference("Say hi.\n\nHi!")["input_ids"]
    preprocess(["--input", str(tmp_path / "al.json"), "--output-prefix", str(tmp_path / "al"),
                "--json-keys", "instruction", "output", *gpt2_args])
    assert IndexedDataset(str(tmp_path / "al_output_document")).document(0).tolist() == reference("Hi!")["input_ids"]


def test_split_sentences(tmp_path, gpt2_args, gpt2_folder):
    from transformers import GPT2TokenizerFast

    reference = GPT2TokenizerFast.from_pretrained(str(gpt2_folder))
    (tmp_path / "s.jsonl").write_text(json.dumps({"text": "One here. Two there! Three?"}) + "\n")
    preprocess(["--input", str(tmp_path / "s.jsonl"), "--output-prefix", str(tmp_path / "s"),
                "--split-sentences", "--append-eod", *gpt2_args])
    ds = IndexedDataset(str(tmp_path / "s_text_sentence"))
    assert ds.num_documents == 1 and len(ds) == 3
    assert ds[0].tolist() == reference("One here.")["input_ids"]
    assert ds[2].tolist() == reference("Three?")["input_ids"] + [50256]


def test_malformed_json_line_stops_with_file_and_line(tmp_path, gpt2_args, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n{"text": "fine again"}\n')
    message = run_fails(["--input", str(bad), "--output-prefix", str(tmp_path / "o"), *gpt2_args], capsys)
    assert f"{bad}:2" in message and "malformed JSON" in message
    assert outputs(tmp_path) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_skip_bad_lines_reports_count(tmp_path, gpt2_args, capsys, workers):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n{"text": "fine again"}\n[1, 2]\n')
    preprocess(["--input", str(bad), "--output-prefix", str(tmp_path / "o"), "--skip-bad-lines",
                "--workers", str(workers), *gpt2_args])
    assert IndexedDataset(str(tmp_path / "o_text_document")).num_documents == 2
    assert "Skipped 2 bad lines" in capsys.readouterr().err


def test_missing_key(tmp_path, gpt2_args, capsys):
    bad = tmp_path / "k.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text key"}\n')
    message = run_fails(["--input", str(bad), "--output-prefix", str(tmp_path / "o"), *gpt2_args], capsys)
    assert f"{bad}:2" in message and "missing key 'text'" in message
    assert outputs(tmp_path) == []


def test_empty_file(tmp_path, gpt2_args, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    message = run_fails(["--input", str(tmp_path / "empty.jsonl"), "--output-prefix", str(tmp_path / "o"),
                         "--workers", "2", *gpt2_args], capsys)
    assert "empty.jsonl" in message and "empty" in message
    assert outputs(tmp_path) == []


def test_token_id_beyond_vocabulary(tmp_path, capsys):
    (tmp_path / "ids.jsonl").write_text('{"text": "1 2 3"}\n{"text": "4 50 6"}\n')
    message = run_fails(["--input", str(tmp_path / "ids.jsonl"), "--output-prefix", str(tmp_path / "o"),
                         "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"], capsys)
    assert "ids.jsonl:2" in message and "token id 50" in message
    assert outputs(tmp_path) == []


def test_missing_input(tmp_path, gpt2_args, capsys):
    message = run_fails(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "o"),
                         *gpt2_args], capsys)
    assert "nope.jsonl" in message
    assert outputs(tmp_path) == []


def test_null_tokenizer_round_trip_int32(tmp_path):
    (tmp_path / "ids.txt").write_text("1 2 3\n70000 5\n")
    preprocess(["--input", str(tmp_path / "ids.txt"), "--output-prefix", str(tmp_path / "o"),
                "--tokenizer-type", "NullTokenizer", "--vocab-size", "100000", "--append-eod"])
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert ds.dtype == np.int32
    assert [ds.document(d).tolist() for d in range(2)] == [[1, 2, 3, 100000], [70000, 5, 100000]]
    assert not any(".tmp" in name for name in os.listdir(tmp_path))


@pytest.mark.parametrize("workers", [1, 2])
def test_patch_tokenizer_type_reads_the_load_folder(tmp_path, bpe_folder, workers):
    """--patch-tokenizer-type Qwen2Tokenizer --load <folder>, as in the Pai-Megatron-Patch commands."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(bpe_folder, local_files_only=True)
    texts = ["O Romeo, Romeo! wherefore art thou Romeo?", "Deny thy father and refuse thy name."]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess(["--input", str(tmp_path / "r.jsonl"), "--output-prefix", str(tmp_path / "r"), "--append-eod",
                "--patch-tokenizer-type", "Qwen2Tokenizer", "--load", bpe_folder, "--workers", str(workers)])
    ds = IndexedDataset(str(tmp_path / "r_text_document"))
    eod = reference.eos_token_id
    assert [ds.document(d).tolist() for d in range(2)] == [reference(t)["input_ids"] + [eod] for t in texts]
