"""The execution trace's loop-step hook: ``asyncio.Handle._run`` while a capture runs.

Every callback or task step an asyncio event loop of this process runs goes through
``Handle._run``. During a capture that class attribute is replaced by a hook that runs
the step through the original (a callback's exception reaches asyncio's
``call_exception_handler`` as before; ``SystemExit`` and ``KeyboardInterrupt``
propagate), timed with ``perf_counter_ns``, and appends one raw record (see
``trace_events.STEP`` and ``DONE``) to the recorder's bounded list. A task's first step
in the capture goes to the recorder first (``first_step``: which request it serves).

Two hooks record the same: the C one (``asgi_pprof._tracestep``, a method descriptor
that costs a fraction of a Python call per step) when the extension is built, else
:func:`run_step`, one flat Python function. The C one is never loaded under
``ASGI_PPROF_NO_NATIVE=1``, on a free-threaded build (importing a module that needs the
GIL would turn the GIL back on for the whole process), nor when ``Handle._run`` is not a
Python function (its frame is how samples are placed inside steps). This module is the
only one that imports the extension.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import native
from .trace_events import DONE, STEP

if TYPE_CHECKING:
    from .trace_routes import Requests

__all__ = [
    "ENV_NO_NATIVE",
    "Hook",
    "StepRecorder",
    "available",
    "callback_name",
    "code_of",
    "install",
    "run_step",
    "unavailable_reason",
]

ENV_NO_NATIVE = native.ENV_NO_NATIVE

_now = time.perf_counter_ns
_get_ident = threading.get_ident


class StepRecorder(Protocol):
    """What a hook reads and calls on the capture's recorder (``tracing._Recorder``)."""

    records: list[Any]
    limit: int
    seen: set[int]
    existing: set[int]
    loop: asyncio.AbstractEventLoop
    request_of: dict[int, int]
    requests: Requests
    step_start: int
    step_end: int
    last_loop: object

    def first_step(self, task: asyncio.Task[Any]) -> None: ...
    def see_loop(self, loop: asyncio.AbstractEventLoop) -> None: ...
    def full(self, t: int) -> bool: ...


_active: StepRecorder | None = None
"""The recorder :func:`run_step` records into (None: it only runs the step)."""
_original_run: Callable[[asyncio.Handle], None] = asyncio.Handle.__dict__["_run"]
"""What ``Handle._run`` was before :func:`run_step` replaced it."""


_native, _reason = native.load_or_why("_tracestep")


def available() -> bool:
    """Return True when the C hook is loaded (captures then use it)."""
    return _native is not None


def unavailable_reason() -> str:
    """Return why the C hook is not loaded ("" when it is)."""
    return _reason


_TASK_TYPES: tuple[type, ...] = tuple(
    t for t in (asyncio.Task, getattr(asyncio.tasks, "_PyTask", None)) if isinstance(t, type)
)
_FunctionType = types.FunctionType
_MethodType = types.MethodType
_BuiltinType = types.BuiltinMethodType


def run_step(self: asyncio.Handle) -> None:
    """Replaces ``asyncio.Handle._run`` during a capture: run the step, then record it.

    The Python twin of the C hook (``_tracestep.StepHook``), used without it. The
    hottest code of a capture (once per step of every loop): one flat function, no
    further Python calls on the common paths (a task's step, a bound method, a function).
    """
    rec = _active
    if rec is None:
        _original_run(self)
        return
    cb = self._callback  # type: ignore[attr-defined]
    tp = type(cb)
    owner = None if tp is _FunctionType else getattr(cb, "__self__", None)
    is_task = _task_types.get(type(owner))
    if is_task is None:
        is_task = _learn_type(type(owner))
    task = owner if is_task else None  # a task's step (its __step or __wakeup)
    if task is not None and id(task) not in rec.seen:
        # Its first step in this capture, before it runs: a new task's coroutine has not
        # started, so its arguments tell which request it serves.
        rec.first_step(task)
    t0 = rec.step_start = _now()
    try:
        _original_run(self)
    finally:
        t1 = rec.step_end = _now()  # the sampler sees that a step ended
        records = rec.records
        if len(records) < rec.limit:
            loop = self._loop  # type: ignore[attr-defined]
            if loop is not rec.last_loop:
                rec.see_loop(loop)
            if task is not None:
                # Named after the task's coroutine (and the request it serves).
                name = task.get_name()
                coro = task.get_coro()
                code = getattr(coro, "cr_code", None) or code_of(coro)
                key = id(task)
                req = rec.request_of.get(key)
                records.append((STEP, id(loop), t0, t1, code, name, req))
                if task.done():  # the step that finished it (one record past the limit at most)
                    state = (
                        "cancelled"
                        if task.cancelled()
                        # not task.exception(): that would mark it retrieved (_task_state)
                        else (
                            "result" if getattr(task, "_exception", None) is None else "exception"
                        )
                    )
                    ident = _get_ident()
                    records.append((DONE, ident, t1, id(loop), name, code, key, req, state))
                    rec.seen.discard(key)  # the id may be reused by a new task
                    if req is not None:
                        rec.requests.finished(req)
            else:
                # Keep a code object or a name, never the callback: a record must not keep an
                # object alive, and a tuple of untracked items leaves the garbage collector's
                # lists at its first pass (a function would keep it there, making every full
                # collection during the capture longer).
                if tp is _FunctionType:
                    what: object = cb.__code__
                elif tp is _MethodType:
                    what = getattr(cb.__func__, "__code__", None) or callback_name(cb)
                elif tp is _BuiltinType and owner is not None:  # e.g. set.discard
                    what = _builtin_names.get((type(owner), cb.__name__)) or callback_name(cb)
                else:
                    what = callback_name(cb)
                records.append((STEP, id(loop), t0, t1, what, None, None))
        else:
            rec.full(t0)


