"""CPU samples carry the labels of the code that ran (issue 11): ``-tagfocus`` splits routes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asgi_pprof import builder

from .test_sampler_safety import _Service


@pytest.fixture
def labelled() -> Iterator[_Service]:
    svc = _Service("asyncio", app="tests.labelsapp:app")
    yield svc
    svc.stop()


@pytest.mark.go
def test_tagfocus_on_http_route_splits_async_and_sync_routes(
    labelled: _Service, go_tool: Any, tmp_path: Path
) -> None:
    stop = threading.Event()

    def load(path: str) -> None:
        while not stop.is_set():
            labelled.get(path, timeout=10)

    loaders = [
        threading.Thread(target=load, args=(p,)) for p in ("/items/7", "/items/8", "/reports")
    ]
    for t in loaders:
        t.start()
    try:
        time.sleep(0.3)
        body = labelled.get_body("/debug/pprof/profile?seconds=3")
    finally:
        stop.set()
        for t in loaders:
            t.join()
    path = str(tmp_path / "cpu.pb.gz")
    Path(path).write_bytes(body)
    data = builder.decode(body)
    routes = {dict(s.labels).get("http.route") for s in data.samples}
    assert {"/items/{item_id}", "/reports"} <= routes, routes
    items = go_tool("-top", "-tagfocus=http.route=/items/{item_id}", path)
    reports = go_tool("-top", "-tagfocus=http.route=/reports", path)
    assert "burn_for_items" in items
    assert "burn_for_reports" not in items
    assert "burn_for_reports" in reports
    assert "burn_for_items" not in reports
