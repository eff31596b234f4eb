from collections.abc import Callable

from .heap_names import Traceback
from .model import Frame, Sample

class Groups:
    def __len__(self) -> int: ...
    def add(
        self, traces: list[tuple[int, int, Traceback, int | None]], start: int, stop: int, /
    ) -> None: ...
    def rows(
        self, prefix: str, start: int, stop: int, /
    ) -> tuple[list[tuple[int, int, Traceback]], int, int]: ...

def samples(
    rows: list[tuple[int, int, Traceback]],
    start: int,
    stop: int,
    frames: dict[tuple[str, int], Frame],
    multi: set[tuple[str, int]],
    deeper: dict[tuple[str, int], list[Frame]],
    stack: Callable[[Traceback], tuple[Frame, ...]],
    sample: type[Sample],
    /,
) -> list[Sample]: ...
def last_line(linetable: bytes, first_line: int, /) -> int: ...
