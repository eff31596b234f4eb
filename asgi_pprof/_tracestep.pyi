import asyncio
import types
from collections.abc import Callable
from typing import Any

class StepCapture:
    def __init__(
        self,
        recorder: Any,
        seen: set[int],
        limit: int,
        loop: asyncio.AbstractEventLoop,
        existing: set[int],
        requests: Any,
    ) -> None: ...
    def step_times(self) -> tuple[int, int]: ...
    def on_gc(self, phase: str, info: dict[str, int], /) -> None: ...
    def task_created(
        self, key: int, coro: object, code: types.CodeType | None, /
    ) -> int | None: ...
    def finished(self, n: int, /) -> None: ...

class StepHook:
    def __init__(
        self,
        original: Callable[[asyncio.Handle], None],
        task_types: tuple[type, ...],
        builtin_names: dict[tuple[type, str], str],
        callback_name: Callable[[object], types.CodeType | str],
        code_of: Callable[[object], types.CodeType | None],
    ) -> None: ...
    def __call__(self, handle: asyncio.Handle, /) -> None: ...
    def start(self, capture: StepCapture, /) -> None: ...
    def stop(self) -> None: ...
    @property
    def original(self) -> Callable[[asyncio.Handle], None]: ...
