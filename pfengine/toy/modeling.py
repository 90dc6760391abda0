"""Pieces shared by training and evaluation: example encoding, a batched sampler over a
transformers model, cutting generated tokens into steps exactly as the engine does, step labels,
hidden states at step ends, and the PRM head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from pfengine.distill import hidden_at
from pfengine.toy.task import Problem, check_steps, local_step, written_result
from pfengine.toy.tokenizer import STEP_TAG, prompt_ids, step_ids

STEP_DELIMITER = "\n\n"


# ---------------------------------------------------------------------------------------------
# Teacher forcing data
# ---------------------------------------------------------------------------------------------

def encode_example(tokenizer, problem: Problem) -> tuple[list[int], int]:
    """``(ids, n_prompt)``: chat prompt + reference solution + EOS; the loss covers ids[n_prompt:]."""
    p = prompt_ids(tokenizer, problem.text)
    sol = [t for s in step_ids(tokenizer, problem.steps()) for t in s] + [tokenizer.eos_token_id]
    return p + sol, len(p)


def pad_batch(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right padding: under a causal mask real tokens never see the pads, so no attention mask."""
    L = max(len(s) for s in seqs)
    return torch.tensor([s + [pad_id] * (L - len(s)) for s in seqs], dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model, prompts: list[list[int]], temperature: float, generator: torch.Generator | None,
           max_new_tokens: int, eos_id: int, pad_id: int) -> list[list[int]]:
    """Generate one continuation per prompt (left-padded batch, KV cache). ``temperature=0`` is greedy.
    Returned sequences end at (and include) EOS when one was sampled."""
    B = len(prompts)
    L = max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                   use_cache=True).logits[:, -1].float()
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long)
    last_pos = pos[:, -1:]
    for t in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, t] = nxt
        ended = (~done) & (nxt == eos_id)
        lengths[ended] = t + 1
        done |= ended
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], 1)
        last_pos = last_pos + 1
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos, past_key_values=cache,
                       use_cache=True).logits[:, -1].float()
    return [out[i, :int(lengths[i])].tolist() for i in range(B)]


# ---------------------------------------------------------------------------------------------
# Steps as the engine cuts them
# ---------------------------------------------------------------------------------------------

class StepCutter:
    """Cuts generated token ids into steps like the engine: a step ends at the token whose text
    completes ``"\\n\\n"``, at EOS, or after ``max_step_tokens`` tokens."""

    def __init__(self, tokenizer, max_step_tokens: int = 256) -> None:
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.max_step_tokens = max_step_tokens
        self._text: dict[int, str] = {}

    def token_text(self, t: int) -> str:
        s = self._text.get(t)
        if s is None:
            s = self._text[t] = self.tokenizer.decode([t])
        return s

    def spans(self, tokens: list[int]) -> list[tuple[int, int]]:
        """``[(start, end), ...]`` token spans of the steps (end exclusive)."""
        spans, start, text = [], 0, ""
        d = STEP_DELIMITER
        for k, t in enumerate(tokens):
            piece = self.token_text(t)
            text += piece
            tail = text[-(len(piece) + len(d) - 1):] if piece else ""
            if t == self.eos_id or d in tail or k + 1 - start >= self.max_step_tokens:
                spans.append((start, k + 1))
                start, text = k + 1, ""
                if t == self.eos_id:
                    break
        if start < len(tokens):
            spans.append((start, len(tokens)))
        return spans

    def steps(self, tokens: list[int]) -> list[str]:
        return [self.tokenizer.decode(tokens[s:e], skip_special_tokens=True) for s, e in self.spans(tokens)]


@dataclass
class Sampled:
    """One sampled solution with its step spans and prefix-correctness labels."""

    problem: Problem
    prompt: list[int]
    tokens: list[int]
    spans: list[tuple[int, int]]
    labels: list[bool]
    """Per step: the prefix up to and including it is correct (``Check.step_ok``)."""
    local: list[bool]
    """Per step: right given the steps written before it (``Check.step_local``)."""
    correct: bool
    answer: int | None
    token_labels: list[bool]
    """Per generated token: the step's text up to and including it can still become a locally
    right step."""


def label(cutter: StepCutter, problem: Problem, prompt: list[int], tokens: list[int]) -> Sampled:
    spans = cutter.spans(tokens)
    steps = [cutter.tokenizer.decode(tokens[s:e], skip_special_tokens=True) for s, e in spans]
    chk = check_steps(problem, steps)
    return Sampled(problem, prompt, tokens, spans, chk.step_ok, chk.step_local, chk.correct, chk.answer,
                   token_labels(cutter, problem, tokens, spans, steps, chk.step_local))


def token_labels(cutter: StepCutter, problem: Problem, tokens: list[int], spans: list[tuple[int, int]],
                 steps: list[str], local: list[bool]) -> list[bool]:
    """Dense labels for the PRM: inside a step, a token is good while the step's text so far is a
    prefix of the step that is right after the steps written before it; a step's last token takes
    the step's label. They teach the PRM to spot the first wrong digit where it is written -- a
    one-hop comparison with the backbone's own prediction -- instead of only at the step's end."""
    out: list[bool] = []
    value: int | None = problem.start
    for i, (a, e) in enumerate(spans):
        right = local_step(problem, i, value)
        target = "" if right is None else right + (STEP_DELIMITER if i < len(problem.ops) else "")
        text = ""
        for k in range(a, e):
            if tokens[k] != cutter.eos_id:
                text += cutter.token_text(tokens[k])
            out.append(local[i] if k == e - 1 else bool(target) and target.startswith(text))
        value = written_result(steps[i])
    return out


