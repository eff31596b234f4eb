"""The trace's loop-step hook: the C one and its Python twin record the same steps, and a
loop runs with either exactly as without: exceptions, re-entrancy, threads, refcounts."""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import os
import sys
import threading
import time
import tracemalloc
import types
from collections.abc import Iterator
from typing import Any

import pytest

from asgi_pprof import trace_hook, trace_routes, tracing
from asgi_pprof.options import Options
from asgi_pprof.trace_events import DONE, GC, NEW, STEP

from .conftest import STEP_HOOKS, run_python

HOOKS = STEP_HOOKS


@pytest.fixture(params=HOOKS)
def native(request: pytest.FixtureRequest) -> bool:
    """Return True for the C hook, False for the Python one (each test runs with both)."""
    return bool(request.param == "native")


@pytest.fixture
def new_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


class Recording:
    """A recorder with only the step hook installed (no samplers), on ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, native: bool | None, **opts: Any) -> None:
        self.rec = tracing._Recorder(loop, Options(**opts))
        self.native = native

    def __enter__(self) -> tracing._Recorder:
        self.hook = trace_hook.install(self.rec, self.native)
        self.rec.hook = self.hook
        assert self.hook.native is bool(self.native)
        return self.rec

    def __exit__(self, *exc: object) -> None:
        assert self.hook.uninstall()


# --- a workload with every kind of callback -----------------------------------------------


def hook_test_function(out: list[str]) -> None:
    out.append("function")


class HookTestOwner:
    def method(self, out: list[str]) -> None:
        out.append("method")


async def hook_test_child(n: int) -> int:
    for _ in range(n):
        await asyncio.sleep(0)
    return n


async def hook_test_fails() -> None:
    await asyncio.sleep(0)
    raise LookupError("hook_test_fails")


async def hook_test_sleeps() -> None:
    await asyncio.sleep(10)


async def hook_test_main(out: list[str]) -> None:
    loop = asyncio.get_running_loop()
    pending: set[int] = {1}
    loop.call_soon(hook_test_function, out)
    loop.call_soon(HookTestOwner().method, out)
    loop.call_soon(functools.partial(hook_test_function, out))
    loop.call_soon(pending.discard, 1)  # a builtin method
    loop.call_soon(lambda: out.append("lambda"))
    await asyncio.create_task(hook_test_child(3), name="hook-child")
    failing = asyncio.create_task(hook_test_fails(), name="hook-fails")
    sleeping = asyncio.create_task(hook_test_sleeps(), name="hook-sleeps")
    await asyncio.sleep(0)
    sleeping.cancel()
    results = await asyncio.gather(failing, sleeping, return_exceptions=True)
    assert isinstance(results[0], LookupError)
    assert isinstance(results[1], asyncio.CancelledError)
    assert not pending


def normalized(records: list[Any]) -> list[tuple[Any, ...]]:
    """Return the step, new and done records without what differs run to run (times, ids),
    kind by kind, each kind in its order (the C hook holds its steps and task ends apart
    from the other records until the trace is written)."""
    out: list[tuple[Any, ...]] = []
    for r in records:
        if r[0] == STEP:
            _, _, t0, t1, what, name, _ = r
            assert t0 <= t1
            out.append((STEP, what, name))
        elif r[0] == DONE:
            out.append((DONE, r[4], r[5], r[8]))
        elif r[0] == NEW:
            out.append((NEW, r[4], r[5]))
    return sorted(out, key=lambda r: int(r[0]))


def record_workload(
    native: bool | None, raw: list[Any] | None = None
) -> tuple[list[tuple[Any, ...]], list[str]]:
    loop = asyncio.new_event_loop()
    out: list[str] = []
    try:
        main = loop.create_task(hook_test_main(out), name="hook-main")
        with Recording(loop, native) as rec:
            loop.run_until_complete(main)
        if raw is not None:
            raw.extend(rec.all_records())
        return normalized(rec.all_records()), out
    finally:
        loop.close()


@pytest.mark.skipif(not trace_hook.available(), reason="no C hook to compare with")
def test_native_and_python_hooks_record_the_same_steps() -> None:
    python, out_py = record_workload(False)
    raw: list[Any] = []
    native, out_c = record_workload(True, raw)
    assert out_py == out_c == ["function", "method", "function", "lambda"]
    assert native == python
    # The C hook's records (ints, names, code objects) are out of the collector's sight from
    # the start: a capture keeps up to trace_max_events of them.
    c_records = [r for r in raw if r[0] in (STEP, NEW, DONE)]
    assert c_records
    assert not any(gc.is_tracked(r) for r in c_records)
    whats = {r[1] for r in native if r[0] == STEP}
    assert hook_test_function.__code__ in whats
    assert HookTestOwner.method.__code__ in whats
    assert "set.discard" in whats
    assert any(isinstance(w, types.CodeType) and w.co_name == "<lambda>" for w in whats)
    states = {r[1]: r[3] for r in native if r[0] == DONE}
    assert states == {
        "hook-child": "result",
        "hook-fails": "exception",
        "hook-sleeps": "cancelled",
        "hook-main": "result",
    }
    # Each of the child's steps is named after its coroutine and its task.
    child = [r for r in native if r[0] == STEP and r[2] == "hook-child"]
    assert len(child) == 4
    assert {r[1] for r in child} == {hook_test_child.__code__}


def test_steps_are_recorded_with_their_loop_and_times(
    native: bool, new_loop: asyncio.AbstractEventLoop
) -> None:
    with Recording(new_loop, native) as rec:
        new_loop.run_until_complete(hook_test_child(5))
        t0, t1 = rec.hook.step_times()
    steps = [r for r in rec.all_records() if r[0] == STEP]
    assert len(steps) >= 6
    assert {r[1] for r in steps} == {id(new_loop)}
    assert rec.loops[id(new_loop)] == (new_loop, threading.get_ident())
    assert all(a[3] <= b[2] for a, b in itertools.pairwise(steps))
    assert 0 < t0 <= t1 == steps[-1][3]


def test_a_bounded_capture_counts_what_it_drops(
    native: bool, new_loop: asyncio.AbstractEventLoop
) -> None:
    with Recording(new_loop, native, trace_max_events=1000) as rec:
        new_loop.run_until_complete(hook_test_child(3000))
    assert 1000 <= len(rec.all_records()) <= 1001  # the step that ends a task adds its DONE
    assert rec.dropped >= 1900
    assert rec.truncated_ns is not None


# --- the loop behaves as without the hook -----------------------------------------------------


def hook_test_raises() -> None:
    raise ZeroDivisionError("hook_test_raises")


def handled(hook: str, loop: asyncio.AbstractEventLoop) -> tuple[list[dict[str, Any]], list[Any]]:
    """Return what the loop's exception handler got for a failing callback, and the records."""
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda loop, context: seen.append(context))

    async def main() -> None:
        loop.call_soon(hook_test_raises)
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    if hook == "none":
        loop.run_until_complete(main())
        return seen, []
    with Recording(loop, hook == "native") as rec:
        loop.run_until_complete(main())
    return seen, rec.all_records()


