"""Which corpora a run reads: `--data-path`'s words and `--data-path-config`'s YAML.

Both come down to Megatron's word list, `[prefix, ...]` (unweighted) or
`[w1, prefix1, w2, prefix2, ...]`, one for the whole corpus or one per split, which
`parse_blend` turns into prefixes and weights. Checked here so that a typo stops with
the words named, before any file is opened.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from paratron.data.errors import DataError

SPLIT_NAMES = ("train", "valid", "test")


def parse_blend(data_path: Sequence[str] | str | None
                ) -> tuple[list[str], list[float] | None] | None:
    """Megatron's `--data-path` list -> `(prefixes, weights or None)`; entries holding
    several whitespace-separated words (an unquoted shell variable) are split first."""
    if data_path is None:
        return None
    if isinstance(data_path, str):
        data_path = [data_path]
    words = [w for entry in data_path for w in str(entry).split()]
    if not words:
        return None

    def number(x: str) -> float | None:
        try:
            return float(x)
        except ValueError:
            return None

    if len(words) % 2 == 0:
        weights = [number(w) for w in words[0::2]]
        if all(w is not None for w in weights):
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise DataError(f"--data-path weights must be non-negative with a positive "
                                f"sum: {words[0::2]}")
            return list(words[1::2]), weights  # type: ignore[return-value]
        if any(w is not None for w in weights):
            raise DataError("--data-path must be either prefixes only or weight-prefix pairs, "
                            "got: " + " ".join(words))
    if any(number(w) is not None for w in words):
        raise DataError("--data-path weight without a prefix (expected pairs 'weight prefix'): "
                        + " ".join(words))
    return words, None


def load_data_path_config(path: str) -> dict[str, Any]:
    """Read a `--data-path-config` YAML file.

    Accepted forms (weights may be any non-negative numbers):

        # the --data-path words as a list (or one string)
        - 0.7
        - /data/a_text_document
        - 0.3
        - /data/b_text_document

        # or a mapping, optionally with a split or per-split blends
        data_path: [0.7, /data/a_text_document, 0.3, /data/b_text_document]
        split: 99,1,0
        # train: [...]   valid: [...]   test: [...]   (instead of data_path)

        # or a list of {path:, weight:} entries
        - {path: /data/a_text_document, weight: 0.7}

    Returns `{"data_path": [...] or None, "split": str or None,
    "train"/"valid"/"test": [...] or None}` with `--data-path`-style word lists.
    """
    import yaml

    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (given as --data-path-config)")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None

    def words(value, where: str) -> list[str] | None:
        if value is None:
            return None
        if isinstance(value, str):
            return value.split()
        if isinstance(value, list):
            out: list[str] = []
            for item in value:
                if isinstance(item, dict):
                    if "path" not in item:
                        raise DataError(f"{path}: entry {item} in {where} has no 'path'")
                    out += [str(item.get("weight", 1.0)), str(item["path"])]
                else:
                    out.append(str(item))
            return out
        raise DataError(f"{path}: {where} must be a list or a string")

    result: dict[str, Any] = dict.fromkeys(("data_path", "split", *SPLIT_NAMES))
    if isinstance(raw, (list, str)):
        result["data_path"] = words(raw, "the file")
    elif isinstance(raw, dict):
        unknown = set(raw) - {"data_path", "data-path", "split", *SPLIT_NAMES}
        if unknown:
            raise DataError(f"{path}: unknown keys {sorted(unknown)} "
                            f"(expected data_path, split, train, valid, test)")
        result["data_path"] = words(raw.get("data_path", raw.get("data-path")), "data_path")
        result["split"] = str(raw["split"]) if raw.get("split") is not None else None
        for name in SPLIT_NAMES:
            result[name] = words(raw.get(name), name)
    else:
        raise DataError(f"{path}: expected a list or a mapping at the top level")
    return result
