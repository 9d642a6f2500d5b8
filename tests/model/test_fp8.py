"""FP8 in one process (paratron/model/fp8.py).

A layer's `Float8Matmul` computes what torchao's own `Float8Linear` computes for the same
config, forward and backward, in both formats; `hybrid` really casts the output gradient
to e5m2 and --fp8-margin really lowers the scale by 2**margin (both checked against a hand
computation). A tiny model trains in FP8 where FP8 belongs and nowhere else, the flags
that FP8 cannot honour are refused in one line, and checkpoints carry no FP8 state: an
FP8 run resumes bit-identically, and checkpoints move in and out of FP8.
"""

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from paratron.cli.args import parse_args
from paratron.cli.train import main as train_main
from paratron.model.fp8 import Float8Matmul, torchao_config
from paratron.model.mla import ReplicatedLinear
from paratron.options import ConfigError
from paratron.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from tests.helpers.sync_guard import HostSyncGuard, report
from tests.helpers.training import BASE, make_trainer

FORMATS = ("e4m3", "hybrid")
GRAD_DTYPE = {"e4m3": torch.float8_e4m3fn, "hybrid": torch.float8_e5m2}
RUN = ("--micro-batch-size 2 --global-batch-size 4 --train-iters 6 --num-workers 0 "
       "--ffn-hidden-size 64").split()
MLA_MOE = ("--disable-bias-linear --multi-latent-attention --position-embedding-type rope "
           "--q-lora-rank 32 --kv-lora-rank 32 --qk-head-dim 16 --qk-pos-emb-head-dim 16 "
           "--v-head-dim 16 --num-experts 4 --moe-ffn-hidden-size 32 "
           "--moe-router-topk 2").split()  # every size a multiple of 16
LINEARS = (ColumnParallelLinear, RowParallelLinear, ReplicatedLinear)


def _tensors(dtype, tokens, bias, seed=0):
    """An input [*tokens, 48], a weight [64, 48], a bias and an output gradient."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, 48, generator=gen)
    w = torch.randn(64, 48, generator=gen) / 7
    b = torch.randn(64, generator=gen) if bias else None
    g = torch.randn(*tokens, 64, generator=gen) * 1e-3
    return tuple(t if t is None else t.to(dtype) for t in (x, w, b, g))


def _forward_backward(matmul, x, w, b, g):
    """matmul(x, w, b) on fresh leaves, backward of `g`: the output and the gradients."""
    leaves = [t if t is None else t.clone().requires_grad_() for t in (x, w, b)]
    y = matmul(*leaves)
    y.backward(g)
    return [y.detach()] + [t.grad for t in leaves if t is not None]


def _torchao_matmul(fp8_format, recipe="tensorwise", emulate=False, wgrad=True):
    """torchao's Float8Linear with Paratron's config, called with the given weight and
    bias as its parameters (so their gradients land on those leaves)."""
    from torchao.float8.float8_linear import Float8Linear
    config = dataclasses.replace(torchao_config(fp8_format, recipe, wgrad), emulate=emulate)

    def matmul(x, w, b=None):
        linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
        module = Float8Linear.from_float(linear, config)
        params = {"weight": w} if b is None else {"weight": w, "bias": b}
        return torch.func.functional_call(module, params, (x,))
    return matmul


def _fake_float8(t, dtype, margin=0, as_float8=False):
    """`t` rounded to float8 as a tensorwise cast does, by hand: scaled so its largest
    magnitude meets the format's largest value (lowered by 2**margin), rounded, unscaled
    (or, `as_float8`, the float8 values and their scale)."""
    from torchao.float8.float8_utils import amax_to_scale
    scale = amax_to_scale(t.abs().max().float(), dtype) / 2.0 ** margin
    limit = torch.finfo(dtype).max
    rounded = (t.float() * scale).clamp(-limit, limit).to(dtype)
    return (rounded, scale) if as_float8 else rounded.float() / scale


# ------------------------------------------------------------ 1: equal to torchao
@pytest.mark.parametrize("fp8_format", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [(32,), (16, 2)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_forward_and_backward_equal_torchao(fp8_format, dtype, tokens, bias, recipe):
    """torch._scaled_mm gives row-wise products in bf16 only, so fp32 row-wise layers
    multiply their float8 values in fp32, as torchao's emulation does."""
    x, w, b, g = _tensors(dtype, tokens, bias)
    ours = _forward_backward(Float8Matmul(fp8_format, 0, recipe=recipe), x, w, b, g)
    emulate = recipe == "rowwise" and dtype == torch.float32
    theirs = _forward_backward(_torchao_matmul(fp8_format, recipe, emulate), x, w, b, g)
    assert len(ours) == len(theirs) == 3 + bias
    for name, a, t in zip(("output", "x.grad", "w.grad", "b.grad"), ours, theirs):
        assert a.dtype == t.dtype == dtype and a.shape == t.shape, name
        torch.testing.assert_close(a, t, rtol=1e-5, atol=0, msg=name)
    y = ours[0]
    assert not torch.equal(y, F.linear(x, w, b))  # really float8, not the plain product


