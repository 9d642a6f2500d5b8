"""Checkpoints in one process: save -> load restores every bit of model, optimizer, loss
scaler, schedule and RNG state, and training continues with identical losses; partial
or corrupt checkpoints are recognised and the previous complete one is used."""

import os

import pytest
import torch

from paratron.checkpoint import (checkpoint_dir, find_latest_valid, load_checkpoint,
                                 load_rng_states, read_latest, verify_checkpoint)
from paratron.checkpoint import checkpointing
from tests.helpers.training import make_trainer
from tests.helpers.checkpoint import FLAGS, save, steps


def resume(trainer, path):
    """What the trainer does on --load: weights and optimizer, then the train state,
    the data iterator (creating it draws from torch's generator), the RNG states last."""
    meta = load_checkpoint(path, trainer.models, trainer.pg, trainer.optimizer,
                           load_rng=False)
    for key, value in meta["train_state"].items():
        setattr(trainer.state, key, value)
    trainer._train_iter = trainer._loader(trainer.train_ds, trainer.state.consumed_train_samples)
    assert load_rng_states(path, trainer.models, trainer.pg)
    return meta


def optimizer_snapshot(trainer):
    opt = trainer.optimizer
    out = {"steps": opt.steps, "lr": opt.lr, "scaler": opt.loss_scaler.state_dict()}
    for i, seg in enumerate(opt.segments):
        out[f"main{i}"] = seg.main.clone()
        for key, value in opt.optimizer.state[seg.main].items():
            out[f"{key}{i}"] = value.clone()
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.mark.parametrize("precision", [[], ["--bf16"]])
def test_save_load_is_bit_identical_and_training_continues(tmp_path, precision):
    a = make_trainer(*FLAGS, *precision)
    steps(a, 3)
    path = save(a, tmp_path)
    assert path == checkpoint_dir(tmp_path, 3) and read_latest(tmp_path) == 3
    weights = {n: p.detach().clone() for n, p in a.model.module.named_parameters()}
    opt_state = optimizer_snapshot(a)
    a.train()  # iterations 4..6 straight on

    b = make_trainer(*FLAGS, *precision, "--seed", "5")  # other initial weights and RNG
    found = find_latest_valid(tmp_path)
    assert found == (3, path)
    meta = resume(b, found[1])
    assert meta["iteration"] == 3 and b.state.iteration == 3
    assert b.state.consumed_train_samples == 12
    assert_same({n: p.detach() for n, p in b.model.module.named_parameters()}, weights)
    assert_same(optimizer_snapshot(b), opt_state)
    b.train()
    assert b.state.losses == a.state.losses[3:]
    for n, p in b.model.module.named_parameters():
        assert torch.equal(p, dict(a.model.module.named_parameters())[n]), n


def test_loading_needs_no_pickle(tmp_path, monkeypatch):
    a = make_trainer(*FLAGS)
    steps(a, 1)
    path = save(a, tmp_path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    resume(make_trainer(*FLAGS), path)
    assert sorted(os.listdir(path)) == ["metadata.json", "model_optim_rank_00000.safetensors",
                                        "rng_rank_00000.safetensors"]


def test_checkpoint_of_another_model_is_refused(tmp_path):
    a = make_trainer(*FLAGS)
    path = save(a, tmp_path)
    other = make_trainer(*FLAGS, "--hidden-size", "64")
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(path, other.models, other.pg, other.optimizer)


def test_weights_only_load_leaves_the_optimizer_alone(tmp_path):
    a = make_trainer(*FLAGS)
    steps(a, 2)
    path = save(a, tmp_path)
    b = make_trainer(*FLAGS)
    load_checkpoint(path, b.models, b.pg, b.optimizer, load_optim=False, load_rng=False)
    assert b.optimizer.steps == 0 and not b.optimizer.optimizer.state
    for n, p in b.model.module.named_parameters():
        assert torch.equal(p, dict(a.model.module.named_parameters())[n]), n


@pytest.fixture
def two_checkpoints(tmp_path):
    trainer = make_trainer(*FLAGS)
    steps(trainer, 1)
    first = save(trainer, tmp_path)
    steps(trainer, 1)
    second = save(trainer, tmp_path)
    assert read_latest(tmp_path) == 2 and verify_checkpoint(second) == []
    return trainer, first, second


def _damage_truncate(path):
    file = path / "model_optim_rank_00000.safetensors"
    with open(file, "r+b") as fh:
        fh.truncate(file.stat().st_size // 2)


def _damage_flip_byte(path):
    file = path / "model_optim_rank_00000.safetensors"
    data = bytearray(file.read_bytes())
    data[-5] ^= 0xFF
    file.write_bytes(bytes(data))


def _damage_missing_rng(path):
    (path / "rng_rank_00000.safetensors").unlink()


def _damage_no_metadata(path):
    (path / "metadata.json").unlink()


@pytest.mark.parametrize("damage,why", [(_damage_truncate, "bytes, expected"),
                                        (_damage_flip_byte, "checksum mismatch"),
                                        (_damage_missing_rng, "missing"),
                                        (_damage_no_metadata, "not completed")])
def test_corrupt_latest_falls_back_with_a_warning(two_checkpoints, tmp_path, damage, why):
    _, first, second = two_checkpoints
    damage(second)
    said = []
    assert find_latest_valid(tmp_path, log=said.append) == (1, first)
    assert len(said) == 1 and "iteration 1" in said[0] and why in said[0], said


def test_crash_between_shard_writes_keeps_the_previous_checkpoint(two_checkpoints, tmp_path,
                                                                   monkeypatch):
    """The process dies after the model file and before the RNG file of iteration 3:
    `latest` still names 2, the half-written directory is never a candidate, and the
    next save of that iteration starts afresh."""
    trainer = two_checkpoints[0]
    steps(trainer, 1)
    real_write, written = checkpointing._write, []

    def dying_write(path, *args):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(path)
        return real_write(path, *args)

    monkeypatch.setattr(checkpointing, "_write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        save(trainer, tmp_path)
    assert (tmp_path / "iter_0000003.tmp" / written[0].name).exists()
    assert not checkpoint_dir(tmp_path, 3).exists() and read_latest(tmp_path) == 2
    said = []
    assert find_latest_valid(tmp_path, log=said.append) == (2, checkpoint_dir(tmp_path, 2))
    assert said == []
    # latest written by hand to name the unfinished one: fall back, and say so
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3\n")
    assert find_latest_valid(tmp_path, log=said.append) == (2, checkpoint_dir(tmp_path, 2))
    assert len(said) == 1 and "iteration 2" in said[0], said
    monkeypatch.setattr(checkpointing, "_write", real_write)
    path = save(trainer, tmp_path)
    assert verify_checkpoint(path) == [] and not (tmp_path / "iter_0000003.tmp").exists()
    assert find_latest_valid(tmp_path) == (3, path)


def test_nothing_to_load(tmp_path):
    said = []
    assert find_latest_valid(tmp_path / "absent", log=said.append) is None and said == []
