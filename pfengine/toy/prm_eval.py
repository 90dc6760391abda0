"""Measure the toy PRMs on their own: step-level accuracy and AUROC on held-out sampled steps.

    python -m pfengine.toy.prm_eval [--ckpt pfengine/toy/checkpoints] [--problems 200] [--k 8] [--seed 7]
                                    [--value-head NAME=FILE ...]

The policy samples ``k`` solutions per held-out problem at T=0.8; each step is labelled
programmatically (1 while the prefix is still correct). Scored:

- ``value_head``: the head on the policy's final hidden state at each step's last token (and each
  further head given as ``--value-head NAME=FILE``, e.g. one written by ``pfengine distill``);
- ``prm``: the separate PRM (a teacher read as a likelihood PRM, ``min``) as the engine scores a
  prefix under ``model`` aggregation: the probability of the least likely token written so far;
- ``prm_step``: the same PRM on each step alone (its least likely token) against the step's local
  label (right given the steps written before it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pfengine.distill import Head
from pfengine.toy.modeling import Sampled, engine_solutions, step_end_hidden, token_logprobs
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


def likelihood_probs(model, samples: list[Sampled], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Per step of each sample: the probability ``model`` gives the step's least likely token, and
    the running minimum of that over the steps so far (the prefix's score under ``model``
    aggregation)."""
    steps, prefix = [], []
    for s, lp in zip(samples, token_logprobs(model, samples, pad_id)):
        low = np.inf
        for a, e in s.spans:
            steps.append(min(lp[a:e]))
            low = min(low, steps[-1])
            prefix.append(low)
    return np.exp(steps), np.exp(prefix)


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
        teacher = AutoModelForCausalLM.from_pretrained(str(prm_dir), dtype=torch.float32).eval()
        step, prefix = likelihood_probs(teacher, samples, tok.pad_token_id)
        out["prm"] = step_metrics(prefix, [y for s in samples for y in s.labels])
        out["prm_step"] = step_metrics(step, [y for s in samples for y in s.local])
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
