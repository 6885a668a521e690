"""The train/valid/test records of a text task: read from the user's files (valid and test held out of train when
not given) and capped at ``data.max_train`` / ``max_valid`` / ``max_test``."""
from __future__ import annotations

import hashlib
import json

from kdcore.errors import KDUserError

from .data_config import TextDataConfig
from .files import Layout, TextRecord, read_split_files

SPLITS = ("train", "valid", "test")


def prompt_key(record: TextRecord) -> str:
    """What makes two records the same input: the source, or a chat record's messages (rendered later)."""
    messages = record.get("messages")
    return record["source"] if not messages else json.dumps(messages, ensure_ascii=False, sort_keys=True)


def file_splits(config: TextDataConfig, layouts: tuple[Layout, ...]) -> dict[str, list[TextRecord]]:
    """The three splits from ``data.train`` / ``valid`` / ``test``; a split without files is held out of train."""
    assert config.train is not None  # TextDataConfig requires data.train for corpus 'files'
    train = read_split_files("train", config.train, config.format, layouts)
    records: dict[str, list[TextRecord]] = {}
    # Held-out splits taken from train are chosen by a hash of the source text, so the choice is
    # deterministic and the same source never lands in two splits.
    ranked = sorted(train, key=lambda r: hashlib.sha256(prompt_key(r).encode("utf-8")).hexdigest())
    start = 0
    for name, size in (("test", config.test_size), ("valid", config.valid_size)):
        files = getattr(config, name)
        if files is not None:
            records[name] = read_split_files(name, files, config.format, layouts)
        else:
            records[name] = ranked[start:start + size]
            start += size
    if start:
        held = {prompt_key(r) for r in ranked[:start]}
        train = [r for r in train if prompt_key(r) not in held]
        if not train:
            raise KDUserError(f"data.train has {len(ranked)} examples; holding out data.valid_size/test_size "
                              f"({config.valid_size}/{config.test_size}) leaves none for training. Give "
                              f"data.valid/data.test files or smaller sizes.")
    records["train"] = train
    return records


def capped_splits(records: dict[str, list[TextRecord]], config: TextDataConfig,
                  task: str) -> dict[str, list[TextRecord]]:
    """Each split cut to its ``data.max_<split>`` limit; an empty split is refused naming ``task``."""
    limits = {"train": config.max_train, "valid": config.max_valid, "test": config.max_test}
    capped = {name: records[name][:limits[name]] if limits[name] else records[name] for name in SPLITS}
    for name in SPLITS:
        if not capped[name]:
            raise KDUserError(f"The {name} split of task '{task}' is empty; check the data config.")
    return capped


__all__ = ["SPLITS", "capped_splits", "file_splits", "prompt_key"]
