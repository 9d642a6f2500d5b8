"""Data: everything between raw text and the tensors a training step reads.

* `tokenizer`       Megatron's --tokenizer-type choices, and BPE training on the spot
* `indexed_dataset` Megatron's `.bin/.idx` files, read (memory-mapped) and written
* `readers`         JSONL / JSON / text input, with `file:line` errors
* `preprocess`      raw text -> `.bin/.idx` (`paratron preprocess`)
* `indices`         document / sample / shuffle / blending index arithmetic (numpy)
* `gpt_dataset`     GPT samples with Megatron's semantics; `build_train_valid_test_datasets`
* `data_paths`      `--data-path` / `--data-path-config`: which corpora, with which weights
* `index_cache`     index arrays saved once as `.npy` and memory-mapped after
* `blended`         weighted mixtures of datasets
* `mock`            Megatron's synthetic corpus for `--mock-data`
* `sft`             instruction / chat fine-tuning samples (padding or packing)
* `sampler`         micro-batches from `consumed_samples` for any data-parallel rank
* `errors`          `DataError`, the one-line error for bad data

Nothing here knows about models, training or process groups; ranks and sizes
are plain integers. Submodules are imported on use (preprocessing does not
need torch).
"""
