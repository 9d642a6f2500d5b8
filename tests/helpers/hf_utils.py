"""Tiny random Hugging Face models and logit comparison, shared by the conversion tests."""

import json

import pytest
import torch

from paratron.convert.errors import ConversionError
from paratron.convert.hf_loader import load_hf_model

VOCAB = 256


def randomize(model: torch.nn.Module) -> None:
    """Weights far from their initial values (norms away from 1, biases from 0), so a
    swapped or mis-laid-out tensor shows in the logits; DeepSeek-V3's router bias (a
    buffer, zero at first) large enough to change which experts are chosen."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.normal_(0.0, 0.1, generator=gen)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=gen))


def max_logit_diff(hf_model, paratron_model) -> float:
    """Largest absolute difference of the two models' logits on the same random ids."""
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(input_ids=ids).logits
        got = paratron_model(ids)
    assert got.shape == expected.shape
    return (got - expected).abs().max().item()


def one_line_error(folder, *fragments) -> None:
    """Loading `folder` is refused with one line that names every fragment."""
    with pytest.raises(ConversionError) as info:
        load_hf_model(folder)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def saved_once(tmp_path_factory, build):
    """case -> (model, the folder it was saved to): `build(case)` made and saved once per
    case, for a module-scoped fixture."""
    cache = {}

    def get(case):
        if case not in cache:
            model = build(case)
            folder = tmp_path_factory.mktemp(case)
            model.save_pretrained(folder)
            cache[case] = model, folder
        return cache[case]
    return get


@pytest.fixture(autouse=True, scope="module")
def few_threads():
    """Tiny matrices: thread start-up costs more than the work on a shared machine.
    Imported by a test module, it applies to every test there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 4))
    yield
    torch.set_num_threads(threads)


def copy_model(folder, dest):
    """A copy of a saved model's config.json and model.safetensors in `dest` (made)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        (dest / name).write_bytes((folder / name).read_bytes())
    return dest


def edit_config(folder, **changes):
    """Set keys of a saved model's config.json."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
