"""A folder speaks only for itself: crafted checkpoint, tokenizer and Hugging Face
folders cannot make Paratron write through a planted link, read a file outside the
folder or outside the checksums, wait on a FIFO, or use a tensor whose safetensors
header lies. Each case is refused in one line (or, for a checkpoint, is "corrupt" and
the previous complete checkpoint is used)."""

import json
import os
import struct
import threading

import pytest
import torch
from safetensors.torch import save_file

from paratron.checkpoint import files
from paratron.checkpoint.files import LATEST, find_latest_valid, write_atomic
from paratron.convert.errors import ConversionError
from paratron.convert.hf_loader import SafetensorsFolder
from paratron.convert.tokenizer_files import describe
from tests.helpers.cli_utils import one_line_error, train
from tests.helpers.file_audit import FileAudit
from tests.helpers.checkpoint import FLAGS, save, steps
from tests.helpers.training import make_trainer

@pytest.fixture
def outside(tmp_path):
    """A file and a folder outside the folder under attack, with known contents."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret.txt").write_text("do not touch\n")
    return out


def untouched(outside):
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == "do not touch\n"


# ------------------------------------------------------- 1. writes never follow a link
@pytest.mark.parametrize("planted", [LATEST + ".tmp", "run_config.yaml.tmp"])
def test_temporary_names_are_not_followed(tmp_path, outside, planted):
    save_dir = tmp_path / "save"
    save_dir.mkdir()
    (save_dir / planted).symlink_to(outside / "secret.txt")
    proc = train("--save", str(save_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    untouched(outside)
    assert files.read_latest(save_dir) == 2


def test_write_atomic_refuses_a_link_at_its_target(tmp_path, outside):
    (tmp_path / LATEST).symlink_to(outside / "secret.txt")
    with pytest.raises(ValueError, match="symbolic link"):
        write_atomic(tmp_path / LATEST, "3\n")
    untouched(outside)


@pytest.mark.parametrize("planted", ["iter_0000002.tmp", "iter_0000002"])
def test_a_planted_checkpoint_folder_link_is_refused_in_one_line(tmp_path, outside, planted):
    save_dir = tmp_path / "save"
    save_dir.mkdir()
    (save_dir / planted).symlink_to(outside, target_is_directory=True)
    proc = train("--save", str(save_dir))
    one_line_error(proc, planted, "symbolic link")
    untouched(outside)


# ------------------------------------------- 2. reads stay inside folder and checksums
@pytest.fixture
def checkpoint(tmp_path):
    trainer = make_trainer(*FLAGS)
    steps(trainer, 1)
    path = save(trainer, tmp_path / "ckpt")
    return trainer, path


def _edit_metadata(path, edit):
    meta = json.loads((path / "metadata.json").read_text())
    edit(meta)
    (path / "metadata.json").write_text(json.dumps(meta))


AUDIT = FileAudit()


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_chunk_file_outside_the_checkpoint_is_not_read(checkpoint, tmp_path, where):
    trainer, path = checkpoint
    stolen = tmp_path / "elsewhere"
    stolen.mkdir()
    shard = stolen / "model_optim_rank_00000.safetensors"
    shard.write_bytes((path / "model_optim_rank_00000.safetensors").read_bytes())
    name = "../../elsewhere/model_optim_rank_00000.safetensors" if where == "relative" \
        else str(shard)

    def edit(meta):
        for entry in meta["tensors"].values():
            entry["chunks"][0]["file"] = name
    _edit_metadata(path, edit)
    said = []
    with AUDIT:
        assert find_latest_valid(path.parent, log=said.append) is None
    assert not [p for p in AUDIT.paths if p.startswith(str(stolen))], AUDIT.paths
    assert "not name a listed file" in said[-1], said


@pytest.mark.parametrize("name", ["../secret.txt", "/etc/hostname", "sub/../../x"])
def test_a_listed_file_outside_the_checkpoint_is_refused(checkpoint, name):
    _, path = checkpoint
    (path.parent / "secret.txt").write_text("x")

    def edit(meta):
        meta["files"][name] = {"size": 1, "sha256": "0" * 64}
    _edit_metadata(path, edit)
    with AUDIT:
        problems = files.verify_checkpoint(path)
    assert problems and "plain file name" in problems[0], problems
    assert not [p for p in AUDIT.paths if not p.startswith(str(path))], AUDIT.paths


def test_a_fifo_in_place_of_a_shard_is_refused_not_waited_on(checkpoint):
    _, path = checkpoint
    shard = path / "rng_rank_00000.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    result = []
    worker = threading.Thread(target=lambda: result.append(files.verify_checkpoint(path)),
                              daemon=True)
    worker.start()
    worker.join(20)
    assert result and "not a regular file" in result[0][0], result


def test_a_fifo_in_place_of_a_hugging_face_shard_is_refused(tmp_path):
    folder = _hf_folder(tmp_path / "hf", weight_map={"w": "model-00001.safetensors"})
    os.mkfifo(folder / "model-00001.safetensors")
    result = []

    def load():
        try:
            with SafetensorsFolder(folder) as found:
                found.get("w")
        except ConversionError as error:
            result.append(str(error))
    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(20)
    assert result and "not a regular file" in result[0], result


def test_a_checkpoint_folder_linked_from_elsewhere_is_not_loaded(checkpoint, tmp_path):
    _, path = checkpoint
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "iter_0000001").symlink_to(path, target_is_directory=True)
    (victim / LATEST).write_text("1\n")
    said = []
    assert find_latest_valid(victim, log=said.append) is None
    assert "outside" in said[-1], said


@pytest.mark.parametrize("name", ["../../secret.txt", "/etc/hostname"])
def test_tokenizer_info_names_only_files_inside_its_folder(tmp_path, outside, name):
    folder = tmp_path / "save" / "tokenizer"
    folder.mkdir(parents=True)
    (folder / "paratron_tokenizer.json").write_text(json.dumps(
        {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": name, "merge_file": "m.txt"}))
    from paratron.checkpoint.files import read_tokenizer_info
    with pytest.raises(ValueError, match="outside its folder"):
        read_tokenizer_info(folder)
    with pytest.raises(ConversionError, match="outside its folder"):
        describe(folder)


def _hf_folder(folder, weight_map=None, tensors=None):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = tensors or {"w": torch.ones(2, 2)}
    if weight_map is None:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("shard", ["../outside/secret.txt", "/etc/hostname"])
def test_hf_index_naming_a_shard_outside_the_folder_is_refused(tmp_path, outside, shard):
    folder = _hf_folder(tmp_path / "hf", weight_map={"w": shard})
    with pytest.raises(ConversionError, match="outside"):
        SafetensorsFolder(folder)


def test_hf_cache_snapshot_links_into_blobs_keep_working(tmp_path):
    """transformers' cache: snapshots/<rev>/model.safetensors -> ../../blobs/<hash>."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    save_file({"w": torch.ones(2, 2)}, str(repo / "blobs" / "abc123"))
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to("../../blobs/abc123")
    with SafetensorsFolder(snapshot) as found:
        assert torch.equal(found.get("w"), torch.ones(2, 2))
    # ...but not a link out of the cache entry
    (snapshot / "model.safetensors").unlink()
    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "stray.safetensors"))
    (snapshot / "model.safetensors").symlink_to(tmp_path / "stray.safetensors")
    with pytest.raises(ConversionError, match="outside"):
        SafetensorsFolder(snapshot)


