"""The Megatron-Core distributed-optimizer fixture is complete and self-consistent.

``tools/make_megatron_optimizer_fixture.py`` wrote it with Megatron-Core; these checks need no
Megatron: every folder RECORD.json names is there, the plain-array record holds the main
weight, both Adam moments and the next gradient of every parameter, and the legacy
checkpoint's tensor-parallel shards put together are the recorded main weights, and Megatron's
step 4 is AdamW by hand on the recorded state.
"""

import json
import os

import numpy as np
import pytest

from paratron.checkpoint.safe_pickle import load_torch

ROOT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "megatron", "optimizer")
KINDS = ("main", "exp_avg", "exp_avg_sq", "grad_step4")


@pytest.fixture(scope="module")
def record():
    with open(os.path.join(ROOT, "RECORD.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def arrays():
    with np.load(os.path.join(ROOT, "record.npz"), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def test_folders_are_complete(record):
    for folder in record["folders"]:
        with open(os.path.join(ROOT, folder, "latest_checkpointed_iteration.txt")) as f:
            iteration = int(f.read())
        assert iteration == record["steps"]
        step_dir = os.path.join(ROOT, folder, f"iter_{iteration:07d}")
        assert os.listdir(step_dir)
    legacy = os.path.join(ROOT, "torch", f"iter_{record['steps']:07d}")
    for tp_rank in range(record["tp"]):
        for name in ("model_optim_rng.pt", "distrib_optim.pt"):
            assert os.path.isfile(os.path.join(legacy, f"mp_rank_{tp_rank:02d}", name))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
    assert size < 2 * 2**20


def test_record_holds_every_parameter(record, arrays):
    names = {key.split("/", 1)[1] for key in arrays if key.startswith("main/")}
    assert any("linear_qkv" in name for name in names)
    for name in names:
        shapes = {arrays[f"{kind}/{name}"].shape for kind in KINDS}
        assert len(shapes) == 1, name
        assert all(np.isfinite(arrays[f"{kind}/{name}"]).all() for kind in KINDS)
        assert (arrays[f"exp_avg_sq/{name}"] >= 0).all()
    assert int(arrays["adam_step"]) == record["steps"]
    assert arrays["losses"].shape == (record["steps"],)
    assert arrays["loss_step4"] < arrays["losses"][-1] < arrays["losses"][0]
    assert 0 < arrays["lr_step4"] < record["hyper_parameters"]["lr"]


def test_legacy_shards_are_the_recorded_main_weights(record, arrays):
    legacy = os.path.join(ROOT, "torch", f"iter_{record['steps']:07d}")
    shards = [load_torch(os.path.join(legacy, f"mp_rank_{r:02d}", "model_optim_rng.pt"))["model"]
              for r in range(record["tp"])]
    for key in ("decoder.layers.0.self_attention.linear_qkv.weight",
                "decoder.layers.1.mlp.linear_fc2.weight", "decoder.final_layernorm.weight"):
        parts = [shard[key].numpy() for shard in shards]
        expected = arrays[f"main/{key}"]
        if parts[0].shape == expected.shape:
            assert all(np.array_equal(part, expected) for part in parts)
        else:
            axis = 0 if "linear_qkv" in key else 1
            np.testing.assert_array_equal(np.concatenate(parts, axis=axis), expected)


def test_step4_is_adamw_by_hand(record, arrays):
    """Megatron's step 4: global-norm clipping, then AdamW with decay on matrices only."""
    hyper = record["hyper_parameters"]
    names = [key.split("/", 1)[1] for key in arrays if key.startswith("main/")]
    grads = {name: arrays[f"grad_step4/{name}"].astype(np.float64) for name in names}
    norm = np.sqrt(sum((grad ** 2).sum() for grad in grads.values()))
    clip = min(1.0, hyper["clip_grad"] / (norm + 1e-6))
    lr, step = float(arrays["lr_step4"]), int(arrays["adam_step"]) + 1
    beta1, beta2 = hyper["adam_beta1"], hyper["adam_beta2"]
    for name in names:
        grad = grads[name] * clip
        exp_avg = beta1 * arrays[f"exp_avg/{name}"] + (1 - beta1) * grad
        exp_avg_sq = beta2 * arrays[f"exp_avg_sq/{name}"] + (1 - beta2) * grad * grad
        weight = arrays[f"main/{name}"].astype(np.float64)
        decay = hyper["weight_decay"] if weight.ndim > 1 else 0.0
        denom = np.sqrt(exp_avg_sq / (1 - beta2 ** step)) + hyper["adam_eps"]
        expected = weight * (1 - lr * decay) - lr * exp_avg / (1 - beta1 ** step) / denom
        np.testing.assert_allclose(arrays[f"main_step4/{name}"], expected, rtol=1e-5,
                                   atol=1e-7, err_msg=name)
