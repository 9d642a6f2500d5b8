"""SFT: loss exactly on the responses (English and Chinese), chat templates, padding and packing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.shared_data import shared_file
from paratron.data.errors import DataError
from paratron.data.gpt_dataset import packed_attention_mask
from paratron.data.sft import (
    SFTDataset,
    build_sft_datasets,
    load_conversations,
    read_sft_indexed,
    tokenize_conversation,
    write_sft_indexed,
)
from paratron.data.tokenizer import build_tokenizer


@pytest.fixture
def gpt2(gpt2_files):
    return build_tokenizer("GPT2BPETokenizer", vocab_file=str(gpt2_files[0]), merge_file=str(gpt2_files[1]))


def first_records(name, n):
    records = json.loads(shared_file(f"sft/{name}").read_text())
    return records[:n]


@pytest.mark.parametrize("name", ["alpaca_en_demo.json", "alpaca_zh_demo.json"])
def test_loss_mask_is_exactly_the_response(tmp_path, gpt2, name):
    records = first_records(name, 40)
    (tmp_path / "part.json").write_text(json.dumps(records, ensure_ascii=False))
    conversations = load_conversations(str(tmp_path / "part.json"))
    assert len(conversations) == 40
    for record, messages in zip(records, conversations):
        ids, mask = tokenize_conversation(messages, gpt2)
        response = ids[mask == 1].tolist()
        # The masked tokens are the output's own tokens plus one eod, at the very end.
        assert response == gpt2.encode(record["output"]) + [gpt2.eod]
        assert mask[-len(response):].all() and not mask[: len(ids) - len(response)].any()
        prompt = gpt2.decode(ids[mask == 0])
        assert record["instruction"] in prompt and (record["input"] or "") in prompt
        assert prompt.endswith("### Response:\n")

    # The same holds in the samples: loss only where the label is a response token.
    ds = SFTDataset([tokenize_conversation(m, gpt2) for m in conversations], seq_length=1024, pad=gpt2.eod,
                    seed=1)
    for k in range(len(ds)):
        sample = ds[k]
        record = records[int(ds.order[k])]
        trained = sample["labels"][sample["loss_mask"] == 1].tolist()
        assert trained == gpt2.encode(record["output"]) + [gpt2.eod]
        assert torch.equal(sample["position_ids"], torch.arange(1024))


def test_chat_template_and_messages(tmp_path, bpe_folder):
    folder = str(tmp_path / "tok")
    shutil.copytree(bpe_folder, folder)
    config_path = tmp_path / "tok" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token"] = "<|im_end|>"
    config["chat_template"] = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config_path.write_text(json.dumps(config))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=folder)
    assert tok.chat_template

    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who speaks first?"},
        {"role": "assistant", "content": "First Citizen."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "All of them."},
    ]}) + "\n")
    [messages] = load_conversations(str(tmp_path / "chat.jsonl"))
    ids, mask = tokenize_conversation(messages, tok)
    eos = tok.eod
    # Two responses, each ending with the template's <|im_end|> (the eos), nothing else trained.
    spans = np.split(ids[mask == 1], np.flatnonzero(ids[mask == 1] == eos)[:-1] + 1)
    assert [tok.decode(s) for s in spans] == ["First Citizen.<|im_end|>", "All of them.<|im_end|>"]
    assert tok.decode(ids[mask == 0]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")


def test_packing_never_attends_across_documents(gpt2):
    conversations = [tokenize_conversation([{"role": "user", "content": f"Question {i}?"},
                                            {"role": "assistant", "content": "Answer " * (i + 1)}], gpt2)
                     for i in range(12)]
    ds = SFTDataset(conversations, seq_length=64, pad=gpt2.eod, sequence_packing=True,
                    create_attention_mask=True, seed=3)
    assert len(ds) < len(conversations)  # several conversations share a sample
    total_trained = 0
    for k in range(len(ds)):
        sample = ds[k]
        doc = sample["document_ids"]
        mask = sample["attention_mask"][0]
        assert torch.equal(mask, packed_attention_mask(doc))
        allowed = ~mask
        i, j = torch.nonzero(allowed, as_tuple=True)
        assert bool((doc[i] == doc[j]).all()) and bool((j <= i).all())
        # Positions restart with every conversation.
        starts = torch.nonzero(torch.diff(doc) != 0).flatten() + 1
        assert bool((sample["position_ids"][starts] == 0).all())
        total_trained += int(sample["loss_mask"].sum())

        # Functionally: changing one document's tokens leaves the other documents' attention outputs alone.
        torch.manual_seed(0)
        emb = torch.randn(gpt2.vocab_size, 8)
        def attend(tokens):
            x = emb[tokens][None, None]
            return F.scaled_dot_product_attention(x, x, x, attn_mask=allowed)[0, 0]
        changed = sample["tokens"].clone()
        changed[doc == 0] = (changed[doc == 0] + 17) % gpt2.vocab_size
        assert torch.allclose(attend(sample["tokens"])[doc != 0], attend(changed)[doc != 0])
    # Every response token (and its eod) is trained exactly once across the packed samples.
    assert total_trained == sum(int(m[1:].sum()) for _, m in conversations)


def test_padding_length_splits_and_indexed_round_trip(tmp_path, gpt2):
    records = first_records("alpaca_en_demo.json", 30)
    (tmp_path / "a.json").write_text(json.dumps(records))
    train, valid, test = build_sft_datasets([str(tmp_path / "a.json")], "8,2,0", 512, 1, (50, 6, 0), gpt2,
                                            max_padding_length=256)
    # 24 + 6 conversations; whole shuffled epochs until the requested samples are covered.
    assert test is None and len(train) == 3 * 24 and len(valid) == 6
    assert sorted(train.order[:24].tolist()) == list(range(24))
    sample = train[0]
    assert sample["tokens"].shape == (256,) and "document_ids" not in sample

    conversations = [tokenize_conversation(m, gpt2) for m in load_conversations(str(tmp_path / "a.json"))]
    ids_prefix, _ = write_sft_indexed(conversations, str(tmp_path / "sft"), gpt2.vocab_size)
    back = read_sft_indexed(ids_prefix)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(conversations, back))
    from_indexed = build_sft_datasets([ids_prefix], "8,2,0", 512, 1, (50, 6, 0), gpt2, max_padding_length=256)
    assert torch.equal(from_indexed[0][5]["tokens"], train[5]["tokens"])


def test_bad_sft_records(tmp_path, gpt2):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x", "output": "y"}\n{"prompt": "no"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_conversations(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="empty"):
        load_conversations(str(tmp_path / "empty.json"))
