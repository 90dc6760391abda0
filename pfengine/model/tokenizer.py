"""A checkpoint's tokenizer, checked against its model and against the policy's (for a PRM)."""
from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from pfengine.model.checkpoint import CheckpointError


def load_tokenizer(path: str, vocab_size: int | None = None):
    """The checkpoint's tokenizer (offline); an empty one (transformers builds that when the files are
    missing) or one with ids beyond the model's embedding table is refused."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load its tokenizer ({e})") from None
    if len(tokenizer) < 2:
        raise CheckpointError(f"{path}: cannot load its tokenizer (no tokenizer.json, or vocab.json + merges.txt)")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        top = max(tokenizer.get_vocab().values())
        if top >= vocab_size:
            raise CheckpointError(f"{path}: tokenizer has token id {top} but the model's vocab_size is {vocab_size}")
    return tokenizer


def check_same_tokenizer(policy, prm, prm_path: str) -> None:
    """The PRM reads the policy's token ids as they are, so every policy token must mean the same id."""
    pv, rv = policy.get_vocab(), prm.get_vocab()
    differ = [t for t, i in pv.items() if rv.get(t) != i]
    if differ:
        raise CheckpointError(f"{prm_path}: PRM tokenizer differs from the policy's ({len(differ)} tokens map to "
                              f"other ids, e.g. {differ[0]!r}); the PRM must share the policy's tokenizer")


def eos_ids(path: str, config_ids: tuple[int, ...], tokenizer) -> frozenset[int]:
    """End-of-sequence ids from config.json, generation_config.json and the tokenizer."""
    ids = set(config_ids)
    gen_cfg = Path(path) / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
