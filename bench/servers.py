"""The service as deployed, for the benchmarks: `sd serve --redis` (uvicorn) on a free loopback port and
`sd worker` processes, on a real Redis under a fresh key prefix (deleted afterwards), plus a small
stdlib HTTP client (one keep-alive connection per thread). RedisServer: a private `redis-server` (free port,
its own folder; optionally with an append-only file) for the benchmarks that kill it; Service.kill_worker and
start_worker for those that kill workers."""

from __future__ import annotations

import http.client
import json
import os
import re
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


def _tail(p: subprocess.Popen, chars: int = 3000) -> str:
    p.log.seek(0)
    return p.log.read()[-chars:]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.close()


class RedisServer:
    """A private `redis-server` on a free loopback port with a temporary folder of its own (--dir; its log is
    redis.log there). Without persistence by default; aof=True: an append-only file fsynced at every write
    (`--appendonly yes --appendfsync always`), so kill() then start() again (same port, same folder) gives
    back everything it acknowledged. Use as `with RedisServer(aof=True) as r: ... r.url ...`."""

    def __init__(self, *, aof: bool = False):
        self.aof, self.port = aof, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.TemporaryDirectory(prefix="bench-redis-")
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "RedisServer":
        try:
            return self.start()
        except BaseException:
            self.__exit__()
            raise

    def start(self, timeout: float = 120) -> "RedisServer":
        """Start it (again) and wait until it answers PING (after loading its AOF, if any)."""
        import redis

        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      *persistence, "--dir", self.dir.name, "--logfile", "redis.log"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited ({self.proc.returncode}):\n{self.log()[-2000:]}")
                try:
                    if client.ping():
                        return self
                except redis.RedisError:  # not listening yet, or still loading its AOF
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer in {timeout:g} s")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, nothing more written; its AOF holds what it had acknowledged."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def log(self) -> str:
        try:
            return (Path(self.dir.name) / "redis.log").read_text()
        except OSError:
            return ""

    def __exit__(self, *exc) -> None:
        self.kill()
        self.dir.cleanup()


class Client:
    """POST JSON / GET over one HTTP/1.1 keep-alive connection (per thread)."""

    def __init__(self, port: int):
        self.port = port
        self.local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        if not hasattr(self.local, "conn"):
            self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        return self.local.conn

    def request(self, method: str, path: str, body: dict | None = None,
                headers: dict | None = None) -> tuple[int, dict, bytes]:
        data = None if body is None else json.dumps(body).encode()
        headers = {**({"Content-Type": "application/json"} if data else {}), **(headers or {})}
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
        self.procs: list[subprocess.Popen] = []   # the API, then the workers (procs[1 + i] is worker i)
        self.killed: list[subprocess.Popen] = []  # workers killed by kill_worker (their logs are kept)

    def __enter__(self) -> "Service":
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _common(self) -> list:
        return ["--redis", self.redis_url, "--key-prefix", self.prefix]

    def _worker(self) -> subprocess.Popen:
        return _sd("worker", *self._common(), "--weights", self.weights, *self.worker_flags, env=self.env)

    def _start(self) -> "Service":
        self.procs.append(_sd("serve", *self._common(), "--port", self.port, "--queue-limit", 1000, env=self.env))
        for _ in range(self.workers):
            self.procs.append(self._worker())
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

    @property
    def worker_procs(self) -> list[subprocess.Popen]:
        return self.procs[1:]

    def kill_worker(self, i: int) -> float:
        """SIGKILL worker i (it gets no chance to release or finish anything); returns the time.monotonic()
        just before the signal was sent. Its log is kept (self.killed); start_worker(i) replaces it."""
        p = self.procs[1 + i]
        t = time.monotonic()
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        self.killed.append(p)
        return t

    def start_worker(self, i: int, *, timeout: float = 300) -> str:
        """A new `sd worker` in slot i (its process replaces procs[1 + i]); waits until it has loaded the model
        and logged that it is ready; returns its worker (consumer) name."""
        p = self._worker()
        self.procs[1 + i] = p
        deadline = time.monotonic() + timeout
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"sd worker exited:\n{_tail(p)}")
            m = re.search(r"worker (\S+) ready", _tail(p, 100_000))
            if m:
                return m.group(1)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the new worker was not ready in {timeout:g} s:\n{_tail(p)}")
            time.sleep(0.05)

    def log(self, p: subprocess.Popen, chars: int = 3000) -> str:
        """The last `chars` characters of a process's log (the API's, a worker's, or a killed worker's)."""
        return _tail(p, chars)

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):  # workers first, then the API
            _stop(p)
        for p in self.killed:
            p.log.close()
        import redis

        r = redis.Redis.from_url(self.redis_url)
        keys = list(r.scan_iter(match=f"{self.prefix}:*"))
        if keys:
            r.delete(*keys)
        r.close()