@pytest.mark.parametrize("fp8_format", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_fp8_wgrad_keeps_the_weight_gradient_precise(fp8_format, dtype):
    """--no-fp8-wgrad: torchao's layer with the weight gradient's casts disabled, whose
    weight gradient is the plain product g^T x; the rest stays float8."""
    x, w, b, g = _tensors(dtype, (32,), True)
    ours = _forward_backward(Float8Matmul(fp8_format, 0, wgrad=False), x, w, b, g)
    theirs = _forward_backward(_torchao_matmul(fp8_format, wgrad=False), x, w, b, g)
    for name, a, t in zip(("output", "x.grad", "w.grad", "b.grad"), ours, theirs):
        torch.testing.assert_close(a, t, rtol=1e-5, atol=0, msg=name)
    assert torch.equal(ours[2], g.t() @ x)
    fp8_wgrad = _forward_backward(Float8Matmul(fp8_format, 0), x, w, b, g)
    assert torch.equal(ours[1], fp8_wgrad[1]) and not torch.equal(ours[2], fp8_wgrad[2])


@pytest.mark.parametrize("fp8_format", FORMATS)
def test_fp64_multiplies_torchaos_float8_values_in_fp64(fp8_format):
    """--fp64: the same casts as torchao's fp32 layer (the values are fp32 ones), their
    products summed in fp64 and returned in fp64: within rtol 1e-5 of torchao's, plus
    the rounding of torchao's fp32 sums (1e-6 of the largest magnitude) where they cancel,
    and the output is the hand-rounded float8 values' product in fp64 (no fp32 sums)."""
    x, w, b, g = _tensors(torch.float32, (32,), True)
    ours = _forward_backward(Float8Matmul(fp8_format, 0), *(t.double() for t in (x, w, b, g)))
    theirs = _forward_backward(_torchao_matmul(fp8_format), x, w, b, g)
    for name, a, t in zip(("output", "x.grad", "w.grad", "b.grad"), ours, theirs):
        assert a.dtype == torch.float64, name
        torch.testing.assert_close(a.float(), t, rtol=1e-5, atol=1e-6 * t.abs().max().item(),
                                   msg=name)
    assert not torch.equal(ours[0], F.linear(x, w, b).double())
    x8, w8 = (_fake_float8(t, torch.float8_e4m3fn, as_float8=True) for t in (x, w))
    exact = F.linear(*(q.double() / scale.double() for q, scale in (x8, w8)), b.double())
    torch.testing.assert_close(ours[0], exact, rtol=1e-12, atol=0)


def test_hybrid_output_gradient_is_e5m2():
    """The same output gradient cast to e4m3 and to e5m2 gives other input gradients;
    each matches torchao and the hand computation with its format's rounding."""
    x, w, _, g = _tensors(torch.float32, (32,), False)
    grads = {}
    for fp8_format in FORMATS:
        matmul = Float8Matmul(fp8_format, 0)
        assert matmul.cast(x, "input")._data.dtype == torch.float8_e4m3fn
        assert matmul.cast(g, "grad")._data.dtype == GRAD_DTYPE[fp8_format]
        _, grads[fp8_format], _ = _forward_backward(matmul, x, w, None, g)
        _, theirs, _ = _forward_backward(_torchao_matmul(fp8_format), x, w, None, g)
        torch.testing.assert_close(grads[fp8_format], theirs, rtol=1e-5, atol=0)
        by_hand = _fake_float8(g, GRAD_DTYPE[fp8_format]) @ _fake_float8(w, torch.float8_e4m3fn)
        torch.testing.assert_close(grads[fp8_format], by_hand, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(grads["e4m3"], grads["hybrid"], rtol=1e-3)


@pytest.mark.parametrize("margin", [0, 1, 3])
def test_margin_divides_the_scale(margin):
    from torchao.float8.float8_utils import amax_to_scale
    gen = torch.Generator().manual_seed(1)
    # Magnitudes over four decades: a lower scale sends more of them to e4m3's
    # subnormals, so the margin changes the product.
    x = torch.randn(32, 48, generator=gen) * 10 ** -torch.rand(32, 48, generator=gen).mul(4)
    w = torch.randn(64, 48, generator=gen) / 7
    matmul = Float8Matmul("e4m3", margin)
    want = amax_to_scale(x.abs().max().float(), torch.float8_e4m3fn) / 2 ** margin
    assert torch.equal(matmul.cast(x, "input")._scale, want)
    y = matmul(x, w)
    by_hand = _fake_float8(x, torch.float8_e4m3fn, margin) @ \
        _fake_float8(w, torch.float8_e4m3fn, margin).t()
    torch.testing.assert_close(y, by_hand, rtol=1e-5, atol=1e-7)
    if margin:
        assert not torch.equal(y, Float8Matmul("e4m3", 0)(x, w))
    else:
        torch.testing.assert_close(y, _torchao_matmul("e4m3")(x, w), rtol=1e-5, atol=0)


# ------------------------------------------------------------ 2: a whole model
def _fp8_layers(model) -> dict[int, bool]:
    """Each transformer layer's number: whether all its linear layers multiply in FP8
    (None: some do and some do not)."""
    out = {}
    for layer in model.decoder.layers:
        linears = [m for m in layer.modules() if isinstance(m, LINEARS)]
        fp8 = {isinstance(m.matmul, Float8Matmul) for m in linears}
        assert len(linears) >= 4 and len(fp8) == 1, layer.layer_number
        out[layer.layer_number] = fp8.pop()
    return out


def _outside_the_layers_in_fp8(model) -> list[str]:
    return [name for name, m in model.named_modules()
            if not name.startswith("decoder.layers.") and any(
                isinstance(getattr(m, attr, None), Float8Matmul)
                for attr in ("matmul", "matmul_fc1", "matmul_fc2"))]


@pytest.mark.parametrize("fp8_format", FORMATS)
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_tiny_model_trains_in_fp8(fp8_format, recipe):
    plain = make_trainer(*RUN).train().losses
    trainer = make_trainer(*RUN, "--fp8-format", fp8_format, "--fp8-recipe", recipe)
    model = trainer.model.module
    assert _fp8_layers(model) == {0: True, 1: True}
    assert {m.matmul.recipe for m in model.modules() if isinstance(m, LINEARS)
            and isinstance(m.matmul, Float8Matmul)} == {recipe}
    assert all(m.matmul.wgrad for m in model.modules() if isinstance(m, LINEARS)
               and isinstance(m.matmul, Float8Matmul))
    assert model.output_layer.matmul is F.linear and not _outside_the_layers_in_fp8(model)
    losses = trainer.train().losses
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses != plain  # FP8 is used
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain), rtol=1e-3, atol=0)


