"""Load a Hugging Face checkpoint folder into a Paratron GPTModel.

`config.json` gives the architecture; the weights are read tensor by tensor from
safetensors (one file or the shards of `model.safetensors.index.json`) with `safe_open`,
so no pickle is read and only one tensor's sources are in memory besides the model.
Loading is strict both ways: every Paratron tensor filled, every stored tensor used
(buffers such as `inv_freq` excepted), so a mapping mistake is one line naming the file
and tensor, never random weights left behind. Routed experts are read from whichever
layout the files hold (see `hf_mapping`). FP8 block-scaled weights (DeepSeek-V3's and
Kimi-K2's published checkpoints) are dequantized to bf16 as each is read.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from paratron.checkpoint.untrusted import FLOAT_DTYPES, inside, read_json, safetensors_header
from paratron.model.config import TransformerConfig
from paratron.convert.errors import ConversionError
from paratron.convert.hf_config import config_from_hf, fp8_block_size, read_hf_config
from paratron.convert.hf_mapping import EMBEDDING, OUTPUT, Architecture, architecture
from paratron.model.gpt import GPTModel

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The per-block dequantization factors stored beside an FP8 weight `X` as `X_scale_inv`.
SCALE_SUFFIX = "_scale_inv"


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor,
                      block: tuple[int, int]) -> torch.Tensor:
    """An FP8 weight [rows, cols] times its block factors [ceil(rows / b0), ceil(cols /
    b1)] (the last blocks of a dimension that is no multiple of the block are partial),
    in bf16 as DeepSeek's own fp8_cast_bf16 writes it."""
    rows, cols = weight.shape
    factors = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows]
    factors = factors.repeat_interleave(block[1], dim=1)[:, :cols]
    return (weight.float() * factors).to(torch.bfloat16)


