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

S = TypeVar("S")


class Frame(Generic[S]):
    """One call's state for one set of hooks. ``opener`` names the hook that
    opened it (``"model"``, ``"stack"``, ...), so the hooks inside can tell
    whether the frame is theirs to close."""

    __slots__ = ("owner", "opener", "state")

    def __init__(self, owner: object, opener: str, state: S) -> None:
        self.owner, self.opener, self.state = owner, opener, state


# Per thread: the open frames, innermost last. (A plain ``threading.local``:
# dynamo traces its attributes, not those of a subclass with class defaults.)
_LOCAL = threading.local()


class Frames(Generic[S]):
    """The frames of one set of hooks (one attachment's token or prefix hooks).

    Holds no per-call state itself, so it can be copied and pickled with the
    model, except the frame kept for a checkpoint's recomputation, which is
    dropped on copy (a copy has not run that call).
    """

    def __init__(self) -> None:
        # (thread ident, opener) -> frame, and opener -> the last frame
        self._recompute: dict[tuple[int, str], Frame[S]] = {}
        self.kept: dict[str, Frame[S]] = {}  # opener -> the last kept frame
        # Open frames whose inner hooks have work to do, in any thread. Empty (the
        # usual case on a decode step), hooks that only serve such frames return
        # at once, without looking for their frame. ``set.add``/``discard`` are
        # atomic, so threads need no lock; a nonempty set only means "look".
        self.busy: set[Frame[S]] = set()

    def __getstate__(self) -> dict[str, Any]:
        # Not empty: pickle skips ``__setstate__`` for a false state.
        return {"frames": "dropped"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def current(self) -> Frame[S] | None:
        """This set's innermost open frame in the running thread."""
        stack: tuple[Frame[S], ...] = getattr(_LOCAL, "frames", ())
        if stack and stack[-1].owner is self:  # the usual case: the innermost of all
            return stack[-1]
        for frame in reversed(stack):
            if frame.owner is self:
                return frame
        return None

    def open(self, opener: str, state: S) -> Frame[S]:
        frame = Frame(self, opener, state)
        _LOCAL.frames = (*getattr(_LOCAL, "frames", ()), frame)
        return frame

    def close(self, opener: str) -> Frame[S] | None:
        """Close this set's innermost frame if ``opener`` opened it; returns it."""
        stack: tuple[Frame[S], ...] = getattr(_LOCAL, "frames", ())
        if not stack:
            return None
        if stack[-1].owner is self:  # the usual case: the innermost of all
            frame = stack[-1]
            if frame.opener != opener:
                return None
            _LOCAL.frames = stack[:-1]
            return frame
        inner = self.current()
        if inner is None or inner.opener != opener:
            return None
        self.remove(inner)
        return inner

    def remove(self, frame: Frame[S]) -> None:
        """Take ``frame`` off the running thread's stack (usually its top)."""
        stack: tuple[Frame[S], ...] = getattr(_LOCAL, "frames", ())
        if stack and stack[-1] is frame:
            _LOCAL.frames = stack[:-1]
        else:
            _LOCAL.frames = tuple(f for f in stack if f is not frame)

    def keep_for_recompute(self, frame: Frame[S]) -> None:
        """A checkpointed training call's frame, for its layers' second run.
        (Compiled graphs recompute inside the graph: nothing to keep.)"""
        if torch.compiler.is_compiling():
            return
        self._recompute[(threading.get_ident(), frame.opener)] = frame
        self.kept[frame.opener] = frame

    def for_recompute(self, opener: str) -> Frame[S] | None:
        """The frame a hook running outside any call reads: during a backward
        pass, the last checkpointed call's that ``opener`` opened (the same
        thread's if it made one; autograd's GPU threads read the last one
        made). Else none."""
        if torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1:
            return None
        mine = self._recompute.get((threading.get_ident(), opener))
        return mine if mine is not None else self.kept.get(opener)
