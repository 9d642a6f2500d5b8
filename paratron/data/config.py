"""The data settings (`DataConfig`, `cfg.data`): data files, tokenizer and loading."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from paratron.options import opt


@dataclass
class DataConfig:
    """Data files, tokenizer and data loading."""

    GROUP: ClassVar[str] = "data and dataloader"

    data_path: list[str] | None = opt(None, "Dataset prefix, or weight-prefix pairs to "
                                      "blend.", nargs="*")
    data_path_config: str | None = opt(None, "YAML file describing the data blend.")
    train_data_path: list[str] | None = opt(None, "Separate training data.", nargs="*")
    valid_data_path: list[str] | None = opt(None, "Separate validation data.", nargs="*")
    test_data_path: list[str] | None = opt(None, "Separate test data.", nargs="*")
    split: str = opt("969, 30, 1", "Train, validation, test proportions.")
    seq_length: int | None = opt(None, "Sequence length of a sample.", type=int, positive=True)
    mock_data: bool = opt(False, "Deterministic synthetic tokens (no files needed).")
    num_workers: int | None = opt(None, "Data-loader worker processes (default: none, "
                                  "batches are read in the training process).", type=int)
    data_cache_path: str | None = opt(None, "Where sample indices are cached.")
    eod_mask_loss: bool = opt(False, "No loss on end-of-document tokens.")
    reset_position_ids: bool = opt(False, "Restart position ids after each end of document.")
    reset_attention_mask: bool = opt(False, "No attention across documents.")
    dataloader_type: str = opt("single", "How samples are drawn.", choices=["single", "cyclic"])
    dataset: str = opt("MMAP", "Dataset kind (Pai-Megatron-Patch).",
                       choices=["MMAP", "JSON-SFT", "MMAP-SFT", "RAW"])
    sft: bool = opt(False, "Supervised fine-tuning data: loss only on responses.")
    max_padding_length: int | None = opt(None, "Pad SFT samples to this length.", type=int,
                                         positive=True)
    sequence_packing: bool = opt(False, "Pack SFT samples into seq-length.")
    tokenizer_type: str | None = opt(None, "Tokenizer kind.", group="tokenizer",
                                     choices=["GPT2BPETokenizer", "HuggingFaceTokenizer",
                                              "GPTSentencePieceTokenizer",
                                              "SentencePieceTokenizer", "Llama2Tokenizer",
                                              "NullTokenizer"])
    patch_tokenizer_type: str | None = opt(None, "Pai-Megatron-Patch tokenizer name; read as "
                                           "HuggingFaceTokenizer.", group="tokenizer")
    vocab_file: str | None = opt(None, "GPT-2 vocab.json.", group="tokenizer")
    merge_file: str | None = opt(None, "GPT-2 merges.txt.", group="tokenizer")
    tokenizer_model: str | None = opt(None, "SentencePiece model or Hugging Face tokenizer "
                                      "folder.", group="tokenizer")

    def default_tokenizer(self) -> None:
        """GPT-2's vocab.json and merges.txt without --tokenizer-type name the GPT-2 BPE
        tokenizer: Megatron-LM's pretrain_gpt.py defaults --tokenizer-type to it
        (args_defaults), so scripts written for it give the two files alone."""
        if (self.tokenizer_type is None and self.patch_tokenizer_type is None
                and self.vocab_file is not None and self.merge_file is not None):
            self.tokenizer_type = "GPT2BPETokenizer"
