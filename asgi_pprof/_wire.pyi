from collections.abc import Callable, Sequence
from typing import TypeVar

from .model import Frame, Sample

_T = TypeVar("_T")

def samples(
    samples: Sequence[Sample],
    locations: dict[Frame, bytes],
    location: Callable[[Frame], bytes],
    labels: dict[tuple[str, str], bytes],
    label: Callable[[tuple[str, str]], bytes],
    strings: Callable[[str], int],
    /,
) -> bytes: ...
def varint(n: int, /) -> bytes: ...
def location(id: int, address: int, function_id: int, line: int, /) -> bytes: ...
def function(id: int, name: int, filename: int, start_line: int, /) -> bytes: ...
def untrack(obj: _T, /) -> _T: ...
