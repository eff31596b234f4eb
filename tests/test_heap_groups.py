"""Grouping and naming tracemalloc's traces: the C path (_traces) and the pure one agree."""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from asgi_pprof import heap, heap_groups, heap_names, native
from asgi_pprof.heap_names import PACKAGE_DIR, Traceback
from asgi_pprof.model import Sample

NATIVE_OFF = os.environ.get("ASGI_PPROF_NO_NATIVE", "") not in ("", "0")
ext = native.traces
needs_ext = pytest.mark.skipif(ext is None, reason="asgi_pprof._traces is not built")


@pytest.fixture
def pure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the pure-Python path, as without the extension."""
    monkeypatch.setattr(heap_groups, "native", None)
    monkeypatch.setattr(heap_names, "_traces", None)


def _traces() -> list[heap_groups.Trace]:
    """Return raw traces of every shape: shared and equal-but-distinct tracebacks, ours."""
    app = ("/app/views.py", 10)
    tb_a: Traceback = (app, ("/app/main.py", 3))
    tb_b: Traceback = (("/app/models.py", 7),)
    tb_a_copy: Traceback = tuple(tuple(fr) for fr in tb_a)  # type: ignore[misc]
    ours: Traceback = (app, (PACKAGE_DIR + "heap.py", 99))
    out: list[heap_groups.Trace] = []
    for i in range(5000):
        tb = (tb_a, tb_b, tb_a_copy, ours, ())[i % 5]
        out.append((0, 16 + i % 7, tb, len(tb)))
    return out


def test_the_extension_is_built_where_a_compiler_is() -> None:
    # .ci/run installs gcc: CI must run the C path, not silently the fallback.
    if NATIVE_OFF:
        pytest.skip("ASGI_PPROF_NO_NATIVE is set")
    assert ext is not None
    assert heap_groups.native is ext


@needs_ext
def test_group_is_the_same_in_c_and_python(monkeypatch: pytest.MonkeyPatch) -> None:
    traces = _traces()
    monkeypatch.setattr(heap_groups, "TRACES_SLICE", 777)  # several slices, odd bounds
    monkeypatch.setattr(heap_groups, "ROWS_SLICE", 1)
    got = heap_groups.group(traces)
    assert got == heap_groups._group_python(traces)
    rows, own_objects, own_bytes = got
    assert [r[2] for r in rows] == [traces[0][2], traces[1][2], ()]  # first-seen order
    assert rows[0][0] == 2000  # the equal copy joined the shared traceback's group
    assert own_objects == 1000
    assert own_bytes == sum(t[1] for t in traces if t[2] and t[2][-1][0].startswith(PACKAGE_DIR))


@needs_ext
def test_group_and_samples_agree_on_a_live_heap(pure: None) -> None:
    import _tracemalloc

    assert ext is not None
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start(8)
    try:
        kept = [_spread(k) for k in range(64)]
        traces: list[heap_groups.Trace] = _tracemalloc._get_traces()  # type: ignore[assignment]
    finally:
        if started:
            tracemalloc.stop()
    want = heap_groups._group_python(traces)
    assert heap_groups._group_native(traces, ext) == want
    rows = want[0]
    assert len(rows) > 10
    pure_samples = heap_groups.samples(rows)
    c_samples: list[Sample] = ext.samples(rows, 0, len(rows), *_caches(), Sample)
    assert [(s.stack, s.values) for s in c_samples] == [(s.stack, s.values) for s in pure_samples]
    del kept


def _spread(bits: int, depth: int = 6) -> list[list[int]]:
    """Return a few blocks allocated at one of 2**depth distinct stacks."""
    if depth == 0:
        return [[i] for i in range(5)]
    if bits & 1:
        return _spread(bits >> 1, depth - 1)
    return [*_spread(bits >> 1, depth - 1)]


def _caches() -> tuple[Any, ...]:
    n = heap_names.names
    return (n.frames, n.multi, n.deeper, n.stack)


def nested_lines() -> list[list[int]]:
    # A lambda: two codes on one line (3.12+ inlines comprehensions, so not one of those).
    wrap = lambda i: [i]  # noqa: E731
    return [wrap(i) for i in range(3)]


@needs_ext
def test_samples_name_nested_codes_as_names_stack_does() -> None:
    assert ext is not None
    code = nested_lines.__code__
    line = code.co_firstlineno + 2
    fr = (code.co_filename, line)
    tbs: list[Traceback] = [
        (fr, fr, ("/nowhere.py", 1)),  # the lambda, then nested_lines around it
        (fr,),
        ((code.co_filename, code.co_firstlineno),),
        ((code.co_filename, line), ("/nowhere.py", 1)),
    ]
    rows = [(i + 1, 10 * i, tb) for i, tb in enumerate(tbs)]
    want = [heap_names.names.stack(tb) for tb in tbs]
    assert fr in heap_names.names.multi  # a cached nested frame: the C lookups are used
    for _ in range(2):
        got = ext.samples(rows, 0, len(rows), *_caches(), Sample)
        assert [s.stack for s in got] == want
        assert [s.values for s in got] == [[r[0], r[1]] for r in rows]
    assert want[0][0].function.endswith("nested_lines.<locals>.<lambda>")
    assert want[0][1].function.endswith("nested_lines")


@needs_ext
def test_samples_call_back_for_frames_not_cached() -> None:
    assert ext is not None
    calls: list[tuple[tuple[str, int], int]] = []
    frames: dict[tuple[str, int], Any] = {("/a.py", 1): "A"}

    def frame(fr: tuple[str, int], depth: int = 0) -> str:
        calls.append((fr, depth))
        return f"new {fr[0]}:{fr[1]}@{depth}"

    rows = [(1, 2, (("/a.py", 1),)), (3, 4, (("/a.py", 1), ("/b.py", 2)))]
    got = ext.samples(rows, 0, 2, frames, set(), {}, frame, Sample)
    assert [s.stack for s in got] == [("A",), ("A", "new /b.py:2@0")]
    assert calls == [(("/b.py", 2), 0)]  # only the frame not cached calls back
    calls.clear()
    tb = (("/a.py", 1), ("/a.py", 1))
    got = ext.samples([(1, 1, tb)], 0, 1, frames, {("/a.py", 1)}, {}, frame, Sample)
    assert got[0].stack == ("A", "new /a.py:1@1")  # depth 1 is not cached
    assert calls == [(("/a.py", 1), 1)]
    deeper = {("/a.py", 1): ["A1"]}
    got = ext.samples([(1, 1, tb)], 0, 1, frames, {("/a.py", 1)}, deeper, frame, Sample)
    assert got[0].stack == ("A", "A1")
    got = ext.samples([(1, 1, tb)], 0, 1, frames, set(), deeper, frame, Sample)
    assert got[0].stack == ("A", "A")  # no nested code on the line: depth 0 throughout
    calls.clear()
    # A miss names the whole traceback frame by frame, as Names._nested: depth counts
    # repeats even off `multi`, and cached neighbours are taken from the caches.
    tb3 = (("/b.py", 2), ("/a.py", 1), ("/a.py", 1))
    got = ext.samples([(1, 1, tb3)], 0, 1, frames, set(), deeper, frame, Sample)
    assert got[0].stack == ("new /b.py:2@0", "A", "A1")
    assert calls == [(("/b.py", 2), 0)]

    def clearing(fr: tuple[str, int], depth: int = 0) -> str:
        frames.clear()  # a cache restart in the callback: names already taken stay valid
        return "x"

    frames["/a.py", 1] = "A"
    got = ext.samples([(1, 1, (("/a.py", 1), ("/c.py", 3)))], 0, 1, frames, set(), {}, clearing,
                      Sample)  # fmt: skip
    assert got[0].stack == ("A", "x")

    def failing(fr: tuple[str, int], depth: int = 0) -> str:
        raise LookupError("naming failed")

    with pytest.raises(LookupError, match="naming failed"):
        ext.samples([(1, 1, (("/d.py", 4),))], 0, 1, {}, set(), {}, failing, Sample)


@needs_ext
def test_last_line_reads_the_table_as_python_does(pure: None) -> None:
    assert ext is not None
    codes = [nested_lines.__code__, heap_names.last_line.__code__, test_c_is_refcount_neutral]
    for mod in (heap_names, heap, gc, os):
        codes += [v.__code__ for v in vars(mod).values() if hasattr(v, "__code__")]
    for code in codes:
        if not hasattr(code, "co_linetable"):
            code = code.__code__  # type: ignore[union-attr]
        want = heap_names.last_line(code)
        assert ext.last_line(code.co_linetable, code.co_firstlineno) == want
        assert want == max(ln for _, _, ln in code.co_lines() if ln is not None)


@needs_ext
def test_c_is_refcount_neutral() -> None:
    assert ext is not None
    traces = _traces()
    tb = traces[0][2]
    frame = heap_names.names.frame(("/x/leaf.py", 1))
    frames = {("/x/leaf.py", 1): frame}
    before = (sys.getrefcount(tb), sys.getrefcount(frame), sys.getrefcount(traces[0]))
    for _ in range(3):
        g = ext.Groups()
        g.add(traces, 0, len(traces))
        rows, _, _ = g.rows(PACKAGE_DIR, 0, len(g))
        del g
        samples = ext.samples([(1, 2, (("/x/leaf.py", 1),))] * 50, 0, 50, frames, set(), {},
                              heap_names.names.frame, Sample)  # fmt: skip
        del rows, samples
    assert (sys.getrefcount(tb), sys.getrefcount(frame), sys.getrefcount(traces[0])) == before


@needs_ext
def test_groups_in_a_cycle_are_collected() -> None:
    assert ext is not None

    class Tb(tuple):  # type: ignore[type-arg]
        pass

    g = ext.Groups()
    tb = Tb(())
    tb.groups = g  # type: ignore[attr-defined]
    g.add([(0, 1, tb, 0)], 0, 1)
    del g, tb
    assert gc.collect() >= 2


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda g: g.add((), 0, 1), TypeError),
        (lambda g: g.add([(0, 1)], 0, 1), TypeError),
        (lambda g: g.add([(0, 1, [("a", 1)], 1)], 0, 1), TypeError),
        (lambda g: g.add([(0, "x", (), 1)], 0, 1), TypeError),
        (lambda g: g.add([], 2, 1), ValueError),
        (lambda g: g.add([]), TypeError),
        (lambda g: g.rows(b"/", 0, 1), TypeError),
        (lambda g: g.rows("/", -1, 1), ValueError),
        (lambda g: ext.Groups(1), TypeError),  # type: ignore[union-attr]
    ],
)
@needs_ext
def test_groups_reject_bad_input(call: Any, error: type[Exception]) -> None:
    assert ext is not None
    with pytest.raises(error):
        call(ext.Groups())


@needs_ext
def test_rows_and_samples_reject_bad_input() -> None:
    assert ext is not None
    g = ext.Groups()
    g.add([(0, 1, ((1, 2),), 1)], 0, 1)
    with pytest.raises(TypeError, match="filename, line"):
        g.rows("/", 0, 1)
    args: tuple[Any, ...] = ({}, set(), {}, heap_names.names.frame, Sample)
    with pytest.raises(TypeError, match="row is"):
        ext.samples([(1, 2)], 0, 1, *args)
    with pytest.raises(TypeError, match="must be dicts"):
        ext.samples([], 0, 0, [], set(), {}, heap_names.names.frame, Sample)
    with pytest.raises(TypeError):
        ext.samples([], 0, 0)
    with pytest.raises(TypeError):
        ext.last_line("x", 1)


@needs_ext
def test_groups_refuse_to_be_reentered() -> None:
    assert ext is not None
    g = ext.Groups()

    class Sneaky(tuple):  # type: ignore[type-arg]
        def __hash__(self) -> int:
            return 1

        def __eq__(self, other: object) -> bool:
            g.add([(0, 1, (), 0)], 0, 1)
            return False

    with pytest.raises(RuntimeError, match="already in use"):
        g.add([(0, 1, Sneaky(()), 0), (0, 1, Sneaky(()), 0)], 0, 2)
    g.add([(0, 1, (), 0)], 0, 1)  # usable again after the error
    assert len(g) == 2


@pytest.fixture
def tracing() -> Iterator[None]:
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start(4)
    yield
    if started:
        tracemalloc.stop()


@pytest.mark.parametrize("native_path", [True, False])
def test_heap_samples_either_path(native_path: bool, tracing: None, request: Any) -> None:
    if not native_path:
        request.getfixturevalue("pure")
    elif ext is None:
        pytest.skip("asgi_pprof._traces is not built")
    kept = [nested_lines() for _ in range(200)]
    snap = heap.take_snapshot()
    samples = heap.heap_samples(snap.rows)
    assert len(samples) == len(snap.rows) > 0
    assert any(f.function.endswith("nested_lines") for s in samples for f in s.stack)
    assert not any(f.filename.startswith(PACKAGE_DIR) for s in samples for f in s.stack)
    assert snap.own_objects >= 0
    del kept


@needs_ext
@pytest.mark.parametrize("cold", [True, False])
def test_encoded_rows_decode_as_their_samples(
    cold: bool, tracing: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heap's fast path (rows straight to the wire) writes what its samples encode to:
    cold, every name and location is made through the callbacks; warm, from the caches."""
    import functools

    from asgi_pprof import builder

    if native.wire is None:
        pytest.skip("asgi_pprof._wire is not built")
    monkeypatch.setattr(heap_groups, "names", heap_names.Names())
    monkeypatch.setattr(heap_groups, "ROWS_SLICE", 7)  # several slices, odd bounds
    kept = [nested_lines() for _ in range(50)] + [_spread(k) for k in range(16)]
    rows = heap.take_snapshot().rows
    code = nested_lines.__code__
    fr = (code.co_filename, code.co_firstlineno + 2)
    rows += [(3, 300, (fr, fr, ("/nowhere.py", 1))), (0, 0, ())]  # nested; empty stack

    def fast() -> builder.ProfileData:
        fields = functools.partial(heap_groups.encoded, rows)
        return builder.decode(builder.encode(heap._heap_data([]), sample_fields=fields))

    def slow() -> builder.ProfileData:
        return builder.decode(builder.encode(heap._heap_data(heap_groups.samples(rows))))

    if cold:
        got, want = fast(), slow()
    else:
        want = slow()
        got = fast()
    assert len(got.samples) == len(rows) > 20
    assert [(s.stack, s.values) for s in got.samples] == [(s.stack, s.values) for s in want.samples]
    assert any(f.function.endswith("nested_lines.<locals>.<lambda>") for s in got.samples
               for f in s.stack)  # fmt: skip
    del kept


