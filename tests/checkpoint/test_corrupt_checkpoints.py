"""Corrupt or hostile checkpoint metadata: the checkpoint is "incomplete or corrupt",
the previous complete one is used with a warning, and with none left the refusal is one
line. Nothing raises a Python exception other than the one-line ValueError."""

import json

import pytest
from safetensors.torch import load_file, save_file

from paratron.checkpoint import files
from paratron.checkpoint.files import LATEST, find_latest_valid
from tests.helpers.cli_utils import train
from tests.helpers.checkpoint import FLAGS, save, steps
from tests.helpers.training import make_trainer


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Two checkpoints (iterations 1 and 2) of a tiny run, copied fresh for each test."""
    root = tmp_path_factory.mktemp("pristine")
    trainer = make_trainer(*FLAGS)
    for _ in range(2):
        steps(trainer, 1)
        save(trainer, root)
    return root


@pytest.fixture
def two(pristine, tmp_path):
    import shutil
    shutil.copytree(pristine, tmp_path / "save")
    return tmp_path / "save"


def _meta(save_dir, edit):
    file = save_dir / "iter_0000002" / "metadata.json"
    meta = json.loads(file.read_text())
    meta = edit(meta) or meta
    file.write_text(meta if isinstance(meta, str) else json.dumps(meta))


def _set(key, value):
    def edit(meta):
        meta[key] = value
    return edit


def _drop(key):
    def edit(meta):
        del meta[key]
    return edit


def _nested(meta):
    return '{"format_version": 1, "x": ' + "[" * 200_000 + "]" * 200_000 + "}"


METADATA_DAMAGE = {
    "nested_200k": (_nested, "nested too deep"),
    "files_a_list": (_set("files", ["model_optim_rank_00000.safetensors"]), "'files'"),
    "no_tensors": (_drop("tensors"), "'tensors'"),
    "no_iteration": (_drop("iteration"), "'iteration'"),
    "iteration_negative": (_set("iteration", -5), "'iteration'"),
    "iteration_text": (_set("iteration", "ten"), "'iteration'"),
    "iteration_huge": (_set("iteration", 10 ** 30), "'iteration'"),
    "train_state_huge": (lambda m: m["train_state"].update(consumed_train_samples=10 ** 30),
                         "'train_state'"),
    "train_state_list": (lambda m: m["train_state"].update(iteration=[2]), "'train_state'"),
    "optimizer_nan_scale": (lambda m: m["optimizer"]["loss_scaler"].update(scale=float("nan")),
                            "'optimizer'"),
    "shape_negative": (lambda m: m["tensors"]["model/decoder.final_layernorm.weight"].update(
        shape=[-32]), "needs a shape"),
    "dtype_unknown": (lambda m: m["tensors"]["model/decoder.final_layernorm.weight"].update(
        dtype="complex1024"), "needs a shape"),
    "not_json": (lambda m: "{not json", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(METADATA_DAMAGE))
def test_hostile_metadata_falls_back_to_the_previous_checkpoint(two, case):
    damage, why = METADATA_DAMAGE[case]
    _meta(two, damage)
    said = []
    assert find_latest_valid(two, log=said.append) == (1, two / "iter_0000001")
    assert len(said) == 1 and "iteration 1" in said[0] and why in said[0], said


def test_rng_state_of_the_wrong_shape_falls_back(two):
    folder = two / "iter_0000002"
    name = "rng_rank_00000.safetensors"
    from safetensors import safe_open
    with safe_open(str(folder / name), framework="pt") as fh:
        header = fh.metadata()
    tensors = load_file(str(folder / name))
    tensors["python"] = tensors["python"][:10].clone()
    save_file(tensors, str(folder / name), metadata=header)

    def edit(meta):
        meta["files"][name] = {"size": (folder / name).stat().st_size,
                               "sha256": files.file_digest(folder / name)}
    _meta(two, edit)
    said = []
    assert find_latest_valid(two, log=said.append) == (1, two / "iter_0000001")
    assert "RNG state python" in said[0], said


@pytest.mark.parametrize("latest", ["\u00b2", pytest.param("9" * 5000, id="5000_digits"),
                                    "-5", "1e3", "", "\x00\x01"])
def test_unreadable_latest_falls_back_to_the_newest_complete(two, latest):
    (two / LATEST).write_text(latest)
    said = []
    assert find_latest_valid(two, log=said.append) == (2, two / "iter_0000002")
    assert "missing or unreadable" in said[0], said


def test_unicode_digits_in_a_folder_name_are_not_an_iteration(two):
    (two / "iter_\u00b2\u00b2\u00b2\u00b2\u00b2\u00b2\u00b2").mkdir()
    assert files.list_iterations(two) == [2, 1]


def test_resume_past_a_corrupt_checkpoint_and_refuse_when_none_is_left(tmp_path):
    save_dir = tmp_path / "save"
    first = train("--train-iters", "2", "--save", str(save_dir), "--save-interval", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    _meta(save_dir, _set("files", []))
    resumed = train("--train-iters", "3", "--load", str(save_dir), "--save", str(save_dir))
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    out = resumed.stdout + resumed.stderr
    assert "loading the previous complete checkpoint, iteration 1" in out, out[-3000:]
    assert "loaded checkpoint" in out and "at iteration 1" in out, out[-3000:]
    for it in (1, 2, 3):
        folder = save_dir / f"iter_{it:07d}"
        if folder.exists():
            (folder / "metadata.json").write_text("[" * 100_000)
    refused = train("--train-iters", "4", "--load", str(save_dir))
    err = refused.stderr.strip()
    assert refused.returncode == 2 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and "no complete checkpoint" in err, err
