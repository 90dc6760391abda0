"""Measure the toy PRMs on their own: step-level accuracy and AUROC on held-out sampled steps.

    python -m pfengine.toy.prm_eval [--ckpt pfengine/toy/checkpoints] [--problems 200] [--k 8] [--seed 7]
                                    [--value-head NAME=FILE ...]

The policy samples ``k`` solutions per held-out problem at T=0.8; each step is labelled
programmatically (1 while the prefix is still correct). Scored:

- ``value_head``: the head on the policy's final hidden state at each step's last token (and each
  further head given as ``--value-head NAME=FILE``, e.g. one written by ``pfengine distill``);
- ``prm_model``: the separate PRM as the engine feeds it under ``model`` aggregation (the prefix,
  untagged, plus one step tag);
- ``prm_tagged``: the separate PRM with a tag after every step (``last`` / ``prod`` / ``min``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Model

from pfengine.distill import Head
from pfengine.toy.modeling import (Sampled, engine_solutions, gather, prm_batch, prm_hidden, step_end_hidden,
                                   tag_id_of)
from pfengine.toy.task import heldout_set

DEFAULT_CKPT = Path(__file__).parent / "checkpoints"


def auroc(scores, labels) -> float:
    """Area under the ROC curve (probability a random positive outscores a random negative, ties
    counting one half), from average ranks. NaN when only one class is present."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average 1-based rank over each run of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def step_metrics(probs, labels) -> dict[str, float]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    eps = 1e-7
    pc = np.clip(p, eps, 1 - eps)
    return {"steps": int(len(y)), "positive_rate": float(y.mean()),
            "accuracy": float(((p >= 0.5) == y).mean()),
            "majority_baseline": float(max(y.mean(), 1 - y.mean())),
            "auroc": _none_if_nan(auroc(p, y)),
            "log_loss": float(-(y * np.log(pc) + (~y) * np.log(1 - pc)).mean())}


def _none_if_nan(x: float) -> float | None:
    return None if x != x else x


@torch.no_grad()
def head_probs(head: Head, hidden: torch.Tensor) -> np.ndarray:
    return torch.softmax(head(hidden), -1)[:, 1].numpy()


@torch.no_grad()
def value_head_probs(policy, head: Head, samples: list[Sampled], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    hidden, labels = step_end_hidden(policy, samples, pad_id)
    return head_probs(head, hidden), labels.numpy()


@torch.no_grad()
def prm_probs(backbone, head: Head, samples: list[Sampled], tag_id: int, pad_id: int, mode: str,
              batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    backbone.eval()
    ps, ys = [], []
    for b in range(0, len(samples), batch_size):
        batch = prm_batch(samples[b:b + batch_size], tag_id, pad_id, mode)
        ps.append(head_probs(head, gather(prm_hidden(backbone, batch), batch.tags)))
        ys += [y for lab in batch.labels for y in lab]
    return np.concatenate(ps), np.asarray(ys)


def load_head(tensors: dict[str, torch.Tensor]) -> Head:
    H = tensors["score.0.weight"].shape[0]
    head = Head(H)
    head.score.load_state_dict({k[len("score."):]: v.float() for k, v in tensors.items() if k.startswith("score.")})
    return head.eval()


def evaluate(policy_dir: str | Path, prm_dir: str | Path | None, n_problems: int = 200, k: int = 8,
             seed: int = 7, samples: list[Sampled] | None = None, heads: dict[str, Path] | None = None) -> dict:
    """Score the steps of ``samples``, or of ``k`` solutions per held-out problem sampled from the
    policy at T=0.8 by the engine, by the policy's value head, each of ``heads`` (name -> file) and the
    separate PRM."""
    policy_dir = Path(policy_dir)
    tok = AutoTokenizer.from_pretrained(str(policy_dir), local_files_only=True)
    policy = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32).eval()
    if samples is None:
        samples = engine_solutions(policy_dir, heldout_set(n_problems), k, 0.8, seed)
    out: dict = {"problems": len({s.problem for s in samples}), "samples": len(samples)}
    for name, path in ({"value_head": policy_dir / "value_head.safetensors"} | (heads or {})).items():
        head = load_head(load_file(str(path)))
        out[name] = step_metrics(*value_head_probs(policy, head, samples, tok.pad_token_id))
    if prm_dir is not None:
        prm_dir = Path(prm_dir)
        backbone = Qwen2Model.from_pretrained(str(prm_dir), dtype=torch.float32).eval()
        prm_head = load_head(load_file(str(prm_dir / "model.safetensors")))
        tag = tag_id_of(tok)
        for mode in ("model", "tagged"):
            p, y = prm_probs(backbone, prm_head, samples, tag, tok.pad_token_id, "model" if mode == "model" else "all")
            out[f"prm_{mode}"] = step_metrics(p, y)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="directory holding policy/ and prm/")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--value-head", type=_named_file, action="append", default=[], metavar="NAME=FILE",
                    help="also score this value head (a .safetensors file for the policy) under NAME")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ckpt = Path(a.ckpt)
    prm = ckpt / "prm" if (ckpt / "prm").is_dir() else None
    print(json.dumps(evaluate(ckpt / "policy", prm, a.problems, a.k, a.seed, heads=dict(a.value_head)), indent=2))


def _named_file(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=FILE naming an existing file, got {text!r}")
    return name, Path(path)


if __name__ == "__main__":
    main()
