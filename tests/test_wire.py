"""The C sample encoder (asgi_pprof._wire): the same profile as the pure path, clean errors."""

from __future__ import annotations

import gc
import os
import random
import sys

import pytest

from asgi_pprof import builder
from asgi_pprof.model import Frame, ProfileData, Sample, ValueType
from asgi_pprof.proto import profile_pb2 as pb

NATIVE_OFF = os.environ.get("ASGI_PPROF_NO_NATIVE", "") not in ("", "0")


def _profile(n: int = 3000) -> ProfileData:
    """Return a profile with every shape a sample can take (seeded, so failures repeat)."""
    rnd = random.Random(7)
    frames = [Frame(f"m.f{i}" if i else "", f"/app/{i % 5}.py", i, i * 3 + 1) for i in range(120)]
    samples = []
    for i in range(n):
        stack = tuple(rnd.sample(frames, rnd.randint(0, 12)))
        labels = tuple(sorted({("thread", rnd.choice(["Main", ""])), ("k", str(i % 4))}))
        nums: tuple[tuple[str, int, str], ...] = ()
        if i % 3 == 0:
            nums = (("bytes", rnd.randint(-(1 << 40), 1 << 40), "bytes" if i % 2 else ""),)
        values = [rnd.randint(-5, 1 << 62), 0, rnd.randint(0, 1 << 20)] if i % 7 else []
        samples.append(Sample(stack, values, labels, nums))
    return ProfileData(
        [ValueType("alloc_objects", "count"), ValueType("alloc_space", "bytes")],
        ValueType("space", "bytes"),
        524288,
        samples,
        time_nanos=1_700_000_000_000_000_000,
        duration_nanos=5,
        default_sample_type="alloc_space",
        comments=["a comment"],
    )


def test_the_native_encoder_is_built_where_a_compiler_is() -> None:
    # .ci/run installs gcc: CI must run the C path, not silently the fallback.
    if NATIVE_OFF:
        pytest.skip("ASGI_PPROF_NO_NATIVE is set")
    assert builder._wire is not None


@pytest.mark.parametrize("native", [True, False])
def test_profile_bytes_decode_to_the_pure_profile(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if native and builder._wire is None:
        pytest.skip("asgi_pprof._wire is not built")
    if not native:
        monkeypatch.setattr(builder, "_wire", None)
    data = _profile()
    pure = builder.to_proto(data)
    for _ in range(2):  # the second time from the process-wide location cache
        raw = builder.profile_bytes(data)
        got = pb.Profile.FromString(raw)
        assert builder.decode(raw) == builder.decode(pure.SerializeToString())
        assert len(got.sample) == len(data.samples)
        assert list(got.string_table) == list(pure.string_table)
        if not native:
            assert raw == pure.SerializeToString()
        else:
            # Process-wide ids: unique and non-zero, each location and function once.
            ids = [loc.id for loc in got.location]
            assert 0 not in ids
            assert len(set(ids)) == len(ids) == len(pure.location)
            assert len({f.id for f in got.function}) == len(pure.function)


@pytest.mark.skipif(builder._wire is None, reason="asgi_pprof._wire is not built")
def test_bad_samples_raise_and_hold_nothing() -> None:
    wire = builder._wire
    assert wire is not None
    frame = Frame("m.f", "/app/m.py", 1, 2)
    ok = [Sample((frame,), [1], (("k", "v"),), (("n", 3, ""),))]
    before = sys.getrefcount(frame)
    for _ in range(100):
        wire.samples(ok, {}, lambda f: b"\x01", {}, lambda lab: b"\x1a\x00", lambda s: 1)
    assert sys.getrefcount(frame) == before  # the caches went with the call
    cases: list[tuple[list[object], object, type[Exception]]] = [
        ([Sample((frame,), [1 << 70])], lambda f: b"\x01", OverflowError),
        ([object()], lambda f: b"\x01", AttributeError),
        ([Sample((frame,), [1])], lambda f: 1, TypeError),  # not bytes
        ([Sample((frame,), ["x"])], lambda f: b"\x01", TypeError),  # type: ignore[list-item]
        ([Sample((frame,), [1], (), (("n", 1),))], lambda f: b"\x01", TypeError),  # type: ignore[arg-type]
        ([Sample((frame,), [1])], lambda f: 1 / 0, ZeroDivisionError),
    ]
    before = sys.getrefcount(frame)
    for samples, location, error in cases:
        with pytest.raises(error):
            wire.samples(samples, {}, location, {}, lambda lab: b"\x1a\x00", lambda s: 1)
    with pytest.raises(TypeError):
        wire.samples(ok, {}, lambda f: b"\x01")
    assert sys.getrefcount(frame) == before
    # The field writers: exact bytes, clean errors.
    assert wire.varint(300) == b"\xac\x02"
    assert wire.varint(-1) == b"\xff" * 9 + b"\x01"
    loc = pb.Profile.FromString(wire.location(7, 0x10000123, 3, 0)).location[0]
    assert (loc.id, loc.mapping_id, loc.address, loc.line[0].function_id) == (7, 1, 0x10000123, 3)
    fn = pb.Profile.FromString(wire.function(2, 5, 6, 40)).function[0]
    assert (fn.id, fn.name, fn.system_name, fn.filename, fn.start_line) == (2, 5, 5, 6, 40)
    for bad in [(), ("x",), (1 << 70,), (1, 2)]:
        with pytest.raises((TypeError, OverflowError)):
            wire.varint(*bad)
    with pytest.raises(TypeError):
        wire.location(1, 2, 3)


@pytest.mark.skipif(NATIVE_OFF, reason="native encoder forced off")
def test_untrack_takes_out_of_the_collectors_sight_only_what_can_be_in_no_cycle() -> None:
    from asgi_pprof import _wire

    frame = Frame("m.f", "/app/m.py", 1, 2)
    stack = (frame, frame)
    location = (b"\x01", b"\x22\x00", int("3"))  # made at run time (constants are untracked)
    for obj in (frame, stack, location):
        before = sys.getrefcount(obj)
        assert gc.is_tracked(obj)
        assert _wire.untrack(obj) is obj
        assert not gc.is_tracked(obj)
        assert sys.getrefcount(obj) == before
    # A stack of a frame still tracked, or a tuple holding a container, could close a
    # cycle: it stays in sight, and a cycle through it is still collected.
    assert gc.is_tracked(_wire.untrack((Frame("m.g", "/app/m.py", 1, 2),)))
    box: list[object] = []
    cycle = (box,)
    box.append(cycle)
    assert _wire.untrack(cycle) is cycle
    assert gc.is_tracked(cycle)
    del box, cycle
    assert gc.collect() >= 2
    assert _wire.untrack(7) == 7
    assert _wire.untrack("s") == "s"