def test_an_exception_in_a_callback_is_handled_as_without_the_hook(
    native: bool, new_loop: asyncio.AbstractEventLoop
) -> None:
    before, _ = handled("none", new_loop)
    after, records = handled("native" if native else "python", new_loop)
    assert len(before) == len(after) == 1
    for context in (before[0], after[0]):
        assert set(context) == {"message", "exception", "handle"}
        assert context["message"].startswith("Exception in callback ")
        assert "hook_test_raises" in context["message"]
        assert isinstance(context["exception"], ZeroDivisionError)
        assert isinstance(context["handle"], asyncio.Handle)
    assert before[0]["message"] == after[0]["message"]
    assert hook_test_raises.__code__ in {r[4] for r in records if r[0] == STEP}


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_and_system_exit_propagate(
    native: bool, new_loop: asyncio.AbstractEventLoop, exc: type[BaseException]
) -> None:
    def stop() -> None:
        raise exc("from a callback")

    with Recording(new_loop, native) as rec:
        new_loop.call_soon(stop)
        with pytest.raises(exc, match="from a callback"):
            new_loop.run_forever()
    assert stop.__code__ in {
        r[4] for r in rec.all_records() if r[0] == STEP
    }  # recorded all the same
    # The loop still works afterwards, hook or not.
    assert new_loop.run_until_complete(hook_test_child(2)) == 2


def test_a_step_inside_a_step_is_recorded_inside_it(
    native: bool, new_loop: asyncio.AbstractEventLoop
) -> None:
    def inner() -> None:
        pass

    def outer() -> None:
        # Re-entrant: a handle run from inside another step (what a nested loop does).
        asyncio.Handle(inner, (), new_loop)._run()

    with Recording(new_loop, native) as rec:
        new_loop.call_soon(outer)
        new_loop.run_until_complete(asyncio.sleep(0))
    steps = {r[4]: r for r in rec.all_records() if r[0] == STEP}
    o, i = steps[outer.__code__], steps[inner.__code__]
    assert o[2] <= i[2] <= i[3] <= o[3]


