"""A production service: the app's port faces the world and has no pprof; the debug
port listens on loopback only, in the same process.

Run: uvicorn production:app --host 0.0.0.0 --port 8000
Then, on the host: go tool pprof -top 'http://127.0.0.1:6060/debug/pprof/profile?seconds=5'
"""

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from asgi_pprof import start_server


@asynccontextmanager
async def lifespan(app: FastAPI):
    debug = start_server(host="127.0.0.1", port=6060)  # one per process: see "Several workers"
    yield
    debug.stop()


app = FastAPI(lifespan=lifespan)


def production_checkout_total() -> int:
    n, end = 0, time.process_time() + 0.05
    while time.process_time() < end:
        n += sum(range(200))
    return n


@app.get("/checkout")
def checkout() -> dict[str, int]:
    return {"total": production_checkout_total()}
