"""Training throughput of Paratron beside plain `transformers`, on one device.

    python benchmarks/run.py <config> [--iters N] [--warmup N] [--json-out FILE]
                             [--peak-tflops X] [--paths paratron,transformers]
                             [--fp8 e4m3|hybrid] [--interleave]
                             [-- <Paratron flags, e.g. --torch-compile>]

Each named configuration is a Hugging Face `config.json` (the model's published shapes),
a sequence length and a batch. Both paths build that model from the same config with
random weights, read the same synthetic tokens, and run `--warmup` untimed then
`--iters` timed optimizer steps:

* paratron: `Trainer.train_step` (bf16 weights with fp32 main weights on CUDA, fp32 on
  a CPU), the model read from the config by `paratron.convert.hf_config`;
* transformers: `AutoModelForCausalLM.from_config` with SDPA attention, fp32 weights
  under bf16 autocast on CUDA, torch AdamW (fused on CUDA), gradient accumulation over
  the same micro-batches, clipping at 1.0.

With `--fp8 FORMAT`, Paratron runs with `--fp8-format FORMAT` and the transformers model
has its linear layers (not the output layer) swapped by torchao's
`convert_to_float8_training` with the same tensorwise recipe and gradient format.

Reported per device: tokens/s, TFLOP/s (Megatron's FLOP formula, `training/flops.py`,
the same count for both paths), MFU (over `--peak-tflops` or the table in
`training/hardware.py`; none on a CPU) and peak allocated memory (CUDA only). One JSON
record per run is appended to `--json-out`. Columns for torchtitan and Megatron-Core are
kept in the table; they say whether the package is installed, and no runner for them is
written yet.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Bench:
    model_type: str
    hf: dict               # Hugging Face config keys (the rest are transformers' defaults)
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    about: str


_LLAMA_3_2_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     max_position_embeddings=8192, rms_norm_eps=1e-5,
                     tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
_QWEN_2_5_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                    num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                    max_position_embeddings=32768, rms_norm_eps=1e-6,
                    tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
# DeepSeek-V2-Lite's layer (MLA without a query low rank, 64 routed experts top-6, 2
# shared, first layer dense) with 4 layers instead of 27, so one GPU holds it.
_DEEPSEEK_V2_LITE_SMALL = dict(
    hidden_size=2048, intermediate_size=10944, num_hidden_layers=4, num_attention_heads=16,
    q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=1408,
    n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=1.0,
    vocab_size=102400, max_position_embeddings=4096, rms_norm_eps=1e-6,
    tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
_TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
             max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

# The shapes of the CPU comparison: a small Llama (GQA 8/4) and a Mixtral-style MoE of the
# same width (8 experts, top-2), fp32 on two threads.
_LLAMA_CPU = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
                  max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
_MIXTRAL_CPU = dict(_LLAMA_CPU, num_local_experts=8, num_experts_per_tok=2,
                    router_aux_loss_coef=0.0)

BENCHES = {
    "tiny": Bench("llama", _TINY, 64, 2, 4, "2-layer Llama, runs on a CPU in seconds"),
    "llama-cpu": Bench("llama", _LLAMA_CPU, 256, 4, 8, "4-layer Llama, hidden 256, a CPU"),
    "mixtral-cpu": Bench("mixtral", _MIXTRAL_CPU, 256, 4, 8,
                         "4-layer Mixtral-style MoE, hidden 256, 8 experts top-2, a CPU"),
    "llama-1b": Bench("llama", _LLAMA_3_2_1B, 4096, 1, 8, "Llama-3.2-1B shapes"),
    "qwen-3b": Bench("qwen2", _QWEN_2_5_3B, 4096, 1, 8, "Qwen2.5-3B shapes"),
    "deepseek-v2-lite-moe-small": Bench("deepseek_v2", _DEEPSEEK_V2_LITE_SMALL, 4096, 1, 4,
                                        "DeepSeek-V2-Lite layers, 4 of 27"),
}

# Frameworks that get a column; no runner is written for them yet.
OTHER_FRAMEWORKS = {"torchtitan": "torchtitan", "megatron-core": "megatron.core"}
PATHS = ("paratron", "transformers")


class RandomTokens:
    """Sample i: uniform random tokens seeded by i (both paths read the same ones)."""

    def __init__(self, vocab_size: int, seq_length: int, samples: int):
        self.vocab_size, self.seq_length, self.samples = vocab_size, seq_length, samples

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, i: int) -> dict:
        tokens = np.random.default_rng(i).integers(0, self.vocab_size, self.seq_length + 1)
        return {"tokens": tokens[:-1], "labels": tokens[1:],
                "loss_mask": np.ones(self.seq_length, np.float32),
                "position_ids": np.arange(self.seq_length)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _fresh_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def hf_config(bench: Bench):
    from transformers import AutoConfig
    return AutoConfig.for_model(bench.model_type, **bench.hf)


def paratron_config(bench: Bench, hf: dict, device: torch.device, iters: int,
                    extra_flags: list[str]):
    """The run's Config: the model read from the Hugging Face config, the benchmark's
    batch, and any extra Paratron flags (fast paths) on top."""
    from paratron.cli.args import build_parser
    from paratron.config import config_from_dict
    from paratron.convert.hf_config import hf_to_paratron_fields

    values = hf_to_paratron_fields(hf)
    values.update(seq_length=bench.seq_length, micro_batch_size=bench.micro_batch_size,
                  global_batch_size=bench.global_batch_size, train_iters=iters,
                  lr=1e-4, min_lr=1e-5, lr_decay_style="cosine", weight_decay=0.1,
                  adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0, eval_iters=0,
                  eval_interval=10 ** 9, log_interval=10 ** 9,
                  device=device.type, bf16=device.type == "cuda")
    flags = vars(build_parser("benchmarks/run.py --").parse_args(extra_flags))
    values.update({k: v for k, v in flags.items()
                   if k not in ("config", "model_size") and not k.startswith("_ignored_")})
    return config_from_dict(values)


@dataclass
class Path:
    """One side of the comparison, built and ready: `step()` runs one optimizer step."""

    step: Callable[[], None]
    losses: list[float]


def build_paratron(bench: Bench, hf: dict, device: torch.device, steps: int,
                   extra_flags: list[str]) -> Path:
    from paratron.training.trainer import Trainer

    cfg = paratron_config(bench, hf, device, steps, extra_flags)
    data = RandomTokens(hf["vocab_size"], bench.seq_length, steps * bench.global_batch_size)
    trainer = Trainer(cfg, (data, None, None), log=lambda line: None)
    losses: list[float] = []
    return Path(lambda: losses.append(trainer.train_step()[0]), losses)


def build_transformers(bench: Bench, hf_cfg, device: torch.device, steps: int,
                       fp8: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa").to(device)
    if fp8 is not None:
        from torchao.float8 import convert_to_float8_training

        from paratron.model.fp8 import torchao_config
        convert_to_float8_training(model, config=torchao_config(fp8),
                                   module_filter_fn=lambda module, name: name != "lm_head")
    model.train()
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                  weight_decay=0.1, fused=cuda)
    data = RandomTokens(hf_cfg.vocab_size, bench.seq_length, steps * bench.global_batch_size)
    micro = bench.global_batch_size // bench.micro_batch_size
    position = [0]
    losses: list[float] = []

    def step():
        total = 0.0
        for _ in range(micro):
            rows = [data[position[0] + i] for i in range(bench.micro_batch_size)]
            position[0] += bench.micro_batch_size
            tokens = torch.as_tensor(np.stack([r["tokens"] for r in rows])).to(device)
            labels = torch.as_tensor(np.stack([r["labels"] for r in rows])).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(input_ids=tokens).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()) / micro
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)

    return Path(step, losses)


def measure(builders: dict[str, Callable[[], Path]], device: torch.device, warmup: int,
            iters: int, interleave: bool) -> dict[str, dict]:
    """Each path's measured step times, losses and peak memory. One after the other, each
    path alone in memory; or `interleave`d, both built and their steps alternating, so a
    machine's slow minutes fall on both alike (peak memory is then not per path: n/a)."""
    results = {}
    if not interleave:
        for name, build in builders.items():
            _fresh_memory(device)
            path = build()
            times = _timed(path.step, warmup + iters, device)
            results[name] = {"times_s": times[warmup:], "losses": path.losses,
                             "peak_memory_gib": _peak_memory_gib(device)}
            del path
        return results
    paths = {name: build() for name, build in builders.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(warmup + iters):
        for name, path in paths.items():
            times[name] += _timed(path.step, 1, device)
    return {name: {"times_s": times[name][warmup:], "losses": path.losses,
                   "peak_memory_gib": None} for name, path in paths.items()}


def summarise(result: dict, flops: float, tokens: int, peak: float | None) -> dict:
    """Per-device rates from the measured step times (their mean)."""
    seconds = statistics.fmean(result["times_s"])
    tflops = flops / seconds / 1e12
    return {"ms_per_iteration": seconds * 1e3, "tokens_per_s_per_gpu": tokens / seconds,
            "tflops_per_gpu": tflops, "mfu": tflops / peak if peak else None,
            "peak_memory_gib": result["peak_memory_gib"], "final_loss": result["losses"][-1],
            "times_s": result["times_s"]}


def _cell(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


ROWS = [("tokens/s/GPU", "tokens_per_s_per_gpu", ",.1f"),
        ("TFLOP/s/GPU", "tflops_per_gpu", ".4g"), ("MFU", "mfu", ".1%"),
        ("peak memory (GiB)", "peak_memory_gib", ".2f"),
        ("ms/iteration", "ms_per_iteration", ".1f"), ("final loss", "final_loss", ".4f")]


def table(record: dict) -> str:
    columns = list(PATHS) + list(OTHER_FRAMEWORKS)
    width = 16
    lines = [f"{'metric':<20}" + "".join(f"{c:>{width}}" for c in columns)]
    for label, key, fmt in ROWS:
        cells = []
        for c in columns:
            entry = record["results"].get(c, "not run")
            cells.append(_cell(entry.get(key), fmt) if isinstance(entry, dict)
                         else str(entry))
        lines.append(f"{label:<20}" + "".join(f"{cell:>{width}}" for cell in cells))
    return "\n".join(lines)


class BenchError(ValueError):
    """A refused invocation: one line naming the argument and the fix."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BenchError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="one of: " + ", ".join(BENCHES))
    p.add_argument("--iters", type=int, default=10, help="measured iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--json-out", help="append one JSON record per run to this file")
    p.add_argument("--peak-tflops", type=float, help="dense peak of one device, for MFU")
    p.add_argument("--paths", default=",".join(PATHS),
                   help="comma-separated subset of: " + ", ".join(PATHS))
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--fp8", choices=["e4m3", "hybrid"],
                   help="both paths in FP8 (tensorwise scales) with this format")
    p.add_argument("--interleave", action="store_true",
                   help="build both paths, then alternate their steps (no per-path peak)")
    return p


def _check(args) -> list[str]:
    if args.config not in BENCHES:
        raise BenchError(f"unknown config {args.config!r}; choose one of "
                         f"{', '.join(BENCHES)}")
    if args.iters <= 0 or args.warmup < 0:
        raise BenchError("--iters must be positive and --warmup not negative")
    paths = [p for p in args.paths.split(",") if p]
    if not paths or set(paths) - set(PATHS):
        raise BenchError(f"--paths {args.paths!r}: choose from {', '.join(PATHS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available; use --device cpu")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise BenchError("--peak-tflops must be positive")
    return paths


def run(argv: list[str]) -> dict:
    """Run one benchmark and return its record (printing the table)."""
    from paratron.training.flops import flops_per_iteration
    from paratron.training.hardware import peak_tflops

    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    paths = _check(args)
    if args.fp8:
        extra = [*extra, "--fp8-format", args.fp8]
    bench = BENCHES[args.config]
    cuda = args.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    hf_cfg = hf_config(bench)
    hf = hf_cfg.to_dict()
    cfg = paratron_config(bench, hf, device, args.warmup + args.iters, extra)
    flops = flops_per_iteration(cfg.model, bench.seq_length, bench.global_batch_size)
    tokens = bench.seq_length * bench.global_batch_size
    peak = peak_tflops(device, dtype, args.peak_tflops)
    steps = args.warmup + args.iters
    builders = {"paratron": lambda: build_paratron(bench, hf, device, steps, extra),
                "transformers": lambda: build_transformers(bench, hf_cfg, device, steps,
                                                           args.fp8)}
    measured = measure({name: builders[name] for name in paths}, device, args.warmup,
                       args.iters, args.interleave)
    results: dict = {name: summarise(raw, flops, tokens, peak)
                     for name, raw in measured.items()}
    for name, module in OTHER_FRAMEWORKS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        results[name] = "installed, no runner" if found else "not installed"
    record = {"config": args.config, "about": bench.about,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "seq_length": bench.seq_length,
              "micro_batch_size": bench.micro_batch_size,
              "global_batch_size": bench.global_batch_size, "warmup": args.warmup,
              "iters": args.iters, "flops_per_iteration": flops, "peak_tflops": peak,
              "fp8": args.fp8, "interleave": args.interleave, "paratron_flags": extra, "torch": torch.__version__,
              "results": results}
    print(f"{args.config} ({bench.about}) on {record['device']}, {record['dtype']}, "
          f"sequence {bench.seq_length}, global batch {bench.global_batch_size}, "
          f"{args.iters} measured iterations after {args.warmup} warm-up"
          + (f", FP8 {args.fp8}" if args.fp8 else "")
          + (", steps interleaved" if args.interleave else ""))
    print(table(record))
    if args.json_out:
        with open(args.json_out, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    from paratron.options import ConfigError

    try:
        run(list(sys.argv[1:] if argv is None else argv))
    except (BenchError, ConfigError) as exc:
        print(f"benchmarks/run.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
