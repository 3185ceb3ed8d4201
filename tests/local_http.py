"""A threaded HTTP server on 127.0.0.1 with a free port, run for the length of a `with` block: the
base of the backends' stand-in servers (each adds its handler and what it records).

Fault injection, for any handler that starts with `if self.server.canned(self): return`:
- `inject(path, *replies)`: the next requests to `path` get these canned replies, one each (a status
  with Retry-After, 401/403, a malformed or huge body, HTML, a body with no Content-Length);
- `delay_s`: latency before every canned or normal answer (handlers honour it);
- `down()` / `up()` / `outage(seconds)`: stop listening (connections are refused, as when a server
  restarts) and listen again on the same port.

`scheduled(backend, requests, config)` runs requests through a Scheduler over an entered backend;
`tiny_tokenizer_dir(path)` writes a three-word tokenizer with a chat template for the clients.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from engine.scheduler import SchedulerConfig


@dataclass
class Canned:
    status: int = 200
    body: object = b""  # bytes go out as they are; anything else as JSON
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    content_length: bool = True  # False: no Content-Length, the body ends when the connection closes

    def raw(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()

    def send(self, handler: BaseHTTPRequestHandler) -> None:
        raw = self.raw()
        handler.send_response(self.status)
        handler.send_header("Content-Type", self.content_type)
        if self.content_length:
            handler.send_header("Content-Length", str(len(raw)))
        for k, v in self.headers.items():
            handler.send_header(k, v)
        handler.end_headers()
        try:
            handler.wfile.write(raw)
        except OSError:  # the client refused a huge body and hung up: that is the point
            pass


class LocalHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen backlog: the default 5 refuses bursts of connections

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.delay_s = 0.0
        self._canned: dict[str, deque[Canned]] = defaultdict(deque)
        self._lock = threading.Lock()
        self.is_up = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.is_up:
            self.shutdown()
        self.server_close()

    def handle_error(self, request, client_address) -> None:  # a client hanging up is expected here
        pass

    def inject(self, path: str, *replies: Canned) -> None:
        with self._lock:
            self._canned[path].extend(replies)

    def canned(self, handler: BaseHTTPRequestHandler) -> bool:
        """Answer with the next canned reply for this path, if any (after `delay_s`)."""
        with self._lock:
            queue = self._canned.get(handler.path)
            reply = queue.popleft() if queue else None
        if reply is None:
            return False
        if handler.command == "POST" and handler.headers.get("Content-Length"):
            handler.rfile.read(int(handler.headers["Content-Length"]))
        if self.delay_s:
            time.sleep(self.delay_s)
        reply.send(handler)
        return True

    def down(self) -> None:
        """Stop listening: new connections are refused until up()."""
        self.shutdown()
        self.socket.close()
        self.is_up = False

    def up(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.socket.listen(self.request_queue_size)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()
        self.is_up = True

    def outage(self, seconds: float) -> threading.Timer:
        """Refuse connections for `seconds` (a server restart), then listen again."""
        self.down()
        timer = threading.Timer(seconds, self.up)
        timer.daemon = True
        timer.start()
        return timer


# The scheduler settings of the stand-in server tests: millisecond backoffs and probes.
QUICK = SchedulerConfig(
    max_inflight=8,
    max_retries=2,
    timeout_s=5,
    backoff_base_s=0.01,
    backoff_max_s=0.05,
    probe_max_s=0.2,
    engine_down_s=20,
)


async def scheduled(backend, requests, config, srv=None, during=None):
    """`requests` through a Scheduler over the entered `backend`: (results, scheduler metrics).
    `during(srv)` runs in a thread once they are going."""
    from engine.scheduler import Scheduler

    sched = Scheduler(backend, None, config)
    tasks = [asyncio.create_task(sched.submit(r)) for r in requests]
    if during is not None:
        await asyncio.sleep(0.05)
        await asyncio.to_thread(during, srv)
    try:
        return await asyncio.gather(*tasks), sched.metrics
    finally:
        for t in tasks:
            t.cancel()
        await sched.__aexit__(None, None, None)


def tiny_tokenizer_dir(path: Path) -> Path:
    """A Hugging Face tokenizer folder at `path`: words "hi" (1) and "there" (2), and a chat template
    that joins the messages' contents."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "hi": 1, "there": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)
    return path
