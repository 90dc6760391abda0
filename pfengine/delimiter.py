"""Step delimiters found on token ids, for a whole batch at once.

A step ends when its text, the concatenation of its tokens' decoded texts, contains the delimiter.
That is a string-matching automaton (Knuth-Morris-Pratt) fed one token's text at a time: from state
``s`` (the delimiter's first ``s`` characters are pending) a token either completes the delimiter
or leads to a new state. Those transitions depend only on ``(s, token)``, so they are kept in a
table ``[len(delimiter), vocab]``: a batch advances with one gather. Entries are computed the first
time a ``(state, token)`` pair is met (most pairs never are), so a new delimiter costs nothing up
front and the steady state runs no Python per token.
"""
from __future__ import annotations

from typing import Callable

import torch

from pfengine.config import MAX_DELIMITER_CHARS

UNKNOWN = -1


class DelimiterMatcher:
    def __init__(self, delimiter: str, token_text: Callable[[int], str], vocab_size: int) -> None:
        assert 0 < len(delimiter) <= MAX_DELIMITER_CHARS
        self.delimiter, self.token_text = delimiter, token_text
        self.fail = _failure_function(delimiter)
        self.table = torch.full((len(delimiter), vocab_size), UNKNOWN, dtype=torch.int16)
        """Next state after a token; ``len(delimiter)`` means the delimiter completed."""

    def advance(self, state: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New states of rows in ``state`` after ``tokens``, and whether each completed the delimiter."""
        nxt = self.table[state, tokens]
        unknown = (nxt == UNKNOWN).nonzero().squeeze(1)
        for i in unknown.tolist():
            s, t = int(state[i]), int(tokens[i])
            self.table[s, t] = nxt[i] = self._run(s, self.token_text(t))
        done = nxt == len(self.delimiter)
        return nxt.long().masked_fill(done, 0), done

    def _run(self, state: int, text: str) -> int:
        d = self.delimiter
        for ch in text:
            while state and d[state] != ch:
                state = self.fail[state - 1]
            if d[state] == ch:
                state += 1
            if state == len(d):
                return state
        return state


def _failure_function(pattern: str) -> list[int]:
    """``fail[i]``: length of the longest proper prefix of ``pattern[:i + 1]`` that is also its suffix."""
    fail, k = [0] * len(pattern), 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return fail
