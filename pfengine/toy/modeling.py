"""Pieces shared by training and evaluation: example encoding, a batched sampler over a
transformers model, cutting generated tokens into steps exactly as the engine does, step labels,
hidden states at step ends, and the PRM's inputs (the heads are :class:`pfengine.distill.Head`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from pfengine.distill import hidden_at
from pfengine.toy.task import Problem, check_steps
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
    correct: bool
    answer: int | None
    token_labels: list[bool]
    """Per generated token: the text up to and including it can still become a correct solution."""


def label(cutter: StepCutter, problem: Problem, prompt: list[int], tokens: list[int]) -> Sampled:
    spans = cutter.spans(tokens)
    steps = [cutter.tokenizer.decode(tokens[s:e], skip_special_tokens=True) for s, e in spans]
    chk = check_steps(problem, steps)
    return Sampled(problem, prompt, tokens, spans, chk.step_ok, chk.correct, chk.answer,
                   token_labels(cutter, problem, tokens, spans, chk.step_ok))


def token_labels(cutter: StepCutter, problem: Problem, tokens: list[int], spans: list[tuple[int, int]],
                 step_ok: list[bool]) -> list[bool]:
    """Dense labels for the PRM: inside a step, a token is good while the step's text so far is a
    prefix of the reference step (all earlier steps being right); a step's last token takes the
    step's label. They teach the PRM to spot the first wrong digit where it is written -- a one-hop
    comparison with the backbone's own prediction -- instead of only at the step's end."""
    ref = problem.steps()
    out: list[bool] = []
    prefix_ok = True
    for i, (a, e) in enumerate(spans):
        target = ref[i] + (STEP_DELIMITER if i < len(ref) - 1 else "") if i < len(ref) else ""
        text = ""
        for k in range(a, e):
            if tokens[k] != cutter.eos_id:
                text += cutter.token_text(tokens[k])
            out.append(step_ok[i] if k == e - 1 else prefix_ok and target.startswith(text))
        prefix_ok = step_ok[i]
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

def step_end_hidden(model, samples: list[Sampled], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's final (post-norm) hidden state at the last token of every step, and the steps'
    labels: ``(hidden [M, H], labels [M])``."""
    hidden = hidden_at(model, [s.prompt + s.tokens for s in samples],
                       [[len(s.prompt) + e - 1 for _, e in s.spans] for s in samples], pad_id)
    return hidden, torch.tensor([int(v) for s in samples for v in s.labels])


def tagged_sequence(sample: Sampled, tag_id: int, mode: str, cut: int | None = None) -> tuple[list[int], list[int], list[int]]:
    """The PRM's input for one sample, as the engine feeds it. ``mode="all"``: a step tag after every
    step (``last`` / ``prod`` / ``min`` aggregation); ``mode="final"``: the first ``cut`` steps
    untagged and one tag after step ``cut`` (``model`` aggregation, where earlier tags are dropped).
    Returns ``(ids, tag positions, labels)``."""
    ids = list(sample.prompt)
    pos, ys = [], []
    steps = [sample.tokens[s:e] for s, e in sample.spans]
    if mode == "all":
        for st, y in zip(steps, sample.labels):
            ids += st + [tag_id]
            pos.append(len(ids) - 1)
            ys.append(int(y))
    else:
        c = len(steps) if cut is None else cut
        for st in steps[:c]:
            ids += st
        ids.append(tag_id)
        pos.append(len(ids) - 1)
        ys.append(int(sample.labels[c - 1]))
    return ids, pos, ys