_builtin_names: dict[tuple[type, str], str] = {}
"""``(owner type, method name) -> name`` of builtin-method callbacks (both hooks read it)."""
_task_types: dict[type, bool] = {type(None): False}
"""Whether a callback's owner type is a task type (asyncio's, or a subclass): learnt once."""


def _learn_type(tp: type) -> bool:
    is_task = issubclass(tp, _TASK_TYPES)
    if len(_task_types) < 10_000:
        _task_types[tp] = is_task
    return is_task


def callback_name(cb: object) -> types.CodeType | str:
    """Return the code object or the name of a callback that is not a plain function."""
    while isinstance(cb, functools.partial):
        cb = cb.func
    code = getattr(getattr(cb, "__func__", cb), "__code__", None)
    if isinstance(code, types.CodeType):
        return code
    owner = getattr(cb, "__self__", None)
    method = getattr(cb, "__name__", None)
    if owner is not None and isinstance(method, str):
        # A builtin method, e.g. set.discard, Future.set_result: its __qualname__ is built
        # anew on every read; the owner's type and the name make the same text once.
        key = (type(owner), method)
        name = _builtin_names.get(key)
        if name is None:
            qual = getattr(cb, "__qualname__", None)
            name = qual if isinstance(qual, str) else f"{type(owner).__qualname__}.{method}"
            if len(_builtin_names) < 10_000:
                _builtin_names[key] = name
        return name
    qual = getattr(cb, "__qualname__", None)
    return qual if isinstance(qual, str) else type(cb).__qualname__


def code_of(coro: object) -> types.CodeType | None:
    """Return the code object of a coroutine or generator, None for other awaitables."""
    code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
    return code if isinstance(code, types.CodeType) else None


@dataclass(slots=True)
class Hook:
    """One installed step hook (see :func:`install`)."""

    native: bool
    """Whether it is the C hook."""
    installed: object
    """What ``Handle._run`` was set to."""
    original: Callable[[asyncio.Handle], None]
    """What ``Handle._run`` was before, put back by :meth:`uninstall`."""
    step_code: types.CodeType | None
    """Code of the frame that runs a step: frames above it in a sample belong to the step."""
    skip_codes: frozenset[types.CodeType]
    """Frames between ``step_code`` and the step's callback (none with the C hook)."""
    recorder: StepRecorder
    capture: Any = None
    """The C hook's ``StepCapture`` (its step times), None for the Python hook."""

    def step_times(self) -> tuple[int, int]:
        """Return ``(start, end)`` (``perf_counter_ns``) of the running or last loop step."""
        if self.capture is not None:
            times: tuple[int, int] = self.capture.step_times()
            return times
        return self.recorder.step_start, self.recorder.step_end

    def stop(self) -> None:
        """Record no more steps (one running now still records when it ends)."""
        global _active
        if self.native:
            self.installed.stop()  # type: ignore[attr-defined]
        elif _active is self.recorder:
            _active = None

    def uninstall(self) -> bool:
        """Stop recording and put ``Handle._run`` back; return False if someone replaced it
        during the capture (theirs then stays, and records nothing more from us)."""
        self.stop()
        if asyncio.Handle.__dict__.get("_run") is self.installed:
            asyncio.Handle._run = self.original  # type: ignore[method-assign, assignment]
            return True
        return False


def install(rec: StepRecorder, native: bool | None = None) -> Hook:
    """Replace ``asyncio.Handle._run`` with a hook recording into ``rec``; return the hook.

    ``native``: True for the C hook (ValueError if it is not loaded), False for
    :func:`run_step`, None for the C one when it can be used.
    """
    global _active, _original_run
    if native and _native is None:
        raise ValueError(f"the native step hook is not loaded: {_reason}")
    current = asyncio.Handle.__dict__["_run"]
    if _native is not None and isinstance(current, _native.StepHook):
        base = current.original  # one left by a capture whose end we never saw
    elif current is run_step:
        base = _original_run
    else:
        base = current
    use_native = _native is not None if native is None else native
    if use_native and _native is not None and isinstance(base, types.FunctionType):
        hook = _native.StepHook(base, _TASK_TYPES, _builtin_names, callback_name, code_of)
        capture = _native.StepCapture(
            rec, rec.seen, rec.limit, rec.loop, rec.existing, rec.requests
        )
        hook.start(capture)
        asyncio.Handle._run = hook  # type: ignore[method-assign]
        return Hook(True, hook, base, base.__code__, frozenset(), rec, capture)
    if native:
        raise ValueError("the native step hook needs Handle._run to be a Python function")
    _original_run = base
    asyncio.Handle._run = run_step  # type: ignore[method-assign]
    _active = rec
    skip = getattr(base, "__code__", None)
    return Hook(
        False,
        run_step,
        base,
        run_step.__code__,
        frozenset((skip,)) if isinstance(skip, types.CodeType) else frozenset(),
        rec,
    )
