"""What a front end needs of an engine without holding its weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pfengine.config import EngineConfig

if TYPE_CHECKING:
    from pfengine.engine import Engine


@dataclass(frozen=True)
class Front:
    """An engine's tokenizer, context length, end-of-sequence ids and config: what the server reads of
    the engine it serves (:class:`pfengine.server.EngineFront`) and what an evaluation needs to build
    its requests. A replica sends its own, so the driver needs no checkpoint files."""

    config: EngineConfig
    tokenizer: Any
    max_len: int
    eos_ids: frozenset[int]

    @classmethod
    def of(cls, engine: Engine) -> Front:
        return cls(engine.config, engine.tokenizer, engine.max_len, frozenset(engine.eos_ids))

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
