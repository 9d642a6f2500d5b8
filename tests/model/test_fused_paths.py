"""The fused elementwise paths of a layer equal the plain formulas they replace: RMSNorm
and LayerNorm on the model dtype, rope without an fp32 copy of q/k, SwiGLU saving only
its input, and --torch-compile capturing a dense layer as one graph."""

import pytest
import torch
import torch.nn.functional as F

from paratron.cli.args import parse_args
from paratron.model.gpt import GPTModel
from paratron.model.mlp import activate
from paratron.model.norms import LayerNorm, RMSNorm
from paratron.model.rotary import RotaryEmbedding, apply_rotary
from paratron.model.transformer import compiles_as_one_graph
from paratron.parallel.random import seed_everything
from tests.helpers.training import BASE

LLAMA = ("--swiglu --normalization RMSNorm --position-embedding-type rope "
         "--disable-bias-linear --hidden-dropout 0 --attention-dropout 0 --train-iters 1 "
         "--micro-batch-size 2 --global-batch-size 2").split()


def _close(fast, plain, dtype):
    """fp32: rtol 1e-5; bf16: within 1 % of the plain result's scale."""
    if dtype == torch.float32:
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    else:
        error = (fast.float() - plain.float()).norm() / plain.float().norm()
        assert error < 1e-2, error


def _value_and_grad(fn, *inputs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)
    (out * weights).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def _saved(fn, *inputs) -> list[torch.Tensor]:
    """The tensors autograd saves while fn runs."""
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*[t.detach().requires_grad_(True) for t in inputs])
    return saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_on_the_model_dtype_equal_the_fp32_formulas(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 2, 64, generator=g) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(64, generator=g)).to(dtype)
    bias = (0.1 * torch.randn(64, generator=g)).to(dtype)
    rms = RMSNorm(64, eps=1e-6, dtype=dtype)
    rms.weight.data.copy_(weight)

    def hf_rms(x, w):  # Hugging Face Llama: fp32 statistics, weight * hidden.to(dtype)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * h.to(dtype)
    fast = _value_and_grad(lambda x, w: F.rms_norm(x, (64,), eps=1e-6) * w, x, weight)
    for a, b in zip(fast, _value_and_grad(hf_rms, x, weight)):
        _close(a, b, dtype)
    torch.testing.assert_close(rms(x), fast[0], rtol=0, atol=0)
    ln = LayerNorm(64, dtype=dtype)
    ln.weight.data.copy_(weight)
    ln.bias.data.copy_(bias)
    for a, b in zip(_value_and_grad(lambda x: ln(x), x),
                    _value_and_grad(lambda x: F.layer_norm(
                        x.float(), (64,), weight.float(), bias.float(), 1e-5).to(dtype), x)):
        _close(a, b, dtype)
    if dtype == torch.bfloat16:  # the input is saved as it is, not as an fp32 copy
        assert not [t for t in _saved(ln, x)
                    if t.dtype == torch.float32 and t.numel() == x.numel()]


def _plain_rotary(x, cos, sin, interleaved):
    """The formula rope replaced: an fp32 copy, rotate_half by concatenation."""
    rot = cos.shape[-1]
    xf = x[..., :rot].float()
    if interleaved:
        even, odd = xf[..., 0::2], xf[..., 1::2]
        turned = torch.stack([-odd, even], dim=-1).flatten(-2)
    else:
        first, second = xf.chunk(2, dim=-1)
        turned = torch.cat([-second, first], dim=-1)
    out = (xf * cos + turned * sin).to(x.dtype)
    return torch.cat([out, x[..., rot:]], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot_dim", [16, 8])
def test_rotary_equals_the_concatenating_formula(dtype, interleaved, rot_dim):
    rotary = RotaryEmbedding(rot_dim, interleaved=interleaved)
    cos, sin = rotary(torch.arange(5, 15).view(2, 5))
    x = (torch.randn(5, 2, 3, 16, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    fast = _value_and_grad(lambda x: apply_rotary(x, cos, sin, interleaved), x)
    plain = _value_and_grad(lambda x: _plain_rotary(x, cos, sin, interleaved), x)
    torch.testing.assert_close(fast[0], plain[0], rtol=0, atol=0)  # same order of operations
    _close(fast[1], plain[1], dtype)  # bf16: each product's gradient rounded on its own
    assert fast[1].dtype == dtype


def test_rotary_frequencies_are_an_fp32_buffer_that_follows_the_device():
    """No host copy per forward: the table lives where the model does, stays fp32 when
    the model becomes bf16, and stays out of checkpoints."""
    rotary = RotaryEmbedding(16)
    assert "inv_freq" in dict(rotary.named_buffers()) and not rotary.state_dict()
    expected = rotary.inv_freq.clone()
    rotary.to(torch.bfloat16)
    torch.testing.assert_close(rotary.inv_freq, expected, rtol=0, atol=0)
    rotary.to("meta")
    assert rotary.inv_freq.device.type == "meta" and rotary.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_equals_autograd_and_saves_only_its_input(dtype):
    x = (torch.randn(7, 2, 96, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)

    def plain(x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    for a, b in zip(_value_and_grad(lambda x: activate(x, "swiglu"), x),
                    _value_and_grad(plain, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # autograd's own kernels
    saved = _saved(lambda x: activate(x, "swiglu"), x)
    assert len(saved) == 1 and saved[0].shape == x.shape


def _model(*flags):
    cfg = parse_args(BASE + LLAMA + list(flags))
    cfg.model.padded_vocab_size = 128
    model = GPTModel(cfg.model)
    seed_everything(0, model.pg)
    return model


def _loss_and_grads(model, tokens):
    model.zero_grad()
    loss = model(tokens, labels=tokens.roll(-1, dims=1)).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_layers_capture_one_graph_and_equal_eager():
    """aot_eager runs dynamo's capture and AOT autograd (the custom autograd functions
    included) without inductor's C++ build, which takes minutes on a small CPU."""
    torch.manual_seed(0)
    eager = _model()
    torch.manual_seed(0)
    compiled = _model("--torch-compile", "--torch-compile-backend", "aot_eager")
    assert all(compiles_as_one_graph(compiled.config, layer)
               for layer in compiled.decoder.layers)
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    expected, compiled_run = _loss_and_grads(eager, tokens), _loss_and_grads(compiled, tokens)
    torch.testing.assert_close(compiled_run[0], expected[0], rtol=1e-5, atol=0)
    for name, grad in expected[1].items():
        torch.testing.assert_close(compiled_run[1][name], grad, rtol=1e-5, atol=1e-6,
                                   msg=name)


@pytest.mark.parametrize("flags", [["--attention-dropout", "0.1"],
                                   ["--num-experts", "4", "--moe-ffn-hidden-size", "16"]],
                         ids=["attention-dropout", "moe"])
def test_layers_that_cannot_be_one_graph_compile_in_pieces(flags):
    model = _model(*flags)
    assert not any(compiles_as_one_graph(model.config, layer)
                   for layer in model.decoder.layers)
