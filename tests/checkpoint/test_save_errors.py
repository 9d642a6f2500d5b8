"""A checkpoint save that the system refuses (a full disk, a file-size limit, an
unwritable folder) stops the run with one line naming the path and the cause, and
leaves no half-written checkpoint behind; the previous checkpoint stays the latest."""

import errno
import os
import resource
import signal

import pytest

from paratron.checkpoint import checkpointing, files
from tests.helpers.cli_utils import one_line_error, train
from tests.helpers.checkpoint import FLAGS, save, steps
from tests.helpers.training import make_trainer

@pytest.mark.parametrize("background", [False, True])
def test_disk_full_during_a_save_is_one_line_and_leaves_nothing(tmp_path, monkeypatch,
                                                                background):
    trainer = make_trainer(*FLAGS)
    steps(trainer, 1)
    save(trainer, tmp_path)
    steps(trainer, 1)

    def full(path, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(checkpointing, "_write", full)
    with pytest.raises(files.CheckpointError) as error:
        result = checkpointing.save_checkpoint(
            tmp_path, 2, trainer.models, trainer.pg, trainer.optimizer,
            config=trainer.cfg.to_dict(), background=background)
        result.finish()
    message = str(error.value)
    assert "No space left on device" in message and "model_optim_rank_00000" in message
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", files.LATEST]
    assert files.read_latest(tmp_path) == 1


def _limit_file_size():
    """A file-size limit of 4 KiB: writes past it fail with EFBIG (signal ignored), the
    way a full disk fails them, even for root."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_train_with_a_save_the_disk_refuses_is_one_line(tmp_path):
    save_dir = tmp_path / "save"
    proc = train("--save", str(save_dir), preexec_fn=_limit_file_size)
    one_line_error(proc, "File too large", str(save_dir))
    assert proc.returncode == 1
    assert not [p for p in save_dir.iterdir() if p.name.startswith("iter_")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_train_into_a_read_only_folder_is_one_line(tmp_path):
    save_dir = tmp_path / "save"
    save_dir.mkdir()
    save_dir.chmod(0o555)
    try:
        proc = train("--save", str(save_dir))
    finally:
        save_dir.chmod(0o755)
    one_line_error(proc, "Permission denied")
