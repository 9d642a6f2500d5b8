"""A Hugging Face safetensors folder as a stream of Paratron logical tensors.

Everything that can be checked without reading weights is checked before the first
group is produced: the architecture, that every tensor the mapping needs is stored with
the shape config.json implies, that no stored tensor is left unused. A conversion
therefore fails before writing anything for those mistakes; reading then goes layer by
layer through memory-mapped files.
"""

from __future__ import annotations

from pathlib import Path

from paratron.convert.hf_config import (check_model_type, config_from_hf, fp8_block_size,
                                        read_hf_config)
from paratron.convert.hf_loader import (SafetensorsFolder, check_all_used, check_tied_copy,
                                        plan_sources)
from paratron.convert.hf_mapping import EMBEDDING, architecture
from paratron.convert.streaming import StreamedModel, model_layout
from paratron.convert.tokenizer_files import describe

def read_hf_folder(folder: str | Path) -> StreamedModel:
    """The model in a Hugging Face checkpoint folder (config.json + safetensors)."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    model_type = check_model_type(hf)
    config = config_from_hf(hf)
    block = fp8_block_size(hf)  # FP8 weights are dequantized as each group is read
    arch, layout = architecture(model_type), model_layout(config)
    tied = not config.untie_embeddings_and_output_weights

    with SafetensorsFolder(folder, block) as files:  # every check that reads no weights
        used: set[str] = set()
        for names in layout.groups:
            for name in names:
                used.update(plan_sources(files, arch, name, layout.shape(name), config, 0)[1])
        if tied:
            used.update(check_tied_copy(files, arch, {}, config, None))
        check_all_used(files, arch, used)

    def groups():
        with SafetensorsFolder(folder, block) as files:
            for names in layout.groups:
                out = {}
                for name in names:
                    tensor_layout, stored = plan_sources(files, arch, name, layout.shape(name),
                                                         config, 0)
                    out[layout.key(name)] = arch.to_paratron(
                        name, [files.get(s) for s in stored], config, tensor_layout)
                embedding = out.get(f"model/{EMBEDDING}")
                if tied and embedding is not None:
                    check_tied_copy(files, arch, {EMBEDDING: embedding}, config,
                                    embedding.dtype)
                yield out

    return StreamedModel(config=config, vocab_size=config.padded_vocab_size, groups=groups,
                         num_groups=len(layout.groups), source=str(folder),
                         model_type=model_type,
                         tokenizer=describe(folder))
