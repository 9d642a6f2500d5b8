"""`--fp64`: float64 weights, gradients and compute, fp32 main weights (one process).

The model and its gradient buffers are float64 and the optimizer steps fp32 main weights
and fp32 Adam moments, as it does for bf16; nothing on the way rounds to fp32 (the loss
and its gradient stay fp64). A run trains like the fp32 one, resumes bit-identically, and
checkpoints move between fp64 and fp32 runs; an fp64 checkpoint exports to Hugging Face
in float64, which transformers reads. The multi-process proof that layouts then
agree bit for bit, FP8 included, is in tests/training/test_fp8_parallel.py and
tests/parallel/test_fp8_moe.py.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from paratron.cli.args import parse_args
from paratron.cli.convert import main as convert
from paratron.options import ConfigError
from paratron.parallel.cross_entropy import chunked_vocab_parallel_cross_entropy
from tests.helpers.training import make_trainer

RUN = "--micro-batch-size 2 --global-batch-size 4 --train-iters 6 --num-workers 0".split()


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.module.named_parameters()}


def test_fp64_weights_and_gradients_with_fp32_main_weights():
    trainer = make_trainer(*RUN, "--fp64")
    assert {p.dtype for p in trainer.model.module.parameters()} == {torch.float64}
    assert {buf.data.dtype for buf in trainer.model.buffers} == {torch.float64}
    segments = trainer.optimizer.segments
    assert {s.main.dtype for s in segments} == {torch.float32}
    assert all(s.main is not s.model_view for s in segments)
    losses = trainer.train().losses
    moments = [v for state in trainer.optimizer.optimizer.state.values()
               for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    fp32 = make_trainer(*RUN).train().losses
    np.testing.assert_allclose(losses, fp32, rtol=1e-5)
    assert losses != fp32  # another precision really ran


def test_fp64_loss_is_not_rounded_to_fp32():
    """The chunked cross entropy keeps fp64 logits in fp64, forward and backward."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 40, dtype=torch.float64, generator=gen) * 4
    target = torch.randint(0, 40, (3, 5), generator=gen)
    mine = logits.clone().requires_grad_()
    loss = chunked_vocab_parallel_cross_entropy(mine, target, chunk_tokens=4)
    loss.sum().backward()
    ref = logits.clone().requires_grad_()
    want = F.cross_entropy(ref.view(-1, 40), target.view(-1), reduction="none").view(3, 5)
    want.sum().backward()
    assert loss.dtype == mine.grad.dtype == torch.float64
    torch.testing.assert_close(loss, want, rtol=1e-13, atol=0)
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("flags", [["--bf16", "--fp64"], ["--fp16", "--fp64"]])
def test_one_precision_at_a_time(flags):
    with pytest.raises(ConfigError, match=f"{flags[0]} and --fp64 are both set"):
        parse_args("--num-layers 2 --hidden-size 32 --num-attention-heads 4 "
                   "--seq-length 16 --max-position-embeddings 16".split() + flags)


def test_fp64_run_resumes_bit_identically(tmp_path):
    straight = make_trainer(*RUN, "--fp64")
    losses = straight.train().losses
    make_trainer(*RUN, "--fp64", "--save", str(tmp_path), "--save-interval", "3",
                 "--exit-interval", "3").train()
    resumed = make_trainer(*RUN, "--fp64", "--load", str(tmp_path))
    assert resumed.state.iteration == 3
    assert resumed.train().losses == losses[3:]
    want = _weights(straight)
    for name, weight in _weights(resumed).items():
        assert torch.equal(weight, want[name]), name


@pytest.mark.parametrize("saved,loaded", [([], ["--fp64"]), (["--fp64"], [])],
                         ids=["fp32_to_fp64", "fp64_to_fp32"])
def test_checkpoints_move_in_and_out_of_fp64(tmp_path, saved, loaded):
    """The fp32 main weights carry over exactly either way."""
    first = make_trainer(*RUN, *saved, "--save", str(tmp_path), "--save-interval", "3",
                         "--exit-interval", "3")
    first.train()
    second = make_trainer(*RUN, *loaded, "--load", str(tmp_path))
    assert second.state.iteration == 3
    want = _weights(first)
    for name, weight in _weights(second).items():
        assert weight.dtype == (torch.float64 if loaded else torch.float32)
        assert torch.equal(weight.float(), want[name].float()), name
    losses = second.train().losses
    assert len(losses) == 3 and all(map(np.isfinite, losses))


def test_fp64_checkpoint_exports_to_hugging_face_in_float64(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    llama = ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
             "--disable-bias-linear", "--untie-embeddings-and-output-weights"]
    trainer = make_trainer(*RUN, *llama, "--fp64", "--save", str(tmp_path / "run"),
                           "--save-interval", "6")
    trainer.train()
    export = tmp_path / "hf"
    assert convert(["--model-type", "GPT", "--loader", "paratron", "--saver", "hf",
                    "--load-dir", str(tmp_path / "run"), "--save-dir", str(export)]) == 0
    config = (export / "config.json").read_text()
    assert '"torch_dtype": "float64"' in config
    tensors = {k: v for f in export.glob("*.safetensors") for k, v in load_file(f).items()}
    assert {t.dtype for t in tensors.values()} == {torch.float64}
    ours = trainer.model.module.embedding.word_embeddings.weight.detach()
    assert torch.equal(tensors["model.embed_tokens.weight"], ours[:100])
    model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64
