"""The public surface and option checking."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette

import asgi_pprof
from asgi_pprof import create_app


def test_public_surface_does_not_change_by_accident() -> None:
    assert asgi_pprof.__all__ == sorted(asgi_pprof.__all__)
    assert asgi_pprof.__all__ == [
        "LabelMiddleware",
        "PprofServer",
        "__version__",
        "create_app",
        "handler",
        "labels",
        "pprof_app",
        "set_block_profile_rate",
        "set_loopstall_threshold",
        "set_memory_profile_rate",
        "set_mutex_profile_fraction",
        "start_server",
        "start_tracing",
        "stop_tracing",
        "track_task_creation",
        "watch_event_loop",
    ]
    assert isinstance(asgi_pprof.pprof_app, Starlette)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sample_hz": 0}, "sample_hz must be between 1 and 1000"),
        ({"sample_hz": 5000}, "sample_hz must be between 1 and 1000"),
        ({"sample_hz": 1.5}, "sample_hz must be an int"),
        ({"sample_hz": True}, "sample_hz must be an int"),
        ({"max_seconds": 0}, "max_seconds must be between"),
        ({"switch_interval": 0.0}, "switch_interval must be between"),
        ({"switch_interval": float("nan")}, "switch_interval must be between"),
        ({"switch_interval": "fast"}, "switch_interval must be a number"),
        ({"track_task_creation": 1}, "track_task_creation must be True or False"),
        ({"tracemalloc_frames": -1}, "tracemalloc_frames must be between"),
        ({"trace_max_events": 10}, "trace_max_events must be between"),
        ({"profiles": [object()]}, "profiles must be NamedProfile instances"),
        ({"sample_rate": 100}, "unknown option 'sample_rate'"),
    ],
)
def test_invalid_options_raise_value_error_with_a_sentence(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        create_app(**options)


def test_valid_options_are_kept() -> None:
    app = create_app(sample_hz=250, max_seconds=30, switch_interval=None)
    opts = app.state.pprof_options
    assert (opts.sample_hz, opts.max_seconds, opts.switch_interval) == (250, 30, None)


def test_every_public_name_resolves() -> None:
    for name in asgi_pprof.__all__:
        assert getattr(asgi_pprof, name) is not None, name


def test_import_loads_and_installs_nothing() -> None:
    # Issue 8, item 11: `import asgi_pprof` took ~180 ms and installed process-wide hooks.
    import subprocess
    import sys

    code = (
        "import gc, sys, threading, time\n"
        "start, cbs = threading.Thread.start, list(gc.callbacks)\n"
        "t = time.perf_counter()\n"
        "import asgi_pprof\n"
        "took = time.perf_counter() - t\n"
        "ours = ('starlette', 'uvicorn', 'asgi_pprof.')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(ours))\n"
        "assert threading.Thread.start is start and gc.callbacks == cbs, 'a hook at import'\n"
        "assert not loaded, loaded\n"
        "print(took)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 0.05  # measured ~5 ms; 180 ms before
