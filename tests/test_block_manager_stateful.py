"""Hypothesis state machine over the block manager: >= 10,000 random operations (allocate, append,
fork with random ancestors, resample in place, truncate, free, preempt), invariants and every row's
contents checked after each, and zero blocks leaked at the end."""
import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pfengine.cache.block_manager import OutOfBlocks

from test_block_manager import Harness

ROWS, CAPACITY = 10, 64
EXAMPLES, STEPS = 80, 200  # >= 10,000 operations in all
OPS = {"count": 0}


@pytest.mark.slow
class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(num_blocks=48, rows=ROWS)

    def live(self) -> list[int]:
        return sorted(self.h.truth)

    def empty(self) -> list[int]:
        return [r for r in range(ROWS) if r not in self.h.truth]

    def _try(self, op) -> None:
        OPS["count"] += 1
        try:
            op()
        except OutOfBlocks:
            pass  # refused whole: the invariant check below proves nothing changed half-way

    @precondition(lambda self: self.empty())
    @rule(data=st.data(), n=st.integers(1, 20))
    def allocate(self, data, n):
        row = data.draw(st.sampled_from(self.empty()))
        self._try(lambda: self.h.append([row], [n]))

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def append(self, data):
        rows = data.draw(st.lists(st.sampled_from(self.live()), min_size=1, unique=True))
        n = [data.draw(st.integers(0, min(5, CAPACITY - len(self.h.truth[r])))) for r in rows]
        self._try(lambda: self.h.append(rows, n))

    @precondition(lambda self: self.live() and self.empty())
    @rule(data=st.data())
    def fork(self, data):
        dst = data.draw(st.lists(st.sampled_from(self.empty()), min_size=1, unique=True))
        src = [data.draw(st.sampled_from(self.live())) for _ in dst]
        self._try(lambda: self.h.assign(dst, src))

    @precondition(lambda self: len(self.live()) > 1)
    @rule(data=st.data())
    def resample(self, data):
        rows = self.live()
        ancestors = [data.draw(st.sampled_from(rows)) for _ in rows]
        self._try(lambda: self.h.assign(rows, ancestors))

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def truncate(self, data):
        row = data.draw(st.sampled_from(self.live()))
        k = data.draw(st.integers(0, len(self.h.truth[row])))

        def op():
            self.h.bm.truncate(torch.tensor([row]), k)
            del self.h.truth[row][len(self.h.truth[row]) - k:]
        self._try(op)

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def free(self, data):
        rows = data.draw(st.lists(st.sampled_from(self.live()), min_size=1, unique=True))
        self._try(lambda: self.h.free(rows))

    @precondition(lambda self: len(self.live()) > 2)
    @rule(data=st.data())
    def preempt(self, data):
        """A whole request (several rows sharing a prefix) leaves at once, as the scheduler does."""
        rows = data.draw(st.lists(st.sampled_from(self.live()), min_size=2, unique=True))
        self._try(lambda: self.h.free(rows))

    @invariant()
    def consistent(self):
        self.h.check()

    def teardown(self):
        self.h.free(self.live())
        assert self.h.bm.blocks_in_use == 0, "blocks leaked"
        self.h.check()


BlockManagerMachine.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                                                 derandomize=True)
TestBlockManagerMachine = BlockManagerMachine.TestCase


def test_operation_count_reached():
    """Runs after the machine (pytest keeps file order): it really did >= 10,000 operations."""
    assert OPS["count"] >= 10_000 or OPS["count"] == 0  # 0: the machine was deselected
