"""The demo's ASGI app (Starlette): the page, the WebSocket protocol, one generation per device, mp4 downloads.

WebSocket ``/ws`` protocol. Client -> server, JSON text:
    {"type": "start", "prompt": str, "seed": int, "steps": int, "frames": int (latent), "endless": bool}
                                           endless: until "stop" (frames is then ignored)
    {"type": "switch", "prompt": str}      takes effect at the next block boundary
    {"type": "stop"}                       stops after the block being generated (or leaves the queue)
Server -> client, JSON text: ``hello`` (settings), ``queued`` (position), ``busy``, ``started``, ``block`` (one per
block, before its frames: index, first_frame, frames, switched, prompt, gen_fps ...), ``switch_pending``, ``error``
(message), ``done`` (frames, stopped, download URL or null, gen_fps, first_frame_s). Binary: one frame per message,
a 4-byte big-endian frame index followed by the JPEG.

One generation runs at a time (the device's memory holds one KV cache); up to ``max_queue`` further clients wait in
order and are told their position, the next one is told the server is busy. A client that disconnects stops its
generation at the next block boundary and the handler returns only once the stream's caches are freed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import logging
import re
import struct
from pathlib import Path
from typing import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from app.web.session import DemoSettings, Generation, RequestError, StartRequest, VideoStore, check_prompt, check_start
from pipeline.streaming import StreamingPipeline

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("index.html")
MAX_MESSAGE_CHARS = 64 * 1024     # a start message is a few hundred bytes; anything this big is not ours


class Busy(Exception):
    """The device is generating and the queue is full."""


class DeviceSlot:
    """One generation at a time; up to ``max_queue`` owners wait first come, first served."""

    def __init__(self, max_queue: int = 2):
        self.max_queue = max_queue
        self.active: object | None = None
        self.waiting: list[tuple[object, asyncio.Future, Callable[[int], Awaitable]]] = []
        self._notes: set[asyncio.Task] = set()   # position messages in flight (kept so they are not collected)

    async def acquire(self, owner, notify: Callable[[int], Awaitable]) -> None:
        """Wait for the device; ``notify(position)`` is awaited whenever the owner's queue position changes."""
        if self.active is None and not self.waiting:
            self.active = owner
            return
        if len(self.waiting) >= self.max_queue:
            raise Busy
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((owner, future, notify))
        try:
            await notify(len(self.waiting))
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(owner)             # granted just as it was cancelled: pass it on
            self.waiting = [w for w in self.waiting if w[0] is not owner]
            self._announce()
            raise

    def release(self, owner) -> None:
        if self.active is not owner:
            return
        self.active = None
        while self.waiting and self.active is None:
            nxt, future, _ = self.waiting.pop(0)
            if not future.done():
                self.active = nxt
                future.set_result(None)
        self._announce()

    def _announce(self) -> None:
        for position, (_, future, notify) in enumerate(self.waiting, 1):
            if not future.done():
                task = asyncio.ensure_future(notify(position))
                self._notes.add(task)
                task.add_done_callback(self._notes.discard)


class DemoState:
    """What every connection shares."""

    def __init__(self, pipe: StreamingPipeline, settings: DemoSettings, max_queue: int, store: VideoStore,
                 info: dict):
        self.pipe, self.settings, self.store, self.info = pipe, settings, store, info
        self.slot = DeviceSlot(max_queue)
        self.block_sizes = pipe.generator.layout.block_sizes
        self.generations: list[Generation] = []      # every generation started (tests look at the last one)
        self.clients: set[Client] = set()


