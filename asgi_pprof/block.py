"""The ``block`` and ``mutex`` profiles and their switches, as Go's runtime has them.

``set_block_profile_rate(rate_ns)`` and ``set_mutex_profile_fraction(n)`` are Go's
``runtime.SetBlockProfileRate`` / ``SetMutexProfileFraction``: 0 is off (the default, and
then nothing is hooked: zero cost), the profiles are cumulative from the moment they were
switched on. The same can be asked for without touching the program, with the
environment variables ``ASGI_PPROF_BLOCK_PROFILE_RATE`` and
``ASGI_PPROF_MUTEX_PROFILE_FRACTION`` read at ``import asgi_pprof``
(:func:`configure_from_env`), or per app with ``create_app(block_profile_rate=...,
mutex_profile_fraction=...)``. Which waits are seen is in ``primitives``' docstring.

Both profiles are served even when off: a valid, empty profile with status 200, so
scrapers that ask for them every 15 s stay quiet.
"""

from __future__ import annotations

import os
import threading

from . import contention, loopstall, primitives
from .concurrency import run_in_thread
from .model import ProfileData
from .options import Options
from .profiles import NamedProfile
from .text import frame_lines, stack_header, tabwrite

__all__ = [
    "BLOCK_ENV",
    "MUTEX_ENV",
    "BlockProfile",
    "MutexProfile",
    "configure_from_env",
    "contention_text",
    "profiles",
    "set_block_profile_rate",
    "set_mutex_profile_fraction",
]

BLOCK_ENV = "ASGI_PPROF_BLOCK_PROFILE_RATE"
MUTEX_ENV = "ASGI_PPROF_MUTEX_PROFILE_FRACTION"

_switch_lock = threading.Lock()  # made at import: never a profiled wrapper


def _check(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def _apply() -> None:
    if contention.block_rate() > 0 or contention.mutex_fraction() > 0:
        primitives.install()
    else:
        primitives.uninstall()


def set_block_profile_rate(rate_ns: int) -> int:
    """Set the block profile rate (Go's ``SetBlockProfileRate``); return the previous one.

    0 (or less) turns it off; 1 records every wait that blocked; a larger ``rate_ns``
    records every wait of at least that many nanoseconds and a shorter wait ``d`` with
    probability ``d/rate_ns``, scaled back up so totals stay unbiased.
    """
    rate = _check("rate_ns", rate_ns)
    with _switch_lock:
        old, _ = contention.set_rates(block=max(0, rate))
        _apply()
    return old


def set_mutex_profile_fraction(n: int) -> int:
    """Set the mutex profile fraction (Go's ``SetMutexProfileFraction``); return the previous.

    0 turns it off; on average 1 contended release in ``n`` is recorded, its count and
    delay multiplied by ``n``. A negative ``n`` only reads the current fraction, as in Go.
    """
    n = _check("n", n)
    with _switch_lock:
        if n < 0:
            return contention.mutex_fraction()
        _, old = contention.set_rates(mutex=n)
        _apply()
    return old


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw, 10)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be 0 or more, got {value}")
    return value


def configure_from_env() -> None:
    """Apply ``ASGI_PPROF_BLOCK_PROFILE_RATE`` / ``ASGI_PPROF_MUTEX_PROFILE_FRACTION``.

    Unset or empty variables change nothing (and then nothing is hooked). Raises
    ``ValueError`` with a sentence for a value that is not a whole number >= 0.
    """
    rate = _env_int(BLOCK_ENV)
    fraction = _env_int(MUTEX_ENV)
    if rate is not None:
        set_block_profile_rate(rate)
    if fraction is not None:
        set_mutex_profile_fraction(fraction)


def contention_text(name: str, data: ProfileData) -> str:
    """Return Go's ``debug=1`` text of a block (``--- contention:``) or mutex profile.

    Values are nanoseconds with ``cycles/second=1000000000``, so google/pprof's parser
    reads them unscaled. That parser multiplies a mutex record by ``sampling period``;
    our records are scaled when taken (as Go's are since 1.19), so the text divides them
    by the period it prints and the parsed profile equals the proto one.
    """
    head = "mutex" if name == "mutex" else "contention"
    buf = [f"--- {head}:\n", "cycles/second=1000000000\n"]
    div = 1
    if name == "mutex":
        period = contention.mutex_fraction()
        buf.append(f"sampling period={period}\n")
        div = max(1, period)  # the parser does not scale by a period of 0
    body = []
    for s in sorted(data.samples, key=lambda s: -s.values[1]):
        count, delay = s.values
        body.append(f"{round(delay / div)} {round(count / div)} {stack_header(s.stack)}\n")
        body.extend(ln + "\n" for ln in frame_lines(s.stack))
        body.append("\n")
    return "".join(buf) + tabwrite("".join(body))


class _ContentionProfile(NamedProfile):
    """What block and mutex share: the recorder's table, Go's two sample types."""

    def count(self) -> int:
        """Return the number of records (Go: the number of distinct stacks)."""
        return contention.record_count(self.name)

    async def collect(self, *, gc: bool = False) -> ProfileData:
        """Return the cumulative profile (empty while off), built in a worker thread."""
        loopstall.note_running_loop()  # scrapers ask for block and mutex every 15 s
        return await run_in_thread(contention.profile_of, self.name)

    async def text(self, debug: int, *, gc: bool = False) -> str:
        """Return Go's ``debug=1`` text."""
        data = await self.collect()
        return await run_in_thread(contention_text, self.name, data)


class BlockProfile(_ContentionProfile):
    """``/debug/pprof/block``: time waiting on synchronization primitives, by waiter."""

    name = "block"
    description = "Stack traces that led to blocking on synchronization primitives"


class MutexProfile(_ContentionProfile):
    """``/debug/pprof/mutex``: waiting caused, charged to the release that ended it."""

    name = "mutex"
    description = "Stack traces of holders of contended mutexes"


def profiles(options: Options) -> list[NamedProfile]:
    """Return the block and mutex profiles; apply the app's rates when it sets them."""
    rate = options.block_profile_rate
    fraction = options.mutex_profile_fraction
    if rate is not None:
        set_block_profile_rate(rate)
    if fraction is not None:
        set_mutex_profile_fraction(fraction)
    return [BlockProfile(), MutexProfile()]
