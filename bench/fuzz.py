"""Fuzz the whole HTTP API from its own /openapi.json with schemathesis: every operation gets requests
that fit its schema (positive) and requests that break it (negative: wrong types, out-of-range numbers,
missing fields, random bytes for images). A failure is any 5xx, or an answer that does not match the
documented responses (status, content type, body schema).

    .venv/bin/python bench/fuzz.py                       # `sd serve` with the default model, 200 examples
    .venv/bin/python bench/fuzz.py --examples 1000 --seed 1
    .venv/bin/python bench/fuzz.py --url http://127.0.0.1:8000   # a server already running

It prints the requests sent, the answers by status, and each failure with a curl command that repeats it.
tests/test_fuzz.py runs the same `fuzz` on a tiny model with a few examples per operation, in CI.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Limits of the fuzzed server: small, so requests that fit the schema finish in milliseconds on a CPU.
LIMITS = {"max_steps": 3, "max_images": 2, "max_pixels": 32 * 32, "job_timeout": 120, "queue_limit": 10_000}


@dataclass
class Report:
    requests: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)   # one line per distinct (operation, failure kind)
    operations: dict = field(default_factory=dict)      # "METHOD /path [mode]" -> (requests, seconds)
    seconds: float = 0.0
    waited: float = 0.0                                  # of which waiting for answers (the rest: generating)
    slowest: list = field(default_factory=list)         # (seconds, status, curl command) of the 5 slowest

    def summary(self) -> str:
        codes = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return (f"{self.requests} requests in {self.seconds:.0f} s, {self.waited:.0f} s of it waiting for answers "
                f"({codes}); {len(self.failures)} failures")


def fuzz(base_url: str, examples: int, seed: int | None = 0, headers: dict | None = None,
         max_failures: int = 50) -> Report:
    """`examples` positive and as many negative requests per operation; failures are collected, not raised."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase
    from schemathesis import GenerationMode
    from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                     status_code_conformance)

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    report, seen, start = Report(), set(), time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            def send(case):
                sent = time.monotonic()
                response = case.call(base_url=base_url, headers=headers, timeout=180)
                took = time.monotonic() - sent
                report.waited += took
                report.slowest = sorted(report.slowest + [(took, response.status_code,
                                                           case.as_curl_command(headers=headers))])[-5:]
                report.requests += 1
                report.statuses[response.status_code] += 1
                try:
                    case.validate_response(response, checks=checks, headers=headers)
                except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001  (a FailureGroup, an AssertionError)
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    key = (operation.label, response.status_code, first)
                    if key not in seen and len(report.failures) < max_failures:
                        seen.add(key)
                        report.failures.append(f"{operation.label} [{mode.value}] -> {response.status_code}: "
                                               f"{first}\n    {case.as_curl_command(headers=headers)}\n"
                                               f"    answer: {response.text[:300]!r}")

            run = hypothesis.given(operation.as_strategy(generation_mode=mode))(send)
            run = hypothesis.settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
                                      phases=[Phase.explicit, Phase.generate],
                                      suppress_health_check=list(HealthCheck))(run)
            if seed is not None:
                run = hypothesis.seed(seed)(run)
            sent, began = report.requests, time.monotonic()
            try:
                run()
            except hypothesis.errors.Unsatisfiable:  # nothing to break (no parameters, no body): no negative cases
                pass
            report.operations[f"{operation.label} [{mode.value}]"] = (report.requests - sent,
                                                                      time.monotonic() - began)
    report.seconds = time.monotonic() - start
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="fuzz a server already running here (default: start `sd serve`)")
    p.add_argument("--weights", help="weights of the started server (default: weights/)")
    p.add_argument("--examples", type=int, default=200, help="examples per operation and mode (default 200)")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: a random one)")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else int(time.time())
    if args.url:
        report = fuzz(args.url.rstrip("/"), args.examples, seed)
    else:
        from bench.servers import _sd, free_port
        import httpx

        port = free_port()
        limits = {**LIMITS, "max_pixels": 64 * 64}  # the default model's native 64x64 fits
        flags = [x for k, v in limits.items() for x in ("--" + k.replace("_", "-"), v)]
        server = _sd("serve", "--port", port, *(["--weights", args.weights] if args.weights else []), *flags,
                     env={"OMP_NUM_THREADS": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None and time.monotonic() < deadline, "sd serve did not become ready"
                try:
                    if httpx.get(url + "/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            report = fuzz(url, args.examples, seed)
            alive = httpx.get(url + "/readyz").status_code == 200
        finally:
            server.terminate()
            server.wait(60)
        print(f"server still ready after the run: {alive}")
    print(f"seed {seed}, {args.examples} examples per operation and mode")
    print(report.summary())
    for failure in report.failures:
        print(failure)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
