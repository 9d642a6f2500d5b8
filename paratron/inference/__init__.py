"""Text generation with a key/value cache.

`InferenceParams` (kv_cache.py) is the cache the model's attention layers fill;
`Sampling` (sampling.py) picks tokens (greedy, temperature, top-k, top-p); `generate`
(generation.py) runs prefill and one token per step, also over a tensor-parallel
group; loading.py rebuilds a model and its tokenizer from a Paratron checkpoint.
"""

from paratron.inference.generation import check_generation_layout, completion_text, generate
from paratron.inference.kv_cache import InferenceParams
from paratron.inference.loading import (checkpoint_tokenizer, config_for_generation,
                                        find_checkpoint, load_paratron_model, shard_model)
from paratron.inference.sampling import Sampling, check_sampling, top_k_mask, top_p_mask

__all__ = ["InferenceParams", "Sampling", "check_generation_layout", "check_sampling",
           "checkpoint_tokenizer", "completion_text", "config_for_generation",
           "find_checkpoint", "generate", "load_paratron_model", "shard_model", "top_k_mask",
           "top_p_mask"]
