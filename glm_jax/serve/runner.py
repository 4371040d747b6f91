"""The engine on its own thread, for asyncio callers (the HTTP server).

The engine is not thread-safe and a step blocks for as long as the device runs, so one thread owns it: callers
hand new requests and aborts over a queue (`submit`, `abort`), the thread adds them between steps, steps while
anything is unfinished and posts each `RequestOutput` to the caller's asyncio queue. A step that raises fails
the requests it was running (their queues get the exception) and the loop goes on: the server stays up.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid

from glm_jax.serve.engine import Engine, QueueFull
from glm_jax.serve.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineRunner:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="glm_jax-engine", daemon=True)
        self.submitted_at: dict[str, float] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=60)

    # ------------------------------------------------------------------ callers (event loop)
    def submit(self, prompt: list[int], sampling: SamplingParams) -> tuple[str, asyncio.Queue]:
        """Queues a request checked with `Engine.check_request` (ValueError, QueueFull); returns its id and the
        queue its outputs arrive on (a final `RequestOutput` with finished=True, or an exception)."""
        self.engine.check_request(prompt, sampling)
        if len(self.engine.waiting) + self._inbox.qsize() >= self.engine.max_waiting:  # (not stats(): it counts pages)
            raise QueueFull(f"{self.engine.max_waiting} requests are already waiting")
        rid = f"req-{uuid.uuid4().hex}"
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), outputs)
        self.submitted_at[rid] = time.monotonic()
        self._inbox.put(("add", rid, prompt, sampling))
        return rid, outputs

    def abort(self, rid: str) -> None:
        if self._streams.pop(rid, None) is not None:
            self._inbox.put(("abort", rid))
        self.submitted_at.pop(rid, None)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_unfinished())
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step must not take the server down
                log.exception("engine step failed; failing its requests")
                for req in list(self.engine.running) + list(self.engine.waiting):
                    self.engine.abort(req.id)
                    self._post(req.id, e, last=True)
                continue
            for out in outputs:
                self._post(out.request_id, out, last=out.finished)

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            if item[0] == "add":
                _, rid, prompt, sampling = item
                if rid in self._streams:  # not aborted while queued
                    try:
                        self.engine.add_request(prompt, sampling, request_id=rid)
                    except (ValueError, QueueFull) as e:
                        self._post(rid, e, last=True)
            else:
                self.engine.abort(item[1])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                item = None

    def _post(self, rid: str, item, last: bool) -> None:
        target = self._streams.pop(rid, None) if last else self._streams.get(rid)
        if target is not None:
            loop, outputs = target
            loop.call_soon_threadsafe(outputs.put_nowait, item)
