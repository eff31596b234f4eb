"""CPU and goroutine samples carry the labels of the code (issue 11): ``-tagfocus`` splits them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from asgi_pprof import builder
from asgi_pprof.labelling import labels

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


async def labelled_sleeper(ready: asyncio.Event) -> None:
    ready.set()
    await asyncio.sleep(30)


def labelled_parked_thread(ready: threading.Event, stop: threading.Event) -> None:
    with labels(job="reindex"):
        ready.set()
        stop.wait()


@pytest.mark.anyio
async def test_goroutine_samples_carry_task_and_thread_labels(client: httpx.AsyncClient) -> None:
    ready, t_ready, stop = asyncio.Event(), threading.Event(), threading.Event()
    with labels(job="nightly", tenant="acme"):
        task = asyncio.create_task(labelled_sleeper(ready))
    t = threading.Thread(target=labelled_parked_thread, args=(t_ready, stop), name="parked")
    t.start()
    try:
        await ready.wait()
        t_ready.wait(5)
        r = await client.get("/debug/pprof/goroutine")
        data = builder.decode(r.content)
    finally:
        task.cancel()
        stop.set()
        t.join()
    by_fn = {fr.function.rsplit(".", 1)[-1]: dict(s.labels) for s in data.samples for fr in s.stack}
    assert by_fn["labelled_sleeper"]["job"] == "nightly"
    assert by_fn["labelled_sleeper"]["tenant"] == "acme"
    assert by_fn["labelled_parked_thread"]["job"] == "reindex"
    unlabelled = [s for s in data.samples if "job" not in dict(s.labels)]
    assert unlabelled, "labels leaked onto every goroutine"