def test_mla_and_experts_in_fp8_router_not():
    trainer = make_trainer(*RUN, *MLA_MOE, "--fp8-format", "hybrid")
    model = trainer.model.module
    assert _fp8_layers(model) == {0: True, 1: True}
    assert any(isinstance(m, ReplicatedLinear) for m in model.decoder.modules())
    for layer in model.decoder.layers:
        assert isinstance(layer.mlp.experts.matmul_fc1, Float8Matmul)
        assert isinstance(layer.mlp.experts.matmul_fc2, Float8Matmul)
        assert not [m for m in layer.mlp.router.modules()
                    if any(isinstance(v, Float8Matmul) for v in vars(m).values())]
    assert not _outside_the_layers_in_fp8(model)
    assert all(map(torch.isfinite, torch.tensor(trainer.train().losses)))


def _experts_run(experts, grouped: bool, dtype):
    """Output, row gradients and weight gradients of `experts` on fixed rows: 36 rows for
    4 experts (one of them without rows), then 4 rows of no expert."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(40, 32, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(36, 32, generator=gen).to(dtype)
    weights = (experts.linear_fc1.weight, experts.linear_fc2.weight)
    for w in weights:
        w.main_grad.zero_()
    experts.grouped_gemm = grouped
    y = experts(rows, torch.tensor([10, 0, 20, 6]))[:36]
    (y * g).sum().backward()
    return [y.detach(), rows.grad[:36]] + [w.main_grad.clone() for w in weights]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_fp8_experts_equal_the_expert_loop(dtype):
    """One grouped GEMM per direction computes what the loop over experts (each equal to
    torchao's row-wise Float8Linear) computes, bit for bit: the float8 values are exact in
    the model dtype and the power-of-2 scales divide exactly."""
    precision = ["--bf16"] if dtype == torch.bfloat16 else []
    experts = make_trainer(*RUN, *MLA_MOE, *precision, "--fp8-format",
                           "hybrid").model.module.decoder.layers[0].mlp.experts
    loop, grouped = (_experts_run(experts, g, dtype) for g in (False, True))
    for name, a, b in zip(("output", "rows.grad", "fc1 grad", "fc2 grad"), loop, grouped):
        assert torch.equal(a, b), name
    plain = make_trainer(*RUN, *MLA_MOE, *precision).model.module.decoder.layers[0].mlp.experts
    assert not torch.equal(_experts_run(plain, True, dtype)[0], grouped[0])


def test_grouped_fp8_experts_make_no_host_sync():
    experts = make_trainer(*RUN, *MLA_MOE, "--fp8-format",
                           "hybrid").model.module.decoder.layers[0].mlp.experts
    for grouped in (True, False):
        with HostSyncGuard() as guard:
            _experts_run(experts, grouped, torch.float32)
        assert bool(guard.records) == (not grouped), report(guard.records)


def test_no_fp8_wgrad_reaches_every_dense_layer():
    model = make_trainer(*RUN, "--fp8-format", "hybrid", "--no-fp8-wgrad").model.module
    matmuls = [m.matmul for m in model.modules() if isinstance(m, LINEARS)
               and isinstance(m.matmul, Float8Matmul)]
    assert len(matmuls) >= 8 and not any(m.wgrad for m in matmuls)


@pytest.mark.parametrize("last_in_bf16", [False, True])
def test_multi_token_prediction_layer_in_fp8_as_the_last_layer(last_in_bf16):
    """An MTP depth's transformer layer computes in FP8 unless the last layer is kept out;
    its projection, like the output layer, keeps the model dtype."""
    bf16 = ["--first-last-layers-bf16", "--num-layers-at-start-in-bf16", "0"]
    trainer = make_trainer(*RUN, "--mtp-num-layers", "1", "--fp8-format", "hybrid",
                           *(bf16 if last_in_bf16 else []))
    depth = trainer.model.module.mtp.layers[0]
    linears = [m for m in depth.mtp_model_layer.modules() if isinstance(m, LINEARS)]
    assert len(linears) >= 4
    assert {isinstance(m.matmul, Float8Matmul) for m in linears} == {not last_in_bf16}
    assert depth.eh_proj.matmul is F.linear
    assert all(map(torch.isfinite, torch.tensor(trainer.train().losses)))


NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0"]  # compiled RNG differs
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform",
             "--recompute-num-layers", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("model", [[], MLA_MOE], ids=["dense", "mla_moe"])
def test_fp8_compiles_and_recomputes(model):
    """FP8 layers under --torch-compile (inductor, whole layers) train within rtol 1e-5 of
    eager, and under full recompute exactly like it (the recomputed inputs cast alike).
    The MLA + MoE model also compiles its attention (a value head narrower than the
    query's) and its experts."""
    flags = [*RUN, *NO_DROPOUT, *model, "--fp8-format", "hybrid", "--num-layers", "1"]
    eager = make_trainer(*flags).train().losses
    assert make_trainer(*flags, *RECOMPUTE).train().losses == eager
    compiled = make_trainer(*flags, "--torch-compile").train().losses
    np.testing.assert_allclose(compiled, eager, rtol=1e-5)


@pytest.mark.parametrize("start,end,chosen", [(1, 1, {1, 2}), (2, 1, {2}), (0, 2, {0, 1})])
def test_first_and_last_layers_in_bf16(start, end, chosen):
    trainer = make_trainer(*RUN, "--num-layers", "4", "--fp8-format", "hybrid",
                           "--first-last-layers-bf16", "--num-layers-at-start-in-bf16",
                           str(start), "--num-layers-at-end-in-bf16", str(end))
    assert _fp8_layers(trainer.model.module) == {n: n in chosen for n in range(4)}
    for layer in trainer.model.module.decoder.layers:
        if layer.layer_number not in chosen:
            assert all(m.matmul is F.linear for m in layer.modules() if isinstance(m, LINEARS))


# ------------------------------------------------------------ 3: refusals
def _refused(*flags) -> str:
    with pytest.raises(ConfigError) as info:
        parse_args(BASE + RUN + list(flags))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("flags,says", [
    (["--fp8-amax-history-len", "1024"], "delayed FP8 scaling"),
    (["--fp8-amax-compute-algo", "max"], "delayed FP8 scaling"),
    (["--fp8-param-gather"], "FP8 is compute only")])
def test_megatron_fp8_flags_paratron_lacks_are_refused(flags, says):
    message = _refused("--fp8-format", "hybrid", *flags)
    assert message.startswith(flags[0]) and says in message and "drop the flag" in message


def test_deprecated_fp8_interval_is_accepted():
    parse_args(BASE + RUN + ["--fp8-format", "hybrid", "--fp8-interval", "1"])


def test_missing_torchao_names_the_install_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    assert "pip install 'paratron[fp8]'" in _refused("--fp8-format", "e4m3")


@pytest.mark.parametrize("recipe", ["delayed", "mxfp8", "blockwise"])
def test_recipes_not_implemented_are_refused(recipe):
    message = _refused("--fp8-format", "hybrid", "--fp8-recipe", recipe)
    assert f"--fp8-recipe {recipe} is not implemented" in message
    assert "use tensorwise" in message and "or rowwise" in message


def test_negative_margin_is_refused():
    message = _refused("--fp8-format", "hybrid", "--fp8-margin", "-1")
    assert "--fp8-margin must be 0 or more" in message


def test_tokens_per_rank_not_a_multiple_of_16_are_refused():
    message = _refused("--fp8-format", "hybrid", "--micro-batch-size", "1",
                       "--seq-length", "24", "--max-position-embeddings", "24")
    assert "24 tokens per rank" in message and "multiple of 16" in message


def test_layer_size_not_a_multiple_of_16_names_the_layer(capsys):
    code = train_main(BASE + RUN + ["--mock-data", "--fp8-format", "hybrid",
                                    "--ffn-hidden-size", "40"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("paratron train: error:")
    assert "decoder.layers.0.mlp.linear_fc1" in err and "dimension of 40" in err


# ------------------------------------------------------------ 4: checkpoints
def _weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.module.named_parameters()}


def test_fp8_run_resumes_bit_identically(tmp_path):
    fp8 = ["--fp8-format", "hybrid"]
    straight = make_trainer(*RUN, *fp8)
    losses = straight.train().losses
    make_trainer(*RUN, *fp8, "--save", str(tmp_path), "--save-interval", "3",
                 "--exit-interval", "3").train()
    resumed = make_trainer(*RUN, *fp8, "--load", str(tmp_path))
    assert resumed.state.iteration == 3
    assert resumed.train().losses == losses[3:]
    want = _weights(straight)
    for name, weight in _weights(resumed).items():
        assert torch.equal(weight, want[name]), name


@pytest.mark.parametrize("saved,loaded", [([], ["--fp8-format", "hybrid"]),
                                          (["--fp8-format", "e4m3"], [])],
                         ids=["bf16_to_fp8", "fp8_to_bf16"])
def test_checkpoints_move_in_and_out_of_fp8(tmp_path, saved, loaded):
    """bf16 on the CPU: FP8 is compute only, so neither load refuses or misses a tensor."""
    first = make_trainer(*RUN, "--bf16", *saved, "--save", str(tmp_path),
                         "--save-interval", "3", "--exit-interval", "3")
    first.train()
    second = make_trainer(*RUN, "--bf16", *loaded, "--load", str(tmp_path))
    assert second.state.iteration == 3
    want = _weights(first)
    for name, weight in _weights(second).items():
        assert torch.equal(weight, want[name]), name
    assert isinstance(second.model.module.decoder.layers[0].mlp.linear_fc1.matmul,
                      Float8Matmul) == bool(loaded)
    losses = second.train().losses
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))


@pytest.mark.slow
def test_fp8_kill_and_resume_is_bit_identical(tmp_path, monkeypatch):
    """tests/training/test_resume.py's `kill -9` during iteration 14 and resume to 20,
    in one process with FP8: losses and every saved tensor bit-identical."""
    from tests.training import test_resume
    monkeypatch.setitem(test_resume.LAYOUTS, "fp8", (1, ["--fp8-format", "hybrid"]))
    test_resume.test_kill_and_resume_is_bit_identical(tmp_path, "fp8")
