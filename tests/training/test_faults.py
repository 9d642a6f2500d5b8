"""NaN/Inf in training: fp16's dynamic loss scaling skips and counts the step; fp32 and
bf16 stop with one line naming the iteration and the loss or the gradient, a non-zero
exit from the command line, and a checkpoint when --save is set."""

import pytest

from paratron.checkpoint import files
from paratron.cli.train import main
from paratron.cli.args import parse_args
from paratron.model.gpt import GPTModel
from paratron.training.faults import NonFiniteError
from paratron.training.pretrain import pretrain

FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --lr 1e-3 --train-iters 5 --micro-batch-size 4 "
         "--global-batch-size 4 --mock-data --vocab-size 99 --device cpu --num-workers 0 "
         "--eval-iters 0 --log-interval 5").split()


def _poison(monkeypatch, at_call: int, what: str):
    """Make the `at_call`-th forward (one per iteration here) give a NaN gradient of the
    first layer's fc1 weight (loss finite) or a NaN loss."""
    original, calls = GPTModel.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        out = original(self, *args, **kwargs)
        if len(calls) != at_call:
            return out
        if what == "loss":
            return out * float("nan")
        fired = []

        def hook(grad):
            if not fired:
                fired.append(1)
                return grad * float("nan")
            return None
        self.decoder.layers[0].mlp.linear_fc1.weight.register_hook(hook)
        return out

    monkeypatch.setattr(GPTModel, "forward", forward)


def test_fp32_nan_gradient_stops_with_one_line_and_a_checkpoint(monkeypatch, tmp_path, capsys):
    _poison(monkeypatch, 3, "grad")
    assert main(FLAGS + ["--save", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("paratron train: error: iteration 3: the gradient of "
                          "decoder.layers.0.mlp.linear_fc1.weight is nan"), err
    assert f"saved a checkpoint to {tmp_path}" in err
    # The checkpoint holds the two good iterations.
    assert files.find_latest_valid(str(tmp_path))[0] == 2


def test_bf16_nan_loss_names_the_loss(monkeypatch):
    _poison(monkeypatch, 2, "loss")
    with pytest.raises(NonFiniteError, match=r"^iteration 2: lm loss is nan; the step was "
                                             r"not applied; stopping"):
        pretrain(parse_args(FLAGS + ["--bf16"]), log=lambda line: None)


def test_fp16_overflow_is_skipped_and_counted(monkeypatch):
    _poison(monkeypatch, 3, "grad")
    lines = []
    # A small initial scale: no overflow of its own, so the injected one is the only skip.
    state = pretrain(parse_args(FLAGS + ["--fp16", "--initial-loss-scale", "16"]),
                     log=lines.append)
    assert state.iteration == 5 and state.skipped_iterations == 1
    assert state.nan_iterations == 0  # the loss itself was finite
    assert "number of skipped iterations:   1" in next(x for x in lines if "iteration  " in x)


def test_check_turned_off_skips_and_goes_on(monkeypatch):
    _poison(monkeypatch, 3, "grad")
    state = pretrain(parse_args(FLAGS + ["--no-check-for-nan-in-loss-and-grad"]),
                     log=lambda line: None)
    assert state.iteration == 5 and state.skipped_iterations == 1
