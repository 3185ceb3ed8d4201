"""A cheap stand-in SGLang / OpenAI server (no model: canned answers) for load tests and the outage
test: `python -m bench.http_server [--port P] [--delay S]` prints `PORT <n>` once it listens.

It is a bare asyncio protocol on uvloop, not a web framework, so that at thousands of requests per
second the server costs little next to the client being measured (it runs in its own process).
It speaks just enough HTTP/1.1 for a keep-alive client: Content-Length bodies, no chunking.
Answers follow the request's regex, so a full `sysgen run --engine sglang_http` can run on it:
a P3-like regex (verdict lines) gets verdicts, a P1-like one (tag lines) gets tagged phrases,
anything else a plain answer.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys

import orjson

# In the JSON body the regex's newlines are the two characters \n: a tag name follows `"` or those.
_VERDICT_TAG = re.compile(rb'(?:"|\\n)(\w+): \(\?:Good\|Bad\|None\)')
_P1 = (
    "<Role>You are a careful assistant (profile {n}).</Role>\n<Content>Cover the question accurately."
    "</Content>\n<Task>Answer the request completely.</Task>\n"
)
_ANSWER = "Here is a careful answer that follows the system message. " * 4
SERVER_INFO = {
    "max_running_requests": 64,
    "dp_size": 1,
    "grammar_backend": "xgrammar",
    "context_length": 65536,
}
MODEL_INFO = {"model_path": "/models/standin-http", "is_generation": True}


def _response(status: int, body: bytes) -> bytes:
    reason = {200: b"OK", 401: b"Unauthorized", 404: b"Not Found"}.get(status, b"Error")
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % (status, reason, len(body))
    ) + body


_CANNED_GENERATE = orjson.dumps(
    {
        "text": "ok",
        "meta_info": {
            "finish_reason": {"type": "stop"},
            "prompt_tokens": 3,
            "completion_tokens": 1,
            "cached_tokens": 0,
        },
    }
)


def generate_answer(body: bytes, counter: int) -> bytes:
    """The /generate answer for a request body: shaped by its regex (see the module docstring)."""
    if b'"regex"' not in body:
        if b'"max_new_tokens":1,' in body or b'"max_new_tokens":1}' in body:
            return _CANNED_GENERATE  # the load benchmark's requests: no parsing, no work
        text = _ANSWER
    else:
        tags = _VERDICT_TAG.findall(body)
        text = "".join(f"{t.decode()}: Good\n" for t in tags) if tags else _P1.format(n=counter)
    return orjson.dumps(
        {
            "text": text,
            "meta_info": {
                "finish_reason": {"type": "stop"},
                "prompt_tokens": 10,
                "completion_tokens": len(text) // 4,
                "cached_tokens": 0,
            },
        }
    )


def chat_answer() -> bytes:
    return orjson.dumps(
        {
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        }
    )


class _Conn(asyncio.Protocol):
    def __init__(self, server: StandInServer) -> None:
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            i = head.lower().find(b"content-length:")
            eol = head.find(b"\r\n", i)
            n = int(head[i + 15 : eol if eol > 0 else None]) if i >= 0 else 0
            if len(self.buf) < end + 4 + n:
                return
            body, self.buf = self.buf[end + 4 : end + 4 + n], self.buf[end + 4 + n :]
            if self.server.auth is not None and self.server.auth not in head.lower():
                self._write(_response(401, b'{"detail":"Unauthorized"}'))
                continue
            self.answer(head[: head.find(b"\r\n")], body)

    def answer(self, line: bytes, body: bytes) -> None:
        srv = self.server
        srv.count += 1
        method, path = line.split(b" ")[:2]
        if path in (b"/server_info", b"/get_server_info"):
            out = _response(200, orjson.dumps(srv.server_info))
        elif path in (b"/model_info", b"/get_model_info"):
            out = _response(200, orjson.dumps(MODEL_INFO))
        elif path == b"/generate":
            out = _response(200, generate_answer(body, srv.count))
        elif path == b"/v1/chat/completions":
            out = _response(200, chat_answer())
        else:
            out = _response(404, b'{"detail":"Not Found"}')
        if srv.delay_s and method == b"POST":
            asyncio.get_running_loop().call_later(srv.delay_s, self._write, out)
        else:
            self._write(out)

    def _write(self, out: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def connection_lost(self, exc) -> None:
        self.transport = None


class StandInServer:
    def __init__(self, delay_s: float = 0.0, max_running: int = 64, api_key: str | None = None) -> None:
        self.delay_s = delay_s
        # As `sglang.launch_server --api-key`: every request must carry "Authorization: Bearer KEY".
        self.auth = f"authorization: bearer {api_key}".lower().encode() if api_key else None
        self.count = 0
        self.server_info = {**SERVER_INFO, "max_running_requests": max_running}

    async def serve(self, port: int = 0, host: str = "127.0.0.1") -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Conn(self), host, port, backlog=4096, reuse_address=True)
        print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
        async with server:
            await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.http_server", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=0, help="0 = any free port (printed)")
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each POST is answered")
    p.add_argument("--max-running", type=int, default=64, help="what /server_info reports")
    p.add_argument("--api-key", help="answer 401 to requests without this bearer key")
    a = p.parse_args(argv)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        runner(StandInServer(a.delay, a.max_running, a.api_key).serve(a.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