@needs_ext
def test_encode_is_refcount_neutral_and_rejects_bad_input() -> None:
    assert ext is not None
    fr = ("/x/leaf.py", 1)
    frame = heap_names.names.frame(fr)
    frames = {fr: frame}
    locations = {frame: b"\x05"}
    row = (1, 2, (fr,))
    rows = [row] * 50

    def location(f: Any) -> bytes:
        raise AssertionError("every location is cached")

    before = (sys.getrefcount(frame), sys.getrefcount(row))
    for _ in range(3):
        out = ext.encode(rows, 0, 50, frames, set(), {}, heap_names.names.frame, locations,
                         location)  # fmt: skip
        # Sample field (2): location_id [5] packed (1), value [1, 2] packed (2).
        assert out == b"\x12\x07\x0a\x01\x05\x12\x02\x01\x02" * 50
    assert (sys.getrefcount(frame), sys.getrefcount(row)) == before

    def boom(f: Any) -> bytes:
        raise ValueError("boom")

    args: tuple[Any, ...] = (frames, set(), {}, heap_names.names.frame)
    with pytest.raises(ValueError, match="boom"):
        ext.encode(rows, 0, 1, *args, {}, boom)
    with pytest.raises(TypeError, match="must be bytes"):
        ext.encode(rows, 0, 1, *args, {frame: "x"}, location)
    with pytest.raises(TypeError, match="must return bytes"):
        ext.encode(rows, 0, 1, *args, {}, lambda f: 5)
    with pytest.raises(TypeError, match="row is"):
        ext.encode([(1, 2)], 0, 1, *args, {}, location)
    with pytest.raises(TypeError, match="must be a dict"):
        ext.encode(rows, 0, 1, *args, [], location)
    with pytest.raises(TypeError, match="9 arguments"):
        ext.encode(rows, 0, 1)
    with pytest.raises(ValueError, match="boom"):  # a name not cached, its callback failing
        ext.encode([(1, 2, (("/y.py", 3),))], 0, 1, {}, set(), {}, boom, {}, location)
    assert (sys.getrefcount(frame), sys.getrefcount(row)) == before