def test_loops_in_several_threads(native: bool) -> None:
    loops = [asyncio.new_event_loop() for _ in range(3)]
    main = asyncio.new_event_loop()
    try:
        with Recording(main, native) as rec:
            threads = [
                threading.Thread(target=lp.run_until_complete, args=(hook_test_child(200),))
                for lp in loops
            ]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        by_loop: dict[int, int] = {}
        for r in rec.all_records():
            if r[0] == STEP:
                by_loop[r[1]] = by_loop.get(r[1], 0) + 1
        assert all(by_loop.get(id(lp), 0) >= 201 for lp in loops), by_loop
        assert {ident for _, ident in rec.loops.values()} == {th.ident for th in threads}
    finally:
        for lp in [*loops, main]:
            lp.close()


def test_the_step_that_ends_the_capture_is_still_recorded(
    native: bool, new_loop: asyncio.AbstractEventLoop
) -> None:
    """A trace's own request ends the capture from inside a step (its task's)."""
    rec = tracing._Recorder(new_loop, Options())
    hook = rec.hook = trace_hook.install(rec, native)
    ended: list[bool] = []

    def ends_the_capture() -> None:
        ended.append(hook.uninstall())

    def after() -> None:
        pass

    new_loop.call_soon(ends_the_capture)
    new_loop.call_soon(after)
    new_loop.run_until_complete(asyncio.sleep(0))
    assert ended == [True]
    whats = [r[4] for r in rec.all_records() if r[0] == STEP]
    assert ends_the_capture.__code__ in whats
    assert after.__code__ not in whats
    assert asyncio.Handle.__dict__["_run"] is trace_hook._original_run


def test_hook_replaced_during_the_capture_keeps_theirs(
    native: bool, new_loop: asyncio.AbstractEventLoop
) -> None:
    original = asyncio.Handle.__dict__["_run"]
    rec = tracing._Recorder(new_loop, Options())
    hook = rec.hook = trace_hook.install(rec, native)
    ours = asyncio.Handle.__dict__["_run"]
    calls: list[int] = []

    def theirs(self: asyncio.Handle) -> None:
        calls.append(1)
        ours(self)

    asyncio.Handle._run = theirs  # type: ignore[method-assign]
    try:
        assert hook.uninstall() is False
        assert asyncio.Handle.__dict__["_run"] is theirs
        n = rec.count()
        new_loop.run_until_complete(hook_test_child(3))
        assert calls
        assert rec.count() == n  # ours passes steps through, recording nothing
    finally:
        asyncio.Handle._run = original  # type: ignore[method-assign]


# --- the C hook itself ------------------------------------------------------------------------

needs_native = pytest.mark.skipif(not trace_hook.available(), reason="no C hook")


@needs_native
def test_native_hook_holds_its_records_in_c_until_taken(
    new_loop: asyncio.AbstractEventLoop,
) -> None:
    """No tuple per step on the loop: the C hook's steps and task ends stay in C (counted
    against the limit) until the writer takes them; dropped, they keep nothing alive."""
    code = hook_test_child.__code__
    with Recording(new_loop, True) as rec:
        new_loop.run_until_complete(new_loop.create_task(hook_test_child(50), name="held"))
    capture = rec.hook.capture if rec.hook is not None else None
    assert capture is not None
    assert not [r for r in rec.records if r[0] in (STEP, DONE)]
    held = capture.held()
    assert held >= 52  # 51 steps and the task's end
    assert rec.count() == len(rec.records) + held
    refs = sys.getrefcount(code)
    rec.discard()
    assert capture.held() == 0
    assert sys.getrefcount(code) == refs - 52  # each step and the end held the code once

    with Recording(new_loop, True) as rec:
        new_loop.run_until_complete(new_loop.create_task(hook_test_child(3), name="taken"))
    refs = sys.getrefcount(code)
    records = rec.all_records()
    assert sys.getrefcount(code) == refs  # moved into the tuples: none lost, none added
    assert rec.hook is not None
    assert rec.hook.capture.held() == 0
    steps = [r for r in records if r[0] == STEP and r[5] == "taken"]
    (done,) = [r for r in records if r[0] == DONE and r[4] == "taken"]
    assert len(steps) == 4
    assert all(r[4] is code and r[2] <= r[3] for r in steps)
    assert done[1] == threading.get_ident()
    assert done[2] == steps[-1][3]
    assert done[8] == "result"
    assert not any(gc.is_tracked(r) for r in records)


