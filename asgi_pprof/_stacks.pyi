import types
from collections.abc import Callable
from typing import Any

from .model import Frame

class FrameTable:
    def __init__(
        self,
        make: Callable[[types.CodeType, int, dict[str, Any]], Frame],
        max_entries: int = 200000,
    ) -> None: ...
    def stack(self, frame: types.FrameType | None, max_depth: int, /) -> tuple[Frame, ...]: ...
    def entries(self) -> int: ...
    def clear(self) -> None: ...
