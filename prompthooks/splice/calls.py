"""Where one forward call keeps what it computed while its hooks run.

A prompted call runs several hooks in turn (the model's, the input stack's,
the embedding's, every attention site's), and the later ones need what the
earlier ones decided: where the virtual tokens went, which prefix each row
reads, whether the prefix went into a cache. That belongs to the call, not to
the hook objects, which every call shares: two threads calling one model, or
a model called from inside one of its own hooks, would read each other's.

So the first hook of a call opens a *frame*, the hooks inside read and fill
it, and the hook that opened it closes it (forward hooks registered with
``always_call``, so an exception closes it too). Frames live on a stack
private to the running thread: a forward call is synchronous, so no other
call of the same thread (an asyncio task included) can run inside it except
one nested in it, which opens its own frame on top. A thread-local stack,
unlike a ``ContextVar``, is something ``torch.compile`` can trace.

Gradient checkpointing runs parts of a call a second time, during the
backward pass, after the call's frame closed (and, on GPUs, in autograd's own
threads). The stacks keep the frame of their last checkpointed training call
for that: ``Frames.for_recompute``.
"""

from __future__ import annotations

import threading
from typing import Any, Generic, TypeVar

import torch

_LOCAL = threading.local()

S = TypeVar("S")


def _stack() -> tuple[Any, ...]:
    stack: tuple[Any, ...] = getattr(_LOCAL, "frames", ())
    return stack


class Frame(Generic[S]):
    """One call's state for one set of hooks. ``opener`` names the hook that
    opened it (``"model"``, ``"stack"``, ...), so the hooks inside can tell
    whether the frame is theirs to close."""

    __slots__ = ("owner", "opener", "state")

    def __init__(self, owner: object, opener: str, state: S) -> None:
        self.owner, self.opener, self.state = owner, opener, state


class Frames(Generic[S]):
    """The frames of one set of hooks (one attachment's token or prefix hooks).

    Holds no per-call state itself, so it can be copied and pickled with the
    model, except the frame kept for a checkpoint's recomputation, which is
    dropped on copy (a copy has not run that call).
    """

    def __init__(self) -> None:
        # (thread ident, opener) -> frame, and opener -> the last frame
        self._recompute: dict[tuple[int, str], Frame[S]] = {}
        self._recompute_last: dict[str, Frame[S]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def current(self) -> Frame[S] | None:
        """This set's innermost open frame in the running thread."""
        for frame in reversed(_stack()):
            if frame.owner is self:
                return frame  # type: ignore[no-any-return]
        return None

    def open(self, opener: str, state: S) -> Frame[S]:
        frame = Frame(self, opener, state)
        _LOCAL.frames = (*_stack(), frame)
        return frame

    def close(self, opener: str) -> Frame[S] | None:
        """Close this set's innermost frame if ``opener`` opened it."""
        stack = _stack()
        for i in range(len(stack) - 1, -1, -1):
            frame = stack[i]
            if frame.owner is self:
                if frame.opener != opener:
                    return None
                _LOCAL.frames = stack[:i] + stack[i + 1 :]
                return frame  # type: ignore[no-any-return]
        return None

    def keep_for_recompute(self, frame: Frame[S]) -> None:
        """A checkpointed training call's frame, for its layers' second run.
        (Compiled graphs recompute inside the graph: nothing to keep.)"""
        if torch.compiler.is_compiling():
            return
        self._recompute[(threading.get_ident(), frame.opener)] = frame
        self._recompute_last[frame.opener] = frame

    def for_recompute(self, opener: str) -> Frame[S] | None:
        """The frame a hook running outside any call reads: during a backward
        pass, the last checkpointed call's that ``opener`` opened (the same
        thread's if it made one; autograd's GPU threads read the last one
        made). Else none."""
        if torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1:
            return None
        mine = self._recompute.get((threading.get_ident(), opener))
        return mine if mine is not None else self._recompute_last.get(opener)