def tag_id_of(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(STEP_TAG)


@dataclass
class PRMBatch:
    ids: torch.Tensor
    """[B, L]"""
    mask: torch.Tensor | None
    """[B, 1, L, L] (``model`` layout) or None (plain causal)"""
    positions: torch.Tensor | None
    tags: list[list[int]]
    """Per row: where its step tags are."""
    labels: list[list[int]]
    """Per row: its steps' labels."""
    generated: list[list[int]]
    """Per row: where its generated tokens are (their labels: ``Sampled.token_labels``)."""


def prm_batch(samples: list[Sampled], tag_id: int, pad_id: int, mode: str) -> PRMBatch:
    """A batch of PRM inputs with a tag after every step, in one of the engine's two layouts.

    ``mode="all"`` (``last`` / ``prod`` / ``min`` aggregation): the tags stay in the sequence, every
    later token reads them; plain causal attention.
    ``mode="model"`` (``model`` aggregation): the engine scores a tag and drops it again, so no later
    token ever reads a tag and the next token takes the tag's position. One forward reproduces that
    for every step at once: a 4-D mask hides each tag from everything after it, and each tag gets
    the position of the token that follows it.

    """
    seqs, tags, labels, generated = [], [], [], []
    for s in samples:
        ids, pos, is_tag, tp, ys = list(s.prompt), list(range(len(s.prompt))), [False] * len(s.prompt), [], []
        gp: list[int] = []
        n_content = len(s.prompt)
        for (a, e), y in zip(s.spans, s.labels):
            gp += range(len(ids), len(ids) + e - a)
            ids += s.tokens[a:e]
            pos += list(range(n_content, n_content + e - a))
            is_tag += [False] * (e - a)
            n_content += e - a
            ids.append(tag_id)
            pos.append(n_content if mode == "model" else len(pos))
            is_tag.append(True)
            tp.append(len(ids) - 1)
            ys.append(int(y))
        seqs.append((ids, pos, is_tag))
        tags.append(tp)
        labels.append(ys)
        generated.append(gp)
    L = max(len(x[0]) for x in seqs)
    ids_t = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, (ids, _, _) in enumerate(seqs):
        ids_t[i, :len(ids)] = torch.tensor(ids)
    if mode == "all":
        return PRMBatch(ids_t, None, None, tags, labels, generated)
    pos_t = torch.zeros((len(seqs), L), dtype=torch.long)
    mask = torch.zeros((len(seqs), 1, L, L), dtype=torch.bool)
    causal = torch.ones((L, L), dtype=torch.bool).tril()
    for i, (ids, pos, is_tag) in enumerate(seqs):
        n = len(ids)
        pos_t[i, :n] = torch.tensor(pos)
        pos_t[i, n:] = torch.arange(pos[-1] + 1, pos[-1] + 1 + L - n)
        tag = torch.tensor(is_tag + [True] * (L - n))  # pads: hidden like tags, attend to themselves
        m = causal & ~tag[None, :]
        m |= torch.eye(L, dtype=torch.bool)
        mask[i, 0] = m
    return PRMBatch(ids_t, mask, pos_t, tags, labels, generated)


def prm_hidden(backbone, batch: PRMBatch) -> torch.Tensor:
    """The backbone's last hidden states [B, L, H] over a PRM batch."""
    return backbone(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions).last_hidden_state


def gather(hidden: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """Rows ``hidden[i, positions[i]]``, concatenated over the batch."""
    return torch.cat([hidden[i, p] for i, p in enumerate(positions)])


def engine_solutions(policy_dir, problems: list[Problem], k: int, temperature: float, seed: int,
                     chunk: int = 64, max_steps: int = 10, max_step_tokens: int = 32) -> list[Sampled]:
    """``k`` samples per problem from pfengine itself: one request per problem with ``k`` particles
    and a constant PRM, so resampling keeps every particle (the ``k`` samples are independent).
    Siblings share their prompt's KV blocks, and tokens they sample alike are forwarded once."""
    from pfengine import Engine, EngineConfig
    from pfengine.toy.pf import pf_request

    n_rows = max(1, min(chunk, len(problems))) * k
    blocks = n_rows * ((200 + 15) // 16 + 1)
    engine = Engine(EngineConfig(model=str(policy_dir), num_blocks=blocks, block_size=16, max_particles=n_rows),
                    prm_fn=lambda prompt, steps: 0.5)
    tok = engine.tokenizer
    out: list[Sampled] = []
    cutter = StepCutter(tok, max_step_tokens)
    for a in range(0, len(problems), chunk):
        part = problems[a:a + chunk]
        reqs = [pf_request(p, n_particles=k, seed=seed * 1_000_003 + a + i, temperature=temperature,
                           max_steps=max_steps, max_step_tokens=max_step_tokens) for i, p in enumerate(part)]
        for p, r in zip(part, engine.generate(reqs)):
            prompt = prompt_ids(tok, p.text)
            for q in r.particles:
                s = label(cutter, p, prompt, list(q.token_ids))
                starts = [b for b, _ in s.spans]
                if starts != list(q.step_starts)[:len(starts)]:
                    raise RuntimeError(f"step cutting differs from the engine's: {starts} vs {q.step_starts}")
                out.append(s)
    return out
