"""A goroutine profile taken while thousands of tasks start and finish."""

from __future__ import annotations

import asyncio
import re
import sys
from typing import Any

import httpx
import pytest

from asgi_pprof import builder
from asgi_pprof.model import Frame

pytestmark = pytest.mark.anyio

CHURN_TASKS = 4000


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "uvloop":
        return ("asyncio", {"use_uvloop": True})
    return "asyncio"


async def race_inner() -> None:
    await asyncio.sleep(0)


async def race_step() -> None:
    for _ in range(20):
        await race_inner()


async def race_churn(stop: asyncio.Event) -> int:
    """Start and finish tasks in waves of 200 until told to stop; return how many."""
    n = 0
    while not stop.is_set() or n < CHURN_TASKS:
        wave = [asyncio.create_task(race_step(), name=f"race-{n + i}") for i in range(200)]
        n += len(wave)
        await asyncio.sleep(0)
        await asyncio.gather(*wave)
    return n


def churn_stack_ok(stack: tuple[Frame, ...], state: str) -> bool:
    """Return True for a stack a race_step task can really have (leaf first)."""
    names = [f.function.rsplit(".", 1)[-1] for f in stack]
    lines = [f.line for f in stack]
    if state == "running":  # its real frames, whatever it is doing
        # ... a weak reference's callback too: a finished task freed by one of its
        # steps runs the WeakSet's _remove on top of it (seen on 3.13 with uvloop).
        callbacks = 0
        while callbacks < len(stack) - 1 and stack[callbacks].function.startswith(
            ("_weakrefset.", "weakref.")
        ):
            callbacks += 1
        names = names[callbacks:]
        return names[-1] == "race_step" and set(names) <= {
            "race_step",
            "race_inner",
            "sleep",
            "__sleep0",
        }
    if state == "runnable":  # not started yet: at its first line
        return names == ["race_step"] and lines == [race_step.__code__.co_firstlineno]
    # suspended in asyncio.sleep(0): a half-read chain would be shorter
    return names == ["__sleep0", "sleep", "race_inner", "race_step"]


async def test_profiles_during_churn_never_fail_nor_repeat_a_task(
    client: httpx.AsyncClient,
) -> None:
    stop = asyncio.Event()
    churn = asyncio.create_task(race_churn(stop))
    seen_churn = 0
    # Hand the GIL between the loop and the reading thread every 10 µs, so the loop
    # starts and finishes tasks in the middle of reading them, not only between reads.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for _ in range(3):
            for debug in (0, 1, 2):
                r = await client.get(f"/debug/pprof/goroutine?debug={debug}")
                assert r.status_code == 200, r.text
                if debug == 2:
                    ids = re.findall(r"^(?:task|    task) (0x[0-9a-f]+) ", r.text, re.M)
                    assert len(ids) == len(set(ids)), "a task reported twice"
                    head = re.search(r"goroutine dump: (\d+) tasks", r.text)
                    assert head is not None
                    assert int(head.group(1)) >= len(ids) > 0
                if debug == 0:
                    data = builder.decode(r.content)
                    for s in data.samples:
                        funcs = [f.function for f in s.stack]
                        labels = dict(s.labels)
                        if labels["kind"] == "task" and funcs[-1].endswith(".race_step"):
                            assert churn_stack_ok(s.stack, labels["state"]), (s.stack, labels)
                            seen_churn += s.values[0]
    finally:
        sys.setswitchinterval(switch)
        stop.set()
        made = await churn
    assert made >= CHURN_TASKS
    assert seen_churn > 0, "the profiles never caught the churn"