class SafetensorsFolder:
    """The stored tensors of a checkpoint folder: which file holds each, opened lazily.

    Use as a context manager; files are opened on first use and closed on exit.
    block: the FP8 weight block of config.json's quantization_config (None: unquantized);
    a weight stored with a `_scale_inv` companion is then dequantized when read.
    """

    def __init__(self, folder: str | Path, block: tuple[int, int] | None = None):
        self.folder = Path(folder)
        self.block = block
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        self._headers: dict[str, dict] = {}
        index, single = self.folder / INDEX_FILE, self.folder / SINGLE_FILE
        if index.exists():
            self.source = INDEX_FILE
            self.location = self._read_index(index)
        elif single.exists():
            self.source = SINGLE_FILE
            self.location = dict.fromkeys(self._open(SINGLE_FILE).keys(), SINGLE_FILE)
        else:
            pickles = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = (f"; found only {pickles[0]} (pickle), which Paratron does not read: "
                    f"re-save it as safetensors") if pickles else ""
            raise ConversionError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            weight_map = read_json(index)["weight_map"]
        except ValueError as error:
            raise ConversionError(str(error)) from None
        except (KeyError, TypeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ConversionError(f"{index}: not a safetensors index (needs a "
                                  f"'weight_map' object of tensor names to file names)")
        for shard in sorted(set(weight_map.values())):
            try:  # a shard named ../x or /x would be read from outside the folder
                path = inside(self.folder, shard, str(index))
            except ValueError as error:
                raise ConversionError(str(error)) from None
            if not path.exists():
                raise ConversionError(f"{index}: shard {shard} is missing from {self.folder}")
        return dict(weight_map)

    def _open(self, file: str):
        if file not in self._handles:
            path = self.folder / file
            try:
                self._headers[file] = safetensors_header(
                    inside(self.folder, file, str(self.folder)))
                self._handles[file] = self._stack.enter_context(
                    safe_open(str(path), framework="pt", device="cpu"))
            except ValueError as exc:
                raise ConversionError(str(exc)) from None
            except (SafetensorError, OSError) as exc:
                raise ConversionError(f"{path}: not a readable safetensors file "
                                      f"({exc})") from None
        return self._handles[file]

    def __enter__(self) -> "SafetensorsFolder":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        return sorted(self.location)

    def lookup(self, hf_name: str, arch: Architecture) -> str | None:
        """The stored spelling of a Hugging Face tensor name, or None."""
        return next((s for s in arch.spellings(hf_name) if s in self.location), None)

    def find(self, hf_name: str, arch: Architecture, needed_for: str) -> str:
        """The stored spelling of a Hugging Face tensor name, or a one-line refusal."""
        found = self.lookup(hf_name, arch)
        if found is None:
            raise ConversionError(f"{self.folder}: tensor {hf_name} (for Paratron "
                                  f"{needed_for}) is not in {self.source}")
        return found

    def choose(self, arch: Architecture, name: str, config, offset: int
               ) -> tuple[str | None, list[str]]:
        """The layout of Paratron tensor `name` that the files hold and the stored names
        of its sources, or a one-line refusal naming a missing tensor (of the layout the
        files hold part of, else of the default one)."""
        candidates = arch.candidates(name, config, offset)
        partial = None
        for rule, hf_names in candidates:
            stored = [self.lookup(h, arch) for h in hf_names]
            if None not in stored:
                return (rule.layout or None), stored
            if partial is None and any(s is not None for s in stored):
                partial = hf_names, stored
        hf_names, stored = partial or (candidates[0][1], [None])
        missing = hf_names[stored.index(None)]
        raise ConversionError(f"{self.folder}: tensor {missing} (for Paratron {name}) "
                              f"is not in {self.source}")

    def _handle_with(self, name: str):
        file = self.location[name]
        handle = self._open(file)
        if name not in handle.keys():
            raise ConversionError(f"{self.folder / file}: lacks tensor {name}, which "
                                  f"{INDEX_FILE} places there")
        return handle

    def shape(self, name: str) -> tuple[int, ...]:
        self._handle_with(name)
        return tuple(self._headers[self.location[name]][name][1])

    def dtype(self, name: str) -> str:
        """The stored dtype's torch name ("bfloat16", "int32", ...)."""
        self._handle_with(name)
        return self._headers[self.location[name]][name][0]

    def scale_of(self, name: str) -> str | None:
        """The stored block factors of FP8 weight `name`, or None."""
        scale = name + SCALE_SUFFIX
        return scale if self.block and scale in self.location else None

    def check_quantized(self, name: str) -> None:
        """Refuse an FP8 weight without block factors, or whose factors do not cover it
        in blocks of `self.block`."""
        scale, dtype = self.scale_of(name), self.dtype(name)
        if scale is None:
            if dtype.startswith("float8"):
                hint = (f"no {name}{SCALE_SUFFIX} beside it" if self.block else
                        "config.json has no quantization_config")
                raise ConversionError(f"{self.where(name)}: {name} is stored as {dtype} but "
                                      f"{hint}")
            return
        shape = self.shape(name)
        want = tuple(-(-n // b) for n, b in zip(shape, self.block))
        if len(shape) != 2 or self.shape(scale) != want:
            raise ConversionError(f"{self.where(scale)}: {scale} has shape "
                                  f"{list(self.shape(scale))}, but {name} {list(shape)} in "
                                  f"blocks of {list(self.block)} needs {list(want)}")

    def get(self, name: str) -> torch.Tensor:
        tensor = self._handle_with(name).get_tensor(name)
        scale = self.scale_of(name)
        if scale is None:
            return tensor
        return dequantize_blocks(tensor, self._handle_with(scale).get_tensor(scale),
                                 self.block)

    def where(self, name: str) -> Path:
        return self.folder / self.location[name]


def plan_sources(files: SafetensorsFolder, arch: Architecture, name: str,
                 shape: torch.Size, config, offset: int) -> tuple[str | None, list[str]]:
    """The stored layout and names of the tensors that make Paratron tensor `name`
    (whose shape is `shape`), shape-checked without reading them."""
    layout, stored = files.choose(arch, name, config, offset)
    # The shapes the sources must have: the inverse transform of the target's shape.
    expected = arch.to_hf(name, torch.empty(shape, device="meta"), config, offset, layout)
    for stored_name, want in zip(stored, expected.values(), strict=True):
        files.check_quantized(stored_name)
        got = files.shape(stored_name)
        if files.dtype(stored_name) not in FLOAT_DTYPES and want.is_floating_point():
            raise ConversionError(f"{files.where(stored_name)}: {stored_name} is stored as "
                                  f"{files.dtype(stored_name)}, not a floating-point weight")
        if got != tuple(want.shape):
            raise ConversionError(f"{files.where(stored_name)}: {stored_name} has shape "
                                  f"{list(got)}, but config.json implies {list(want.shape)}")
    return layout, stored


def _read_sources(files: SafetensorsFolder, arch: Architecture, name: str,
                  target: torch.Tensor, config, offset: int) -> tuple[list[str], torch.Tensor]:
    """The stored tensors that make Paratron tensor `name`, shape-checked, transformed."""
    layout, stored = plan_sources(files, arch, name, target.shape, config, offset)
    return stored, arch.to_paratron(name, [files.get(s) for s in stored], config, layout)


def load_hf_weights(model: GPTModel, folder: str | Path, model_type: str,
                    dtype: torch.dtype = torch.float32) -> None:
    """Fill every tensor of `model` (one stage, TP=1) from a Hugging Face folder.

    Floating-point parameters become `dtype`; non-persistent buffers (rotary
    frequencies) are left as the model computed them, in fp32.
    """
    arch, config = architecture(model_type), model.config
    offset = model.decoder.layer_offset
    block = fp8_block_size(read_hf_config(folder))
    state = model.state_dict(keep_vars=True)
    params = dict(model.named_parameters())
    used: set[str] = set()
    with SafetensorsFolder(folder, block) as files:
        for name, target in state.items():
            stored, value = _read_sources(files, arch, name, target, config, offset)
            used.update(stored)
            # Parameters become `dtype`; buffers (DeepSeek-V3's expert bias) keep the
            # precision the model gave them.
            cast_to = dtype if name in params and target.is_floating_point() else target.dtype
            with torch.no_grad():
                target.data = value.to(cast_to).contiguous()
        if OUTPUT not in state and model.output_layer is not None:
            used.update(check_tied_copy(files, arch, state, config, dtype))
        check_all_used(files, arch, used)


def check_all_used(files: SafetensorsFolder, arch: Architecture, used: set[str]) -> None:
    """Refuse stored tensors the mapping does not consume (buffers excepted); the block
    factors of a used FP8 weight are used with it."""
    used = used | {files.scale_of(n) for n in used} - {None}
    unused = [n for n in files.names() if n not in used and not arch.is_ignored(n)]
    if unused:
        raise ConversionError(f"{files.where(unused[0])}: tensor {unused[0]} is not used "
                              f"by the {arch.name} mapping ({len(unused)} unused in all)")


def check_tied_copy(files: SafetensorsFolder, arch: Architecture, state: dict,
                     config, dtype: torch.dtype) -> list[str]:
    """A tied model's checkpoint may still store the output layer; it must then equal
    the embeddings, since Paratron will use the embeddings in its place."""
    names = arch.hf_names(OUTPUT)
    present = [next((s for s in arch.spellings(h) if s in files.location), None)
               for h in names]
    if None in present:
        return []
    embedding = state.get(EMBEDDING)
    if embedding is None:  # a later pipeline stage; the first stage checks the copy
        return present
    _, value = _read_sources(files, arch, OUTPUT, embedding, config, 0)
    if not torch.equal(value.to(dtype), embedding.detach()):
        raise ConversionError(f"{files.where(present[0])}: {present[0]} differs from the "
                              f"embeddings although config.json sets tie_word_embeddings")
    return present


def load_hf_model(folder: str | Path, dtype: torch.dtype = torch.float32
                  ) -> tuple[TransformerConfig, GPTModel]:
    """The TransformerConfig and a GPTModel (single process, eval mode) holding the
    weights of the Hugging Face checkpoint in `folder`."""
    hf = read_hf_config(folder)
    config = config_from_hf(hf)
    model = GPTModel(config)
    load_hf_weights(model, folder, hf["model_type"], dtype)
    return config, model.eval()
