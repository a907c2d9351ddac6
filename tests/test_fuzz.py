"""
The whole HTTP API fuzzed from its own /openapi.json with schemathesis (bench/fuzz.py's `fuzz`): a real
uvicorn server on loopback, the in-memory queue and in-process worker with the tiny random model, small
limits so that requests that fit the schema run in milliseconds. Every operation gets requests that fit
its schema and requests that break it (wrong types, out-of-range numbers, missing fields, random bytes
as images), with a fixed seed so CI sees the same requests each run. No answer may be a 5xx, and every
answer must be one the schema documents (status, content type, body). `bench/fuzz.py` is the long run.
"""

import sys
from pathlib import Path

import httpx
import pytest

from service.api import create_app
from service.settings import Settings
from test_service_http import Server, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.fuzz import LIMITS, fuzz  # noqa: E402

EXAMPLES = 8  # per operation and mode: ~20 operations x 2 modes x 8 = ~330 requests


@pytest.fixture(scope="module")
def url(tiny_weights, tiny_pipe):
    settings = Settings(weights=str(tiny_weights), batch_window=0.0, **LIMITS)
    with Server(create_app(settings, pipe=tiny_pipe)) as server, httpx.Client(base_url=server.url) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, what="the in-process worker")
        yield server.url


def test_fuzzed_api_answers_no_5xx_and_only_documented_answers(url):
    report = fuzz(url, EXAMPLES, seed=0)
    print(report.summary())
    assert not report.failures, "\n".join(report.failures)
    assert report.requests >= 150 and sum(n for s, n in report.statuses.items() if s < 300) >= 20  # jobs really ran
    assert httpx.get(url + "/readyz").json()["status"] == "ready"
