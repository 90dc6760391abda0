"""Pieces shared by training and evaluation: example encoding, a batched sampler over a
transformers model, cutting generated tokens into steps exactly as the engine does, step labels,
hidden states at step ends (the heads are :class:`pfengine.distill.Head`) and the log-probabilities
a causal LM gives generated tokens (the likelihood PRM's view)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from pfengine.distill import hidden_at
from pfengine.toy.task import Problem, check_steps
from pfengine.toy.tokenizer import prompt_ids, step_ids

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
    """One sampled solution with its step spans and labels (see :class:`pfengine.toy.task.Check`)."""

    problem: Problem
    prompt: list[int]
    tokens: list[int]
    spans: list[tuple[int, int]]
    labels: list[bool]
    """Per step: the prefix up to it is still correct."""
    local: list[bool]
    """Per step: the step is right given the steps written before it."""
    correct: bool
    answer: int | None


def label(cutter: StepCutter, problem: Problem, prompt: list[int], tokens: list[int]) -> Sampled:
    spans = cutter.spans(tokens)
    steps = [cutter.tokenizer.decode(tokens[s:e], skip_special_tokens=True) for s, e in spans]
    chk = check_steps(problem, steps)
    return Sampled(problem, prompt, tokens, spans, chk.step_ok, chk.step_local, chk.correct, chk.answer)


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
# Step-end hidden states (value head) and token log-probabilities (likelihood PRM)
# ---------------------------------------------------------------------------------------------

def step_end_hidden(model, samples: list[Sampled], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's final (post-norm) hidden state at the last token of every step, and the steps'
    labels: ``(hidden [M, H], labels [M])``."""
    hidden = hidden_at(model, [s.prompt + s.tokens for s in samples],
                       [[len(s.prompt) + e - 1 for _, e in s.spans] for s in samples], pad_id)
    return hidden, torch.tensor([int(v) for s in samples for v in s.labels])


@torch.no_grad()
def token_logprobs(model, samples: list[Sampled], pad_id: int, batch_size: int = 64) -> list[list[float]]:
    """Per sample, the log-probability ``model`` gives each generated token after the tokens before it."""
    out: list[list[float]] = []
    model.eval()
    for b in range(0, len(samples), batch_size):
        chunk = samples[b:b + batch_size]
        ids = pad_batch([s.prompt + s.tokens for s in chunk], pad_id)
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        for j, s in enumerate(chunk):
            pos = torch.arange(len(s.prompt), len(s.prompt) + len(s.tokens))
            out.append(logp[j, pos - 1, ids[j, pos]].tolist())
    return out


def engine_solutions(policy_dir, problems: list[Problem], k: int, temperature: float, seed: int,
                     chunk: int = 64) -> list[Sampled]:
    """``k`` samples per problem from pfengine itself: one request per problem with ``k`` particles
    and a constant PRM, so resampling keeps every particle (the ``k`` samples are independent).
    Siblings share their prompt's KV blocks, and tokens they sample alike are forwarded once."""
    from pfengine import Engine, EngineConfig
    from pfengine.toy.pf import MAX_STEP_TOKENS, MAX_STEPS, pf_request

    n_rows = max(1, min(chunk, len(problems))) * k
    blocks = n_rows * ((128 + MAX_STEPS * MAX_STEP_TOKENS + 15) // 16 + 1)
    engine = Engine(EngineConfig(model=str(policy_dir), num_blocks=blocks, block_size=16, max_particles=n_rows),
                    prm_fn=lambda prompt, steps: 0.5)
    tok = engine.tokenizer
    out: list[Sampled] = []
    cutter = StepCutter(tok, MAX_STEP_TOKENS)
    for a in range(0, len(problems), chunk):
        part = problems[a:a + chunk]
        reqs = [pf_request(p, n_particles=k, seed=seed * 1_000_003 + a + i, temperature=temperature)
                for i, p in enumerate(part)]
        for p, r in zip(part, engine.generate(reqs)):
            prompt = prompt_ids(tok, p.text)
            for q in r.particles:
                s = label(cutter, p, prompt, list(q.token_ids))
                starts = [b for b, _ in s.spans]
                if starts != list(q.step_starts)[:len(starts)]:
                    raise RuntimeError(f"step cutting differs from the engine's: {starts} vs {q.step_starts}")
                out.append(s)
    return out