class Client:
    """One WebSocket connection: reads the client's messages and streams its generation back."""

    def __init__(self, ws: WebSocket, state: DemoState):
        self.ws, self.state = ws, state
        self.job: asyncio.Task | None = None
        self.generation: Generation | None = None
        self.gone = False
        self._send_lock = asyncio.Lock()

    async def send(self, message: dict | bytes) -> None:
        if self.gone:
            return
        try:
            async with self._send_lock:
                if isinstance(message, bytes):
                    await self.ws.send_bytes(message)
                else:
                    await self.ws.send_text(json.dumps(message))
        except Exception:  # closed under us: the receive loop sees the disconnect and cleans up
            self.gone = True
            if self.generation is not None:
                self.generation.stop(keep_video=False)

    async def serve(self) -> None:
        s = self.state
        await self.send(dict(type="hello", settings=s.settings.describe(), info=s.info,
                             busy=s.slot.active is not None, queued=len(s.slot.waiting)))
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await self.handle_raw(message.get("text"))
        except WebSocketDisconnect:
            pass
        finally:
            await self.close()

    async def close(self) -> None:
        """The client is gone: stop its generation, leave the queue, and wait until its memory is freed."""
        self.gone = True
        if self.generation is not None:
            self.generation.stop(keep_video=False)
        if self.job is not None:
            self.job.cancel()
            # asyncio.wait, not gather: if this handler is cancelled too (server shutdown), the job still runs to
            # its end (thread joined, device released) and the handler's own cancellation propagates unchanged
            await asyncio.wait([self.job])

    async def error(self, text: str) -> None:
        await self.send(dict(type="error", message=text))

    async def handle_raw(self, text: str | None) -> None:
        if text is None:
            return await self.error("expected a JSON text message")
        if len(text) > MAX_MESSAGE_CHARS:
            return await self.error(f"message too long ({len(text)} characters)")
        try:
            msg = json.loads(text)
        except ValueError:
            return await self.error("message is not valid JSON")
        except RecursionError:   # deeply nested arrays/objects exhaust the parser's stack: not a message of ours
            return await self.error("message is nested too deeply")
        if not isinstance(msg, dict):
            return await self.error("message must be a JSON object")
        try:
            await self.handle(msg)
        except RequestError as e:
            await self.error(str(e))

    async def handle(self, msg: dict) -> None:
        kind = msg.get("type")
        running = self.job is not None and not self.job.done()
        if kind == "start":
            if running:
                raise RequestError("a video is already being generated on this connection: stop it first")
            request = check_start(msg, self.state.settings, self.state.block_sizes)
            self.job = asyncio.create_task(self.run(request))
            self.job.add_done_callback(_log_failure)
        elif kind == "switch":
            prompt = check_prompt(msg.get("prompt"), self.state.settings)
            if not running or self.generation is None or self.generation.stopped:
                raise RequestError("no video is being generated: nothing to switch")
            self.generation.switch(prompt)
            await self.send(dict(type="switch_pending", prompt=prompt))
        elif kind == "stop":
            if self.generation is not None:
                self.generation.stop()
            elif running:
                self.job.cancel()                       # still queued: leave the queue
        else:
            raise RequestError(f"unknown message type {str(kind)[:40]!r} (expected start, switch or stop)")

    async def _queued(self, position: int) -> None:
        await self.send(dict(type="queued", position=position,
                             message=f"the server is busy with another video: you are number {position} in the queue"))

    async def run(self, request: StartRequest) -> None:
        s = self.state
        try:
            await s.slot.acquire(self, self._queued)
        except Busy:
            return await self.send(dict(type="busy", message="the server is busy with another video and its queue is "
                                                             "full: try again in a minute"))
        except asyncio.CancelledError:
            await self.send(dict(type="done", stopped=True, frames=0, download=None, seconds=0.0, gen_fps=0.0,
                                 first_frame_s=None))
            return
        generation = None
        try:
            generation, queue = self._start_generation(request)
            await self._pump(generation, queue)
        finally:
            if generation is not None:
                generation.stop(keep_video=not self.gone)
                await _wait_for_thread(generation)
            self.generation = None
            s.slot.release(self)

    def _start_generation(self, request: StartRequest) -> tuple[Generation, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(kind, payload):  # called from worker threads
            with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
                loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

        generation = Generation(self.state.pipe, request, self.state.settings, self.state.store, emit)
        self.state.generations.append(generation)
        del self.state.generations[:-8]
        self.generation = generation
        return generation, queue

    async def _pump(self, generation: Generation, queue: asyncio.Queue) -> None:
        req, settings = generation.request, self.state.settings
        frames = None if req.endless else req.frames   # endless: until the client presses Stop
        await self.send(dict(type="started", prompt=req.prompt, seed=req.seed, steps=req.steps, frames=frames,
                             pixel_frames=frames and settings.pixel_frames(frames), fps=settings.fps))
        generation.start()
        while True:
            kind, payload = await queue.get()
            if kind == "end":
                return
            if kind == "frame":
                index, jpeg = payload
                await self.send(struct.pack(">I", index) + jpeg)
            else:
                await self.send(payload)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("client job failed", exc_info=task.exception())


async def _wait_for_thread(generation: Generation) -> None:
    """Wait until the worker thread has ended (its caches are freed then), even through a second cancellation:
    the device must not be handed to the next client while this stream still holds memory."""
    join = asyncio.ensure_future(asyncio.to_thread(generation.join))
    while not join.done():
        try:
            await asyncio.shield(join)
        except asyncio.CancelledError:
            continue


# ---------------------------------------------------------------------------------------------------------------------
# HTTP

def _csp(page: str) -> str:
    """Content-Security-Policy allowing only this page's own inline script and style (by hash), no other source."""
    def hashes(tag):
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in found)
    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; img-src data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_WILDCARD_BINDS = ("", "0.0.0.0", "::")


