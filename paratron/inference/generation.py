"""Autoregressive generation with a key/value cache, on one process or over a
tensor-parallel group.

    completions = generate(model, [prompt_ids, ...], max_new_tokens=64,
                           sampling=Sampling(greedy=True), eod=tokenizer.eod)

Prompts are left-padded into one batch and prefilled once; each step then feeds every
row's newest token at the row's own next position, so a padded row generates what it
would alone. Under TP the last position's logits are gathered and TP rank 0's choice is
broadcast, so all ranks feed the same token even where sampling is not bit-reproducible.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from paratron.inference.kv_cache import InferenceParams, cache_bytes
from paratron.inference.sampling import Sampling
from paratron.model.moe import moe_layers
from paratron.parallel.tensor_parallel import GatherFromTensorParallelRegion


def check_generation_layout(pg) -> None:
    """Generation runs one model replica split by tensor parallelism only."""
    for name, size in (("--pipeline-model-parallel-size", pg.pp.size),
                       ("--context-parallel-size", pg.cp.size),
                       ("--expert-model-parallel-size", pg.ep.size)):
        if size > 1:
            raise ValueError(f"generation does not support {name} {size}; use tensor "
                             f"parallelism (--tensor-model-parallel-size) only")
    if pg.world_size != pg.tp.size:
        raise ValueError(f"generation runs one model replica: launch exactly "
                         f"--tensor-model-parallel-size ({pg.tp.size}) processes, not "
                         f"{pg.world_size}")


def check_prompt_ids(prompts: list[list[int]], vocab_rows: int) -> None:
    """Every prompt id must name a row of the embedding (a NullTokenizer passes numbers
    through as they are written)."""
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= t < vocab_rows]
        if bad:
            raise ValueError(f"prompt {i + 1} holds token id {bad[0]}, outside the model's "
                             f"vocabulary (0 to {vocab_rows - 1}); check the prompt and "
                             f"--vocab-size")


def generation_bytes(model, rows: int, width: int, total: int) -> int:
    """A lower bound of what generating `rows` rows of `total` positions (prompts of
    `width`) allocates on one rank beyond the model: the token, mask and position
    buffers, the full key/value cache and the prefill's logits."""
    pg, config = model.pg, model.config
    element = next(model.parameters()).element_size()
    vocab = config.padded_vocab_size // pg.tp.size
    return (rows * total * (8 + 1 + 8 + 8)
            + cache_bytes(config, rows, total, pg.tp.size, element)
            + rows * width * vocab * element)


def _check_memory(model, rows: int, width: int, total: int, memory_bytes: int | None) -> None:
    if memory_bytes is None:
        return
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    need = weights + generation_bytes(model, rows, width, total)
    if need > memory_bytes:
        raise ValueError(f"{rows} prompt rows of up to {width} tokens plus {total - width} new "
                         f"tokens need at least {need / 2 ** 30:.1f} GiB (model, key/value "
                         f"cache, logits) but the device has {memory_bytes / 2 ** 30:.1f} "
                         f"GiB; lower --max-new-tokens or give fewer or shorter prompts")


def _batch(prompts: list[list[int]], rows: int, length: int, device) -> tuple:
    """Left-padded token ids [rows, length], which positions are real, and positions
    counted over the real tokens of each row. Rows past the prompts repeat the last."""
    tokens = torch.zeros(rows, length, dtype=torch.long)
    real = torch.zeros(rows, length, dtype=torch.bool)
    width = max(len(p) for p in prompts)
    for row in range(rows):
        prompt = prompts[min(row, len(prompts) - 1)]
        tokens[row, width - len(prompt):width] = torch.tensor(prompt, dtype=torch.long)
        real[row, width - len(prompt):] = True
    positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
    return tokens.to(device), real.to(device), positions.to(device)


