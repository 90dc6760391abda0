"""Both caches a particle lives in: the policy's and, with a PRM model, the PRM's. Every row
operation goes to both, so they keep the same ancestry."""
from __future__ import annotations

import torch

from pfengine.runner import ModelRunner


class Caches:
    def __init__(self, policy: ModelRunner, prm: ModelRunner | None, prm_lags: bool = False) -> None:
        self.policy, self.prm = policy, prm
        self.prm_lags = prm_lags
        """The PRM reads no step tags and stays one token behind (a likelihood PRM)."""
        self.runners = [policy] + ([prm] if prm is not None else [])

    def assign(self, dst: list[int] | torch.Tensor, src: list[int] | torch.Tensor) -> None:
        """Row ``dst[i]`` becomes a copy of row ``src[i]`` (blocks shared, not copied)."""
        dst, src = torch.as_tensor(dst, dtype=torch.int64), torch.as_tensor(src, dtype=torch.int64)
        for runner in self.runners:
            runner.blocks.assign(dst, src)

    def fork(self, rows: torch.Tensor, ancestors: torch.Tensor, writes: torch.Tensor) -> None:
        """Resampling: ``rows[i]`` becomes a copy of ``rows[ancestors[i]]``; writing children whose
        last block is shared and partial get their own copy now."""
        for runner in self.runners:
            runner.fork(rows, ancestors, writes)

    def truncate_to(self, row: int, policy_len: int, tags: int) -> None:
        """Cut ``row`` down to ``policy_len`` tokens (a particle Gibbs reference prefix that holds
        ``tags`` PRM step tags)."""
        r = torch.tensor([row])
        prm_len = policy_len - 1 if self.prm_lags else policy_len + tags
        for runner, target in zip(self.runners, (policy_len, prm_len)):
            runner.blocks.truncate(r, int(runner.blocks.lens[row]) - target)

    def free(self, rows: list[int]) -> None:
        r = torch.tensor(rows, dtype=torch.int64)
        for runner in self.runners:
            runner.blocks.free(r)

    def check_invariants(self) -> None:
        for runner in self.runners:
            runner.blocks.check_invariants()