def _host_name(value: str) -> str:
    """The host of a ``Host`` header or of an address: no port, no IPv6 brackets, no trailing dot, lower case."""
    value = value.strip().lower()
    if value.startswith("["):                     # [::1]:7860
        value = value[1:value.find("]")] if "]" in value else value[1:]
    elif value.count(":") == 1:                   # name:port (a bare IPv6 address has several colons)
        value = value.split(":")[0]
    return value.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class HostCheck:
    """ASGI middleware: answer only requests addressed to the hosts the server binds to (DNS rebinding defence).

    A page on another name whose DNS entry later points at 127.0.0.1 reaches this server with its own name in
    ``Host`` (and in ``Origin``, so the same-origin check alone lets it in). Names are therefore checked against
    ``hosts``. Bound to every interface (``0.0.0.0``), the server also answers any IP address: a browser sends an IP
    literal as ``Host`` only when the page itself was loaded from that address, which no other site can arrange.
    """

    def __init__(self, app, hosts: Iterable[str]):
        self.app = app
        names = {_host_name(h) for h in hosts}
        self.any_ip = bool(names & set(_WILDCARD_BINDS))
        self.hosts = frozenset(names - set(_WILDCARD_BINDS))

    def allowed(self, host_header: str | None) -> bool:
        name = _host_name(host_header or "")
        return name in self.hosts or (self.any_ip and _is_ip(name))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not self.allowed(host):
                log.warning("refused a request for host %r (serving %s)", host[:80], sorted(self.hosts))
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                else:
                    served = ", ".join(sorted(self.hosts)) + (" and any IP address" if self.any_ip else "")
                    text = f"unknown host {_host_name(host)[:80]!r}: this demo answers to {served} (see demo.py --host)"
                    await PlainTextResponse(text, status_code=421)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _same_origin(ws: WebSocket) -> bool:
    """Browsers send Origin; a page from another site must not drive this server (cross-site WebSocket hijacking)."""
    origin = ws.headers.get("origin")
    return origin is None or urlsplit(origin).netloc.lower() == ws.headers.get("host", "").lower()


def build_app(pipe: StreamingPipeline, settings: DemoSettings, max_queue: int = 2, store: VideoStore | None = None,
              info: dict | None = None, hosts: Iterable[str] = LOOPBACK_HOSTS) -> Starlette:
    """The demo app for ``pipe``; ``app.state.demo`` is the shared :class:`DemoState`. ``hosts``: the names and
    addresses it answers to (:class:`HostCheck`; ``demo.py`` adds ``--host``)."""
    state = DemoState(pipe, settings, max_queue, store or VideoStore(), info or {})
    page = PAGE.read_text(encoding="utf-8")
    page_headers = {"Content-Security-Policy": _csp(page), "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

    async def index(request) -> Response:
        return HTMLResponse(page, headers=page_headers)

    async def video(request) -> Response:
        entry = state.store.get(request.path_params["token"])  # a lookup key only, never part of a path
        if entry is None:
            return PlainTextResponse("no such video (the server keeps the newest few)", status_code=404)
        path, name = entry
        return FileResponse(path, media_type="video/mp4", filename=name, headers={"Cache-Control": "no-store"})

    async def socket(ws: WebSocket) -> None:
        if not _same_origin(ws):
            await ws.close(code=1008)
            return
        await ws.accept()
        client = Client(ws, state)
        state.clients.add(client)
        try:
            await client.serve()
        finally:
            state.clients.discard(client)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for client in list(state.clients):
            await client.close()
        state.store.cleanup()

    app = Starlette(routes=[Route("/", index), Route("/video/{token}", video), WebSocketRoute("/ws", socket)],
                    middleware=[Middleware(HostCheck, hosts=tuple(hosts))], lifespan=lifespan)
    app.state.demo = state
    return app
