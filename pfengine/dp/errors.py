"""Exceptions that cross a process boundary as data.

Ray pickles an exception raised in an actor and unpickles it in the caller, which calls its class
with ``exception.args``; that fails for exceptions whose ``__init__`` takes other arguments
(:class:`~pfengine.config.InvalidArgument`, :class:`~pfengine.cache.OutOfBlocks`) and the caller
gets Ray's ``UnserializableException`` instead of the error. An actor returns a
:class:`PortableError` instead; the caller rebuilds the same exception, message and fields."""
from __future__ import annotations

import pickle
from dataclasses import dataclass


@dataclass(frozen=True)
class PortableError:
    kind: type[BaseException]
    args: tuple
    state: dict

    @classmethod
    def of(cls, error: BaseException) -> PortableError:
        """``error`` as data; one whose arguments or fields cannot be pickled becomes a
        ``RuntimeError`` with its type and message."""
        try:
            pickle.dumps((type(error), error.args, vars(error)))
        except Exception:
            return cls(RuntimeError, (f"{type(error).__name__}: {error}",), {})
        return cls(type(error), error.args, dict(vars(error)))

    def rebuild(self) -> BaseException:
        """The exception again, built without calling its ``__init__``."""
        error = self.kind.__new__(self.kind)
        error.args = self.args
        vars(error).update(self.state)
        return error
