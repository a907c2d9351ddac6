"""The service as deployed, for the benchmarks: `sd serve --redis` (uvicorn) on a free loopback port and
`sd worker` processes, on a real Redis under a fresh key prefix (deleted afterwards), plus a small
stdlib HTTP client (one keep-alive connection per thread)."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REDIS = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sd(*args, env=None) -> subprocess.Popen:
    """`sd ARGS` in its own process; its log goes to a temporary file (p.log)."""
    log = tempfile.TemporaryFile("w+")
    p = subprocess.Popen([sys.executable, "-m", "service.cli", *map(str, args)], cwd=ROOT,
                         stdout=log, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "SD_DEVICE": "cpu", **(env or {})})
    p.log = log
    return p


def _tail(p: subprocess.Popen) -> str:
    p.log.seek(0)
    return p.log.read()[-3000:]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.close()


class Client:
    """POST JSON / GET over one HTTP/1.1 keep-alive connection (per thread)."""

    def __init__(self, port: int):
        self.port = port
        self.local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        if not hasattr(self.local, "conn"):
            self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        return self.local.conn

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict, bytes]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data else {}
        for attempt in (1, 2):
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=headers)
                r = conn.getresponse()
                return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # the server closed a connection idle past its keep-alive timeout: once more on a new one
                conn.close()
                del self.local.conn
                if attempt == 2:
                    raise

    def txt2img(self, body: dict) -> tuple[dict, bytes]:
        status, headers, data = self.request("POST", "/txt2img", body)
        if status != 200:
            raise RuntimeError(f"/txt2img answered {status}: {data[:300]!r}")
        return headers, data

    def get_json(self, path: str) -> dict:
        status, _, data = self.request("GET", path)
        return json.loads(data)

    def metrics(self) -> dict[str, float]:
        _, _, data = self.request("GET", "/metrics")
        lines = [line.rsplit(" ", 1) for line in data.decode().splitlines() if line and not line.startswith("#")]
        return {k: float(v) for k, v in lines}


class Service:
    """API + `workers` worker processes; use as `with Service(...) as s: s.client.txt2img(...)`."""

    def __init__(self, weights: str, *, redis_url: str = REDIS, workers: int = 1, max_batch: int | None = None,
                 batch_window: float | None = None, threads: int | None = None):
        self.weights, self.redis_url, self.workers = weights, redis_url, workers
        self.worker_flags = [*(["--max-batch", max_batch] if max_batch is not None else []),
                             *(["--batch-window", batch_window] if batch_window is not None else [])]
        self.env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        self.prefix = f"bench-{secrets.token_hex(4)}"
        self.port = free_port()
        self.client = Client(self.port)
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Service":
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self) -> "Service":
        common = ["--redis", self.redis_url, "--key-prefix", self.prefix]
        self.procs.append(_sd("serve", *common, "--port", self.port, "--queue-limit", 1000, env=self.env))
        for _ in range(self.workers):
            self.procs.append(_sd("worker", *common, "--weights", self.weights, *self.worker_flags, env=self.env))
        deadline = time.monotonic() + 300
        while True:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"sd {p.args[3]} exited:\n{_tail(p)}")
            try:
                status, _, data = self.client.request("GET", "/readyz")
                if status == 200 and json.loads(data)["workers"] == self.workers:
                    return self
            except OSError:
                self.client = Client(self.port)  # not listening yet: a fresh connection next time
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not get ready in 300 s")
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):  # workers first, then the API
            _stop(p)
        import redis

        r = redis.Redis.from_url(self.redis_url)
        keys = list(r.scan_iter(match=f"{self.prefix}:*"))
        if keys:
            r.delete(*keys)
        r.close()