# ---------------------------------------------------- 3. safetensors headers that lie
def _raw_safetensors(path, header, data=b"", length=None):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


LIES = {
    "past_end": ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8,
                 None, "offsets"),
    "huge_header": (b"{}", b"", 1 << 62, "header of"),
    "duplicate": (b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, '
                  b'"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}',
                  b"\0" * 16, None, "appears twice"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_hf_safetensors_header_lies_are_one_line(tmp_path, lie):
    header, data, length, why = LIES[lie]
    folder = tmp_path / "hf"
    folder.mkdir()
    _raw_safetensors(folder / "model.safetensors", header, data, length)
    with pytest.raises(ConversionError, match=why) as error:
        SafetensorsFolder(folder)
    assert "model.safetensors" in str(error.value)


def test_hf_int32_tensor_is_not_used_as_a_float_weight(tmp_path):
    import transformers
    from safetensors.torch import load_file
    from tests.helpers.hf_utils import one_line_error as refused
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2)
    folder = tmp_path / "hf"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.norm.weight"
    tensors[name] = torch.ones_like(tensors[name]).to(torch.int32)
    save_file(tensors, str(folder / "model.safetensors"))
    refused(folder, f"{name} is stored as int32")


def _rewrite_model_file(path, change):
    """Rewrite rank 0's tensor file through `change(tensors)` and update the metadata's
    size and checksum, as an attacker who controls the whole folder would."""
    from safetensors.torch import load_file
    name = "model_optim_rank_00000.safetensors"
    tensors = load_file(str(path / name))
    change(tensors)
    save_file(tensors, str(path / name))

    def edit(meta):
        meta["files"][name] = {"size": (path / name).stat().st_size,
                               "sha256": files.file_digest(path / name)}
    _edit_metadata(path, edit)


def test_checkpoint_tensor_of_another_dtype_than_the_index_is_corrupt(checkpoint):
    trainer, path = checkpoint
    key = "model/decoder.final_layernorm.weight"

    def change(tensors):
        tensors[key] = tensors[key].view(torch.int32)
    _rewrite_model_file(path, change)
    said = []
    assert find_latest_valid(path.parent, log=said.append) is None
    assert "int32" in said[-1] and "the index says float32" in said[-1], said


@pytest.mark.parametrize("planted", ["folder", "file"])
def test_tokenizer_copies_are_not_written_through_a_link(tmp_path, outside, planted):
    from paratron.cli.args import parse_args
    from paratron.training.run_checkpoints import save_tokenizer
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    cfg = parse_args(["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                      str(tmp_path / "vocab.json"), "--merge-file", str(tmp_path / "merges.txt"),
                      "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
                      "--seq-length", "8", "--max-position-embeddings", "8",
                      "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3"])
    save_dir = tmp_path / "save"
    save_dir.mkdir()
    if planted == "folder":
        (save_dir / "tokenizer").symlink_to(outside, target_is_directory=True)
    else:
        (save_dir / "tokenizer").mkdir()
        (save_dir / "tokenizer" / "vocab.json").symlink_to(outside / "secret.txt")
    with pytest.raises(ValueError, match="symbolic link"):
        save_tokenizer(cfg, str(save_dir))
    untouched(outside)
