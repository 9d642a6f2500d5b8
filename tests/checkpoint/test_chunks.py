"""Tensors stored in chunks: each data-parallel rank writes its share of the parameters it
holds whole, nothing is gathered, and the loader puts the logical tensors back together
(metadata whose chunks overlap, leave gaps or reach past the tensor is refused)."""

import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from paratron.checkpoint import files, load_checkpoint, read_metadata, save_checkpoint
from paratron.checkpoint.checkpointing import TensorReader
from paratron.checkpoint.state import flat_blocks
from paratron.cli.args import parse_args
from paratron.parallel.process_groups import ProcessGroups
from paratron.training.trainer import Trainer
from tests.helpers.checkpoint import FLAGS, save, steps
from tests.helpers.dist_utils import run_distributed
from tests.helpers.training import BASE, PatternData, make_trainer


@pytest.mark.parametrize("shape", [[7], [3, 5], [4, 3, 2], [1, 6], [2, 1, 3]])
def test_flat_blocks_tile_every_range(shape):
    numel = torch.Size(shape).numel()
    for start in range(numel + 1):
        for stop in range(start, numel + 1):
            blocks = flat_blocks(shape, start, stop)
            assert len(blocks) <= max(1, 2 * len(shape) - 1)
            seen = torch.zeros(shape, dtype=torch.long)
            flat = torch.arange(numel).view(shape)
            for begin, offsets, sizes in blocks:
                where = tuple(slice(o, o + n) for o, n in zip(offsets, sizes))
                assert torch.equal(flat[where].reshape(-1),
                                   torch.arange(begin, begin + torch.Size(sizes).numel()))
                seen[where] += 1
            assert torch.equal(seen.view(-1)[start:stop], torch.ones(stop - start).long())
            assert seen.sum() == stop - start


def _split_first_tensor(path):
    """Rewrite one 2-D tensor of a single-process checkpoint as two chunks (row 0, rows
    1..), with the file's size and checksum updated; returns its name and value."""
    meta = json.loads((path / files.METADATA).read_text())
    name = next(n for n, e in meta["tensors"].items()
                if n.startswith("model/") and len(e["shape"]) == 2)
    chunk = meta["tensors"][name]["chunks"][0]
    file = path / chunk["file"]
    tensors = load_file(str(file))
    value = tensors.pop(chunk["key"])
    tensors[f"{name}@0_0"], tensors[f"{name}@1_0"] = value[:1].clone(), value[1:].clone()
    save_file(tensors, str(file))
    meta["files"][chunk["file"]] = {"size": file.stat().st_size,
                                    "sha256": files.file_digest(file)}
    meta["tensors"][name]["chunks"] = [
        {"file": chunk["file"], "key": f"{name}@0_0", "offsets": [0, 0],
         "shape": [1, value.shape[1]]},
        {"file": chunk["file"], "key": f"{name}@1_0", "offsets": [1, 0],
         "shape": [value.shape[0] - 1, value.shape[1]]}]
    (path / files.METADATA).write_text(json.dumps(meta))
    return name, value, meta


@pytest.fixture
def chunked(tmp_path):
    trainer = make_trainer(*FLAGS)
    steps(trainer, 1)
    path = save(trainer, tmp_path)
    return path, *_split_first_tensor(path)


def test_chunks_are_put_together(chunked):
    path, name, value, _ = chunked
    assert files.verify_checkpoint(path) == []
    read = TensorReader(path, read_metadata(path))
    assert torch.equal(read(name), value)
    assert torch.equal(read.flat(name, 5, 50), value.view(-1)[5:50])  # across both chunks
    trainer = make_trainer(*FLAGS)
    load_checkpoint(path, trainer.models, trainer.pg, trainer.optimizer, load_rng=False)
    loaded = {f"model/{n}": p for n, p in trainer.model.module.named_parameters()}
    assert torch.equal(loaded[name], value)