@needs_native
def test_held_records_are_taken_a_chunk_at_a_time(
    new_loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One C call holds the GIL while it makes its tuples (~70 ms for 200 000 records): the
    writer takes them in chunks, in order, so the loop gets the GIL back between two."""
    with Recording(new_loop, True) as rec:
        new_loop.run_until_complete(new_loop.create_task(hook_test_child(40), name="chunks"))
    assert rec.hook is not None
    capture = rec.hook.capture
    held = capture.held()
    first = capture.take_records(3)
    assert len(first) == 3
    assert capture.held() == held - 3
    assert capture.take_records(0) == []
    taken: list[int] = []
    real = capture.take_records

    class Spy:
        def held(self) -> int:
            n: int = capture.held()
            return n

        def take_records(self, max: int = -1) -> list[Any]:
            got: list[Any] = real(max)
            taken.append(len(got))
            return got

    monkeypatch.setattr(tracing, "_TAKE_CHUNK", 10)
    monkeypatch.setattr(rec.hook, "capture", Spy())
    rest = rec.all_records()
    assert taken == [10] * ((held - 3) // 10) + ([(held - 3) % 10] if (held - 3) % 10 else [])
    assert capture.held() == 0
    steps = [
        r for r in first + rest if r[0] in (STEP, DONE) and r[5 if r[0] == STEP else 4] == "chunks"
    ]
    assert [r[0] for r in steps] == [STEP] * 41 + [DONE]
    ends = [r[3] for r in steps if r[0] == STEP]
    assert ends == sorted(ends)  # in the order they ran


@needs_native
def test_native_hook_is_a_method_descriptor(new_loop: asyncio.AbstractEventLoop) -> None:
    rec = tracing._Recorder(new_loop, Options())
    hook = trace_hook.install(rec, True)
    try:
        installed = asyncio.Handle.__dict__["_run"]
        assert asyncio.Handle._run is installed
        handle = asyncio.Handle(hook_test_function, ([],), new_loop)
        bound = handle._run
        assert isinstance(bound, types.MethodType)
        assert bound.__self__ is handle
        with pytest.raises(TypeError):
            installed()
        with pytest.raises(TypeError):
            installed(handle, handle)
        out: list[str] = []
        installed(asyncio.Handle(hook_test_function, (out,), new_loop))
        assert out == ["function"]
    finally:
        assert hook.uninstall()
    assert asyncio.Handle.__dict__["_run"] is trace_hook._original_run


@needs_native
def test_native_hook_keeps_refcounts(new_loop: asyncio.AbstractEventLoop) -> None:
    """Many steps leave every object's refcount as it was, and no memory behind."""
    owner = HookTestOwner()
    out: list[str] = []
    method = owner.method

    async def steps(n: int) -> None:
        for _ in range(n):
            new_loop.call_soon(method, out)
            new_loop.call_soon(hook_test_function, out)
            await asyncio.sleep(0)

    def run(n: int) -> None:
        with Recording(new_loop, True) as rec:
            new_loop.run_until_complete(steps(n))
        assert len(rec.all_records()) >= 3 * n
        out.clear()

    run(100)  # warm: caches, the loop's ready queue, code objects' co_extra
    gc.collect()  # the recorder of that run holds the loop in a cycle
    counts = [sys.getrefcount(x) for x in (owner, method, hook_test_function, new_loop, out)]
    code_counts = [sys.getrefcount(c) for c in (HookTestOwner.method.__code__, steps.__code__)]
    gc.collect()
    tracemalloc.start()
    try:
        run(2000)
        gc.collect()
        first = tracemalloc.get_traced_memory()[0]
        run(2000)
        gc.collect()
        second = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert [sys.getrefcount(x) for x in (owner, method, hook_test_function, new_loop, out)] == (
        counts
    )
    assert [sys.getrefcount(c) for c in (HookTestOwner.method.__code__, steps.__code__)] == (
        code_counts
    )
    assert second - first < 20_000, (first, second)  # 6 000 records each run: none left


@needs_native
def test_native_hook_survives_a_failing_recorder(new_loop: asyncio.AbstractEventLoop) -> None:
    """An error while recording (a bug of ours) raises out of the step as the Python hook's
    would, with the step's own exception as its context; the loop is not left broken."""
    rec = tracing._Recorder(new_loop, Options())

    def broken(loop: object) -> None:
        raise RuntimeError("see_loop failed")

    rec.see_loop = broken  # type: ignore[method-assign]
    hook = trace_hook.install(rec, True)
    try:

        def stop() -> None:
            raise KeyboardInterrupt

        new_loop.call_soon(stop)
        with pytest.raises(RuntimeError, match="see_loop failed") as info:
            new_loop.run_forever()
        assert isinstance(info.value.__context__, KeyboardInterrupt)
    finally:
        assert hook.uninstall()
    assert new_loop.run_until_complete(hook_test_child(1)) == 1


def test_install_refuses_a_native_hook_it_cannot_use(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.new_event_loop()
    try:
        rec = tracing._Recorder(loop, Options())
        monkeypatch.setattr(trace_hook, "_native", None)
        monkeypatch.setattr(trace_hook, "_reason", "not built here")
        with pytest.raises(ValueError, match="not built here"):
            trace_hook.install(rec, True)
        hook = trace_hook.install(rec, None)  # the default: the Python one
        try:
            assert hook.native is False
            assert asyncio.Handle.__dict__["_run"] is trace_hook.run_step
        finally:
            assert hook.uninstall()
    finally:
        loop.close()


def test_no_native_hook_under_the_switch() -> None:
    """ASGI_PPROF_NO_NATIVE=1: the extension is never imported; captures use run_step."""
    code = """
        import asyncio, sys
        from asgi_pprof import trace_hook, tracing
        from asgi_pprof.concurrency import SleepWindow
        from asgi_pprof.options import Options
        assert not trace_hook.available()
        assert "ASGI_PPROF_NO_NATIVE" in trace_hook.unavailable_reason()
        assert "asgi_pprof._tracestep" not in sys.modules
        seen = []
        async def main():
            t = asyncio.ensure_future(tracing.capture(0.05, SleepWindow(), Options()))
            await asyncio.sleep(0.01)
            seen.append(asyncio.Handle.__dict__["_run"] is trace_hook.run_step)
            await t
        asyncio.run(main())
        assert seen == [True], seen
        print("ok")
    """
    r = run_python(code, env={**os.environ, "ASGI_PPROF_NO_NATIVE": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
@pytest.mark.parametrize("hook", HOOKS)
def test_a_child_forked_during_a_capture_runs_without_it(hook: str) -> None:
    """The child's loop steps run through the original Handle._run again, and it can trace."""
    code = f"""
        import asyncio, gc, os, sys
        from asgi_pprof import trace_hook, tracing
        from asgi_pprof.concurrency import SleepWindow
        from asgi_pprof.options import Options
        tracing._native_hook = {hook == "native"}

        async def child() -> None:
            assert not tracing.is_capturing()
            assert asyncio.Handle.__dict__["_run"] is trace_hook._original_run
            # No gc callback of the parent's capture (Python's or the C capture's) stays.
            assert not [cb for cb in gc.callbacks if "on_gc" in repr(cb)], gc.callbacks
            body = await tracing.capture(0.05, SleepWindow(), Options())  # not busy here
            assert body.startswith(b"{{")

        async def main() -> None:
            t = asyncio.ensure_future(tracing.capture(0.3, SleepWindow(), Options()))
            await asyncio.sleep(0.05)
            assert tracing.is_capturing()
            pid = os.fork()
            if pid == 0:
                try:
                    asyncio.run(child())  # a new loop: the parent's belongs to the parent
                except BaseException as exc:
                    print("child failed:", repr(exc), file=sys.stderr)
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, status
            await t

        asyncio.run(main())
        print("ok")
    """
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok", r.stderr


# --- which request a task serves, found at its first step ----------------------------------


def hook_scope(path: str, **more: Any) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": path, **more}


class HookTestCycle:
    """What uvicorn's RequestResponseCycle holds that the trace reads: its scope."""

    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope

    async def run_asgi(self, app: object) -> None:
        await asyncio.sleep(0)


class HookTestPropertyScope:
    """A ``scope`` that is a property: never run by the trace (no instance attribute)."""

    reads = 0

    @property
    def scope(self) -> dict[str, Any]:
        HookTestPropertyScope.reads += 1
        return hook_scope("/property")

    async def run(self) -> None:
        await asyncio.sleep(0)


class HookTestDefaultScope:
    """A class attribute ``scope`` (a default) that instances set: read from the instance."""

    scope: dict[str, Any] | None = None

    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope

    async def run(self) -> None:
        await asyncio.sleep(0)


async def hook_test_asgi(scope: dict[str, Any], receive: object, send: object) -> None:
    scope["endpoint"] = hook_test_asgi  # routed, as Starlette does in place
    await asyncio.sleep(0)


async def hook_test_closure(scope: dict[str, Any], receive: object, send: object) -> None:
    def routed() -> None:
        scope["route"] = "a route"

    await asyncio.sleep(0)
    routed()


async def hook_test_requests() -> None:
    tasks = [
        asyncio.create_task(HookTestCycle(hook_scope(f"/c/{i}")).run_asgi(None), name=f"c{i}")
        for i in range(3)
    ]
    tasks.append(asyncio.create_task(hook_test_asgi(hook_scope("/a"), None, None), name="a"))
    scope = hook_scope("/items/7", path_params={"item_id": 7})
    tasks.append(asyncio.create_task(hook_test_closure(scope, None, None), name="closure"))
    ws = {"type": "websocket", "path": "/ws"}
    tasks.append(asyncio.create_task(hook_test_asgi(ws, None, None), name="ws"))
    tasks.append(asyncio.create_task(HookTestPropertyScope().run(), name="property"))
    default = HookTestDefaultScope(hook_scope("/default"))
    tasks.append(asyncio.create_task(default.run(), name="default"))
    tasks.append(asyncio.create_task(hook_test_child(1), name="no request"))
    not_a_scope = {"type": "lifespan", "path": "/"}
    tasks.append(asyncio.create_task(hook_test_asgi(not_a_scope, None, None), name="lifespan"))
    await asyncio.gather(*tasks)


def record_requests(native: bool) -> dict[str, str | None]:
    """Return ``task name -> label`` of the tasks hook_test_requests makes (None: no request)."""
    loop = asyncio.new_event_loop()
    try:
        with Recording(loop, native) as rec:
            loop.run_until_complete(hook_test_requests())
        rec.requests.finish_all()
        labels = rec.requests.labels
        return {r[4]: labels.get(r[7]) for r in rec.records if r[0] == NEW}
    finally:
        loop.close()


def test_each_hook_finds_the_request_a_task_serves(native: bool) -> None:
    HookTestPropertyScope.reads = 0
    got = record_requests(native)
    want = {
        "c0": "GET /c/0",
        "c1": "GET /c/1",
        "c2": "GET /c/2",
        "a": "GET /a",
        "closure": "GET /items/{item_id}",  # an argument a closure keeps (a cell)
        "ws": "WEBSOCKET /ws",
        "property": None,
        "default": "GET /default",
        "no request": None,
        "lifespan": None,
    }
    assert {k: got.get(k) for k in want} == want, got
    assert HookTestPropertyScope.reads == 0


@needs_native
def test_native_request_lookup_keeps_refcounts(new_loop: asyncio.AbstractEventLoop) -> None:
    """Finding and labelling many requests in C leaves each scope, cycle and code as it was."""
    scopes = [hook_scope(f"/r/{i % 3}") for i in range(50)]
    cycles = [HookTestCycle(s) for s in scopes]

    async def serve(k: int) -> None:
        for c in cycles[:k]:
            await asyncio.create_task(c.run_asgi(None))

    def run(k: int) -> tuple[list[str], int]:
        with Recording(new_loop, True) as rec:
            new_loop.run_until_complete(serve(k))
        return sorted(set(rec.requests.labels.values())), len(rec.requests.scopes)

    run(5)
    gc.collect()
    counts = [sys.getrefcount(x) for x in (*scopes, *cycles)]
    code_count = sys.getrefcount(HookTestCycle.run_asgi.__code__)
    labels, unlabelled = run(50)
    assert labels == ["GET /r/0", "GET /r/1", "GET /r/2"]
    assert unlabelled == 0  # each request labelled when its task finished
    gc.collect()
    assert [sys.getrefcount(x) for x in (*scopes, *cycles)] == counts
    after = sys.getrefcount(HookTestCycle.run_asgi.__code__)  # outside assert: no temporaries
    assert after == code_count


@needs_native
def test_native_capture_refuses_bad_requests(new_loop: asyncio.AbstractEventLoop) -> None:
    from asgi_pprof import _tracestep  # type: ignore[attr-defined]

    rec = tracing._Recorder(new_loop, Options())
    args = (rec, set(), 10, new_loop, set())
    _tracestep.StepCapture(*args, rec.requests)
    with pytest.raises(AttributeError):
        _tracestep.StepCapture(*args, object())
    for name, bad in (("of_task", []), ("scopes", None), ("numbers", [1, 2])):
        requests = trace_routes.Requests()
        setattr(requests, name, bad)
        with pytest.raises(TypeError, match=name):
            _tracestep.StepCapture(*args, requests)
    with pytest.raises(TypeError):
        _tracestep.StepCapture(rec, [], 10, new_loop, set(), rec.requests)


@needs_native
def test_native_capture_wait_times_out_stops_and_refuses_bad_timeouts(
    new_loop: asyncio.AbstractEventLoop,
) -> None:
    """The wall-clock sampler's wait: False after its timeout, True at once once stopped,
    and it gets the GIL back while the loop runs no step (idle, or in one long step)."""
    with Recording(new_loop, True) as rec:
        cap = rec.hook.capture
        assert cap is not None
        for bad in (-1.0, float("nan"), 1e9):
            with pytest.raises(ValueError, match="timeout between"):
                cap.wait(bad)
        with pytest.raises(TypeError):
            cap.wait("0.1")
        t0 = time.monotonic()
        assert cap.wait(0.02) is False
        assert 0.015 < time.monotonic() - t0 < 1.0

        got: list[tuple[bool, float]] = []

        def waits(timeout: float) -> None:
            t = time.monotonic()
            got.append((cap.wait(timeout), time.monotonic() - t))

        th = threading.Thread(target=waits, args=(0.01,))
        th.start()
        end = time.monotonic() + 0.2
        while time.monotonic() < end:  # a long "step": the GIL changes hands as before
            pass
        th.join(5)
        assert len(got) == 1, got
        assert got[0][0] is False, got
        assert got[0][1] < 0.2, got

        th = threading.Thread(target=waits, args=(30.0,))
        th.start()
        time.sleep(0.05)
        cap.stop_waits()
        th.join(5)
        assert not th.is_alive()
        assert len(got) == 2, got
        assert got[1][0] is True, got
        assert got[1][1] < 1.0, got
        assert cap.wait(10) is True  # stopped for good


@needs_native
def test_native_capture_wait_sleeps_on_while_samples_are_noted_elsewhere(
    new_loop: asyncio.AbstractEventLoop,
) -> None:
    """While the main thread's CPU ticks take the wall-clock samples (note_sample), the
    sampler's wait sleeps on without the GIL: until no sample came for a timeout, or a loop
    step has run stall_ns."""
    with Recording(new_loop, True) as rec:
        cap = rec.hook.capture
        assert cap is not None
        with pytest.raises(ValueError, match="stall_ns"):
            cap.wait(0.01, -1)
        noting = [True]

        def noter(seconds: float) -> None:
            end = time.monotonic() + seconds
            while noting[0] and time.monotonic() < end:
                cap.note_sample()
                time.sleep(0.005)

        got: list[tuple[bool, float]] = []

        def waits(timeout: float, stall_ns: int = 0) -> None:
            t = time.monotonic()
            got.append((cap.wait(timeout, stall_ns), time.monotonic() - t))

        # Notes for 0.3 s: a 20 ms wait lasts until they stop, and at most two timeouts more.
        notes = threading.Thread(target=noter, args=(0.3,))
        notes.start()
        time.sleep(0.01)
        waits(0.02)
        notes.join(5)
        assert got[-1][0] is False, got
        assert 0.25 < got[-1][1] < 0.3 + 0.5, got

        # Notes go on, but a loop step runs 0.3 s: the wait ends once it has run 50 ms.
        notes = threading.Thread(target=noter, args=(2.0,))
        notes.start()
        waiter = threading.Thread(target=waits, args=(0.02, 50_000_000))
        try:
            time.sleep(0.05)
            waiter.start()
            new_loop.call_soon(time.sleep, 0.3)
            new_loop.run_until_complete(asyncio.sleep(0.31))
            waiter.join(5)
        finally:
            noting[0] = False
            notes.join(5)
        assert got[-1][0] is False, got
        assert got[-1][1] < 0.3, got


@needs_native
def test_native_request_numbers_running_out_fail_the_step(
    new_loop: asyncio.AbstractEventLoop,
) -> None:
    """A request number the iterator cannot give raises out of the step (a bug of ours),
    the loop stays usable."""
    rec = tracing._Recorder(new_loop, Options())
    rec.requests.numbers = iter(())
    hook = trace_hook.install(rec, True)
    task = new_loop.create_task(HookTestCycle(hook_scope("/x")).run_asgi(None))
    try:
        with pytest.raises(RuntimeError, match="ran out"):
            new_loop.run_until_complete(task)
    finally:
        assert hook.uninstall()
    # Its step raised before it ran: the task stays pending, its coroutine never started.
    task.get_coro().close()
    task._log_destroy_pending = False  # type: ignore[attr-defined]
    assert new_loop.run_until_complete(hook_test_child(1)) == 1


@needs_native
def test_native_gc_callback_records_as_the_python_one(
    new_loop: asyncio.AbstractEventLoop,
) -> None:
    """The C capture's ``on_gc`` (the gc.callbacks entry with the C hook) records what
    ``_Recorder.on_gc`` records, counts collections past the limit as dropped, and is the
    callback a trace installs and removes."""
    from asgi_pprof import _tracestep

    rec = tracing._Recorder(new_loop, Options())
    rec.limit = 2
    cap = _tracestep.StepCapture(rec, set(), rec.limit, new_loop, set(), rec.requests)
    info = {"generation": 1, "collected": 5, "uncollectable": 0}
    cap.on_gc("start", info)
    cap.on_gc("stop", info)
    py = tracing._Recorder(new_loop, Options())
    py.on_gc("start", info)
    py.on_gc("stop", info)
    (got,), (want,) = rec.records, py.records
    assert got[0] == GC
    assert got[1] == threading.get_ident()
    assert 0 < got[2] <= got[3]
    assert got[:2] + got[4:] == want[:2] + want[4:]
    cap.on_gc("stop", {})  # no new start, no keys: Python's defaults, the last start
    assert rec.records[1][4:] == (-1, 0, 0)
    assert rec.records[1][2] == rec.records[0][2]
    assert rec.dropped == 0
    cap.on_gc("stop", info)  # the limit (2) is reached
    assert len(rec.records) == 2
    assert rec.dropped == 1
    for bad in ((), ("stop",), ("stop", info, 1)):
        with pytest.raises(TypeError):
            cap.on_gc(*bad)


@needs_native
def test_a_trace_with_the_c_hook_records_collections_through_the_capture(
    new_loop: asyncio.AbstractEventLoop,
) -> None:
    rec = tracing._Recorder(new_loop, Options())
    rec.install()
    try:
        assert rec.hook is not None
        assert rec.hook.capture is not None
        callback = rec._gc_callback
        assert callback == rec.hook.capture.on_gc
        assert callback in gc.callbacks
        gc.collect()
    finally:
        rec.uninstall()
    assert callback not in gc.callbacks
    assert any(r[0] == GC and r[4] == 2 for r in rec.records)


@needs_native
def test_native_task_created_and_finished_are_the_python_ones(
    new_loop: asyncio.AbstractEventLoop,
) -> None:
    """The C capture's ``task_created`` and ``finished`` (uvloop's task factory uses them)
    find the request a new task serves and label it as ``trace_routes.Requests`` does."""
    from asgi_pprof import _tracestep

    rec = tracing._Recorder(new_loop, Options())
    cap = _tracestep.StepCapture(rec, set(), rec.limit, new_loop, set(), rec.requests)
    py = trace_routes.Requests()
    coros = []
    for requests, created, finished in (
        (rec.requests, cap.task_created, cap.finished),
        (py, py.task_created, py.finished),
    ):
        got = []
        for path in ("/a", "/b", "/a"):
            coro = HookTestCycle(hook_scope(path)).run_asgi(None)
            coros.append(coro)
            n = created(id(coro), coro, coro.cr_code)
            assert n is not None
            assert requests.of_task[id(coro)] == n
            assert requests.scopes[n]["path"] == path
            finished(n)
            got.append(requests.labels[n])
            assert n not in requests.scopes
        plain = asyncio.sleep(0)
        coros.append(plain)
        assert created(id(plain), plain, plain.cr_code) is None  # serves no request
        assert created(1, plain, None) is None
        assert got == ["GET /a", "GET /b", "GET /a"]
    for coro in coros:
        coro.close()
    with pytest.raises(TypeError):
        cap.task_created(1, None)