def _last_logits(model, logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """The last position's full-vocabulary logits [b, v] in fp32, padding ids masked."""
    last = logits[:, -1].float()
    if model.pg.tp.size > 1:
        last = GatherFromTensorParallelRegion.apply(last.contiguous(), model.pg.tp.group)
    if vocab_size is not None and vocab_size < last.shape[-1]:
        last[:, vocab_size:] = float("-inf")
    return last


def _same_on_every_rank(ids: torch.Tensor, pg) -> torch.Tensor:
    if pg.tp.size > 1:
        dist.broadcast(ids, src=dist.get_global_rank(pg.tp.group, 0), group=pg.tp.group)
    return ids


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, *,
             sampling: Sampling | None = None, eod: int | Sequence[int] | None = None,
             vocab_size: int | None = None, memory_bytes: int | None = None
             ) -> list[list[int]]:
    """The new token ids of each prompt: `max_new_tokens` of them, or fewer when a stop
    id (`eod`: one id or several) comes first; it is kept and the row stops there.
    `vocab_size`: ids at and above it (the embedding's padding rows) are never chosen.
    `memory_bytes`: the device's memory; a generation that cannot fit in it beside the
    model is refused before anything is allocated.
    Collective over the model's TP group: every rank calls it with the same prompts."""
    sampling = sampling or Sampling(greedy=True)
    stop = [] if eod is None else [int(eod)] if isinstance(eod, int) else [int(i) for i in eod]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    pg, config = model.pg, model.config
    check_generation_layout(pg)
    check_prompt_ids(prompts, config.padded_vocab_size)
    width = max(len(p) for p in prompts)
    total = width + max_new_tokens
    if config.position_embedding_type == "learned_absolute" \
            and total > config.max_position_embeddings:
        raise ValueError(f"the longest prompt ({width} tokens) plus --max-new-tokens "
                         f"{max_new_tokens} exceeds the model's learned positions "
                         f"({config.max_position_embeddings}); shorten one of them")
    rows = len(prompts)
    if pg.tp.size > 1 and moe_layers(model):
        # MoE layers split the tokens of a step over the TP ranks: pad the batch.
        rows = -(-rows // pg.tp.size) * pg.tp.size
    _check_memory(model, rows, width, total, memory_bytes)
    device = next(model.parameters()).device
    tokens, real, positions = _batch(prompts, rows, total, device)
    cache = InferenceParams(rows, total, key_padding_mask=real)
    was_training = model.training
    model.eval()
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    stop_ids = torch.tensor(stop, dtype=torch.long, device=device)
    start, end = 0, width
    try:
        for _ in range(max_new_tokens):
            logits = model(tokens[:, start:end], position_ids=positions[:, start:end],
                           inference_params=cache)
            cache.advance(end - start)
            # Rows added for MoE repeat the last prompt: they copy its token rather than
            # draw their own, so the draws are those of the prompts alone.
            last = _last_logits(model, logits, vocab_size)[:len(prompts)]
            chosen = _same_on_every_rank(sampling.sample(last), pg)
            chosen = torch.cat([chosen, chosen[-1:].expand(rows - len(prompts))])
            tokens[:, end] = chosen
            finished |= torch.isin(chosen, stop_ids)
            start, end = end, end + 1
            if bool(finished[:len(prompts)].all()):
                break
    finally:
        model.train(was_training)
    out = []
    for row in range(len(prompts)):
        new = tokens[row, width:end].tolist()
        ends = [i for i, token in enumerate(new) if token in stop]
        out.append(new[:ends[0] + 1] if ends else new)
    return out


def completion_text(tokenizer, prompt: list[int], new: list[int], stop: Sequence[int] = ()
                    ) -> str:
    """The text `new` adds after `prompt`, without a final stop token (`<|endoftext|>`
    is the end of the text, not part of it).

    Decoded with the prompt and cut after the prompt's own text, so the spacing is the
    tokenizer's: decoding the new ids alone loses the space a word-level tokenizer puts
    between ids ("1 2 3" + "114" would read "1 2 3114") and the leading space some
    SentencePiece pieces carry."""
    if new and new[-1] in stop:
        new = new[:-1]
    before = tokenizer.decode(prompt)
    whole = tokenizer.decode(list(prompt) + list(new))
    return whole[len(before):] if whole.startswith(before) else tokenizer.decode(new)
