"""Multi-token prediction against a hand computation of Megatron's definition: module k
normalises the previous hidden state and the embedding of the tokens k steps ahead,
projects [embedding; hidden], runs one layer and a final norm, and the shared output
layer predicts token t+k+1; the mean of the depths' losses, times the scaling factor,
joins the gradient while the returned lm loss stays the same. The transformer layer
inside each module is the model's own (tested against `transformers` elsewhere); the
rest is written here in plain torch from the weights."""

import pytest
import torch
import torch.nn.functional as F

from paratron.cli.args import parse_args
from paratron.model.gpt import GPTModel
from paratron.model.identity import first_difference
from paratron.options import ConfigError
from tests.helpers.training import BASE as TINY

BASE = TINY + ["--train-iters", "1"]

V3 = ("--swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
      "--untie-embeddings-and-output-weights --multi-latent-attention --kv-lora-rank 16 "
      "--q-lora-rank 24 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 "
      "--num-experts 4 --moe-ffn-hidden-size 16 --moe-router-topk 2 "
      "--moe-layer-freq ([0]+[1]*1) --moe-shared-expert-intermediate-size 32 "
      "--moe-router-score-function sigmoid --moe-router-enable-expert-bias "
      "--moe-router-num-groups 2 --moe-router-group-topk 1 "
      "--moe-router-topk-scaling-factor 2.5 --moe-router-load-balancing-type none").split()


def _model(*flags):
    cfg = parse_args(BASE + ["--hidden-dropout", "0", "--attention-dropout", "0"]
                     + list(flags))
    cfg.model.padded_vocab_size = 128
    torch.manual_seed(0)
    model = GPTModel(cfg.model, init_seed=3)
    with torch.no_grad():  # norms away from one, so that each one matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _norm(model, x, norm):
    c = model.config
    if c.normalization == "RMSNorm":
        return F.rms_norm(x, x.shape[-1:], eps=c.norm_epsilon) * norm.weight
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, c.norm_epsilon)


def _shift(x):
    return torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)


def _hand_losses(model, tokens, labels, mask):
    """(lm loss, [loss of depth k]) from the model's decoder output and the weights."""
    captured = {}
    handle = model.decoder.register_forward_hook(lambda m, i, out: captured.setdefault("h", out))
    model.eval()  # the lm loss alone, and the decoder's output for the modules
    token_loss = model(tokens, labels=labels)
    handle.remove()
    lm = (token_loss * mask).sum() / mask.sum()
    embedding = model.embedding
    table = embedding.word_embeddings.weight
    head = model.output_layer.weight if model.output_layer.weight is not None else table
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    rotary = model.rotary_pos_emb(positions) if model.rotary_pos_emb is not None else None
    hidden, ids, losses = captured["h"], tokens, []
    for layer in model.mtp.layers:
        ids, labels, mask, positions = _shift(ids), _shift(labels), _shift(mask), \
            _shift(positions)
        embedded = F.embedding(ids, table)
        if embedding.position_embeddings is not None:
            embedded = embedded + embedding.position_embeddings.weight[positions]
        embedded = embedded.transpose(0, 1)
        x = torch.cat([_norm(model, embedded, layer.enorm),
                       _norm(model, hidden, layer.hnorm)], dim=-1)
        x = layer.mtp_model_layer(x @ layer.eh_proj.weight.T, rotary, None)
        hidden = _norm(model, x, layer.final_layernorm)
        logits = hidden.transpose(0, 1) @ head.T
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                             reduction="none").view_as(mask)
        losses.append((ce * mask).sum() / mask.sum())
    return lm, losses


# The second: BASE's GPT-2-like model, tied embeddings and learned positions.
@pytest.mark.parametrize("flags", [V3 + ["--mtp-num-layers", "2"],
                                   ["--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "0.3"]],
                         ids=["deepseek_v3_mtp2", "gpt2_tied_mtp1"])
def test_mtp_loss_and_gradients_equal_hand_computation(flags):
    model = _model(*flags)
    depths, factor = model.config.mtp_num_layers, model.config.mtp_loss_scaling_factor
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 100, (2, 16), generator=g)
    labels = torch.randint(0, 100, (2, 16), generator=g)
    mask = (torch.rand(2, 16, generator=g) > 0.2).float()

    model.train()
    token_loss = model(tokens, labels=labels, loss_mask=mask)
    lm = (token_loss * mask).sum() / mask.sum()
    lm.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    logged = model.mtp.loss_totals.clone()
    model.zero_grad()

    hand_lm, hand_losses = _hand_losses(model, tokens, labels, mask)
    torch.testing.assert_close(lm, hand_lm, rtol=1e-6, atol=0)  # the lm loss is unchanged
    torch.testing.assert_close(logged, torch.stack(hand_losses).detach().double(),
                               rtol=1e-5, atol=0)
    (hand_lm + factor / depths * sum(hand_losses)).backward()
    assert any(n.startswith("mtp.") for n in grads)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_evaluation_and_logits_leave_mtp_out():
    model = _model(*V3, "--mtp-num-layers", "1")
    tokens = torch.randint(0, 100, (2, 16))
    model.eval()
    model(tokens, labels=tokens)
    assert model.mtp.loss_totals is None
    model.train()
    assert model(tokens).shape == (2, 16, 128)
    assert model.mtp.loss_totals is None


def test_mtp_settings_are_the_models_and_the_factor_a_runs():
    base = parse_args(BASE + V3 + ["--mtp-num-layers", "1"]).model
    deeper = parse_args(BASE + V3 + ["--mtp-num-layers", "2"]).model
    scaled = parse_args(BASE + V3 + ["--mtp-num-layers", "1",
                                     "--mtp-loss-scaling-factor", "0.3"]).model
    assert base.mtp_loss_scaling_factor == 0.1
    assert first_difference(base, deeper)[0] == "mtp_num_layers"
    assert first_difference(base, scaled) is None


@pytest.mark.parametrize("flags, message", [
    (["--mtp-num-layers", "0"], "mtp-num-layers"),
    (["--mtp-num-layers", "1", "--context-parallel-size", "2", "--world-size", "2"],
     "context-parallel"),
    (["--mtp-num-layers", "1", "--pipeline-model-parallel-size", "2", "--world-size", "2",
      "--position-embedding-type", "learned_absolute"], "rotary"),
    (V3 + ["--mtp-num-layers", "1", "--moe-per-layer-logging"], "moe-per-layer-logging"),
])
def test_unsupported_mtp_settings_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(BASE + flags)