def _edit_chunks(path, meta, name, edit):
    edit(meta["tensors"][name]["chunks"])
    (path / files.METADATA).write_text(json.dumps(meta))


def _columns(chunks):  # blocks of columns: not runs of consecutive elements
    rows, columns = chunks[1]["shape"][0] + 1, chunks[1]["shape"][1]
    chunks[0].update(offsets=[0, 0], shape=[rows, 1])
    chunks[1].update(offsets=[0, 1], shape=[rows, columns - 1])


@pytest.mark.parametrize("edit, why", [
    (lambda chunks: chunks[1].update(offsets=[0, 0]), "cover each element once"),  # overlap
    (lambda chunks: chunks.pop(), "cover each element once"),
    (_columns, "not runs of its elements"),
    (lambda chunks: chunks[1].update(offsets=[2, 0]), "reaches past its shape"),
    (lambda chunks: chunks[0].update(shape="1x8"), "offsets and a shape"),
])
def test_chunks_that_do_not_tile_the_tensor_are_refused(chunked, edit, why):
    path, name, _, meta = chunked
    _edit_chunks(path, meta, name, edit)
    problems = files.verify_checkpoint(path)
    assert len(problems) == 1 and why in problems[0] and name in problems[0]


# ------------------------------------------------------------------ several ranks
DP_FLAGS = BASE + [*FLAGS, "--bf16", "--use-distributed-optimizer", "--world-size", "2"]


def _count_tensors_sent(sent: list) -> None:
    """Record the elements this rank gives `all_reduce` and `all_gather` from now on."""
    reduce, gather = dist.all_reduce, dist.all_gather

    def all_reduce(tensor, *args, **kwargs):
        sent.append(tensor.numel())
        return reduce(tensor, *args, **kwargs)

    def all_gather(parts, tensor, *args, **kwargs):
        sent.append(tensor.numel())
        return gather(parts, tensor, *args, **kwargs)
    dist.all_reduce, dist.all_gather = all_reduce, all_gather


def _save_dp2(save_dir):
    """One rank's part of a DP2 distributed-optimizer save: the tensor elements it sent
    through collectives while saving, its weights and its optimizer segments."""
    trainer = Trainer(parse_args(DP_FLAGS), (PatternData(), None, None),
                      pg=ProcessGroups.build(1, 1), log=lambda line: None)
    trainer.train_step()
    sent = []
    _count_tensors_sent(sent)
    save_checkpoint(save_dir, 1, trainer.models, trainer.pg, trainer.optimizer)
    names = {id(p): n for n, p in trainer.model.module.named_parameters()}
    state = trainer.optimizer.optimizer.state
    segments = [(names[id(seg.param)], seg.offset, seg.main.clone(),
                 {k: v.clone() for k, v in state[seg.main].items() if v.dim() > 0})
                for seg in trainer.optimizer.segments]
    weights = {n: p.detach().clone() for n, p in trainer.model.module.named_parameters()}
    return sum(sent), weights, segments


@pytest.mark.slow
def test_data_parallel_ranks_write_their_shares_without_gathering(tmp_path):
    results = run_distributed(2, _save_dp2, tmp_path)
    assert [sent for sent, _, _ in results] == [0, 0]
    path = files.checkpoint_dir(tmp_path, 1)
    sizes = [(path / f"model_optim_rank_{r:05d}.safetensors").stat().st_size for r in (0, 1)]
    assert abs(sizes[0] - sizes[1]) < 0.1 * sum(sizes)
    read = TensorReader(path, read_metadata(path))
    for name, value in results[0][1].items():  # every rank holds every weight
        assert torch.equal(read(f"model/{name}"), value), name
    for _, _, segments in results:
        for name, offset, main, moments in segments:
            end = offset + main.numel()
            assert torch.equal(read(f"optim/main/{name}").view(-1)[offset:end], main), name
            for key, value in moments.items():
                assert torch.equal(read(f"optim/{key}/{name}").view(-1)[offset:end],
                                   value), (key, name)