def sample_solutions(model, tokenizer, problems: list[Problem], k: int, temperature: float, seed: int,
                     batch_size: int = 256, max_new_tokens: int = 128, max_step_tokens: int = 40) -> list[Sampled]:
    """``k`` samples per problem, labelled. Problems are batched by length so rows finish together."""
    cutter = StepCutter(tokenizer, max_step_tokens)
    gen = torch.Generator().manual_seed(seed)
    jobs = [(p, prompt_ids(tokenizer, p.text)) for p in problems for _ in range(k)]
    order = sorted(range(len(jobs)), key=lambda i: (len(jobs[i][0].ops), len(jobs[i][1])))
    out: list[Sampled | None] = [None] * len(jobs)
    model.eval()
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        gens = sample(model, [jobs[i][1] for i in idx], temperature, gen, max_new_tokens,
                      tokenizer.eos_token_id, tokenizer.pad_token_id)
        for i, g in zip(idx, gens):
            out[i] = label(cutter, jobs[i][0], jobs[i][1], g)
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Step-end hidden states (value head) and tagged sequences (separate PRM)
# ---------------------------------------------------------------------------------------------

def step_end_hidden(model, samples: list[Sampled], pad_id: int) -> torch.Tensor:
    """The policy's final (post-norm) hidden state at the last token of every step, in sample order."""
    return hidden_at(model, [s.prompt + s.tokens for s in samples],
                     [[len(s.prompt) + e - 1 for _, e in s.spans] for s in samples], pad_id)


def tag_id_of(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(STEP_TAG)


@dataclass
class PRMBatch:
    """Samples as the engine feeds a PRM under ``last`` / ``prod`` / ``min`` aggregation: the prompt,
    then each step followed by a step tag that stays in the sequence (plain causal attention)."""

    ids: torch.Tensor
    """[B, L], right-padded"""
    tags: list[list[int]]
    """Per row: where its step tags are."""
    labels: list[list[int]]
    """Per row: its steps' local labels (``Sampled.local``)."""
    generated: list[list[int]]
    """Per row: where its generated tokens are (their labels: ``Sampled.token_labels``)."""


def prm_batch(samples: list[Sampled], tag_id: int, pad_id: int) -> PRMBatch:
    seqs, tags, labels, generated = [], [], [], []
    for s in samples:
        ids, tp, gp = list(s.prompt), [], []
        for a, e in s.spans:
            gp += range(len(ids), len(ids) + e - a)
            ids += s.tokens[a:e] + [tag_id]
            tp.append(len(ids) - 1)
        seqs.append(ids)
        tags.append(tp)
        labels.append([int(y) for y in s.local])
        generated.append(gp)
    return PRMBatch(pad_batch(seqs, pad_id), tags, labels, generated)


def prm_hidden(backbone, batch: PRMBatch) -> torch.Tensor:
    """The backbone's last hidden states [B, L, H] over a PRM batch."""
    return backbone(input_ids=batch.ids).last_hidden_state


def gather(hidden: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """Rows ``hidden[i, positions[i]]``, concatenated over the batch."""
    return torch.cat([hidden[i, p] for i, p in enumerate(positions)])


def engine_solutions(policy_dir, problems: list[Problem], k: int, temperature: float, seed: int,
                     chunk: int = 64, max_step_tokens: int = 32) -> list[Sampled]:
    """``k`` samples per problem from pfengine itself: one request per problem with ``k`` particles
    and a constant PRM, so resampling keeps every particle (the ``k`` samples are independent).
    Siblings share their prompt's KV blocks, and tokens they sample alike are forwarded once."""
    from pfengine import Engine, EngineConfig
    from pfengine.toy.pf import MAX_STEPS, pf_request

    n_rows = max(1, min(chunk, len(problems))) * k
    blocks = n_rows * ((400 + 15) // 16 + 1)
    engine = Engine(EngineConfig(model=str(policy_dir), num_blocks=blocks, block_size=16, max_particles=n_rows),
                    prm_fn=lambda prompt, steps: 0.5)
    tok = engine.tokenizer
    out: list[Sampled] = []
    cutter = StepCutter(tok, max_step_tokens)
    for a in range(0, len(problems), chunk):
        part = problems[a:a + chunk]
        reqs = [pf_request(p, n_particles=k, seed=seed * 1_000_003 + a + i, temperature=temperature,
                           max_step_tokens=max_step_tokens) for i, p in enumerate(part)]
        for p, r in zip(part, engine.generate(reqs)):
            prompt = prompt_ids(tok, p.text)
            for q in r.particles:
                s = label(cutter, p, prompt, list(q.token_ids))
                starts = [b for b, _ in s.spans]
                if starts != list(q.step_starts)[:len(starts)]:
                    raise RuntimeError(f"step cutting differs from the engine's: {starts} vs {q.step_starts}")
                out.append(s)
    return out
