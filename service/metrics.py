"""Prometheus text format, by hand (a few counters and histograms need no client library).

Workers and the API run in different processes, so what workers measure (batch sizes,
step time, job latency, jobs finished) is kept by the queue as a flat table of sample
name -> value that only ever grows: `observe` and `count` return the increments a
measurement makes, the queue adds them up (a Redis hash in production), and `render`
writes the table out. What the API itself counts (requests) stays in its own process.
"""

from __future__ import annotations

HISTOGRAMS = {  # name: (help, bucket upper bounds)
    "sd_batch_size": ("Images per pipeline call.", (1, 2, 4, 8, 16, 32, 64)),
    "sd_step_seconds": ("Seconds per denoising step of a batch.",
                        (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)),
    "sd_job_seconds": ("Seconds from a job's submission to its result.",
                       (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)),
}
COUNTERS = {
    "sd_jobs_total": "Jobs that reached an end state, by status.",
    "sd_jobs_reclaimed_total": "Job runs taken over from a dead worker, or run again after their worker lost "
                               "the queue.",
    "sd_results_dropped_total": "Results a worker did not store because another worker had taken its job over.",
}


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def observe(name: str, value: float) -> dict[str, float]:
    """The increments one histogram observation makes: every bucket >= value, count and sum."""
    _, bounds = HISTOGRAMS[name]
    out = {f'{name}_bucket{{le="{_le(b)}"}}': 1.0 for b in (*bounds, float("inf")) if value <= b}
    out[f"{name}_count"] = 1.0
    out[f"{name}_sum"] = float(value)
    return out


def count(name: str, **labels: str) -> dict[str, float]:
    assert name in COUNTERS, name
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {f"{name}{{{inner}}}" if inner else name: 1.0}


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def render(stats: dict[str, float], requests: dict[tuple[str, str, int], int], queue_depth: int,
           workers: int, models: dict[str, dict] | None = None) -> str:
    """The /metrics page: request counts, queue gauges, then the workers' histograms and counters."""
    lines = ["# HELP sd_http_requests_total HTTP requests answered, by method, route and status.",
             "# TYPE sd_http_requests_total counter"]
    for (method, path, status), n in sorted(requests.items()):
        lines.append(f'sd_http_requests_total{{method="{method}",path="{path}",status="{status}"}} {n}')
    lines += ["# HELP sd_queue_depth Jobs queued or running.", "# TYPE sd_queue_depth gauge",
              f"sd_queue_depth {queue_depth}",
              "# HELP sd_workers Workers that reported in recently.", "# TYPE sd_workers gauge",
              f"sd_workers {workers}"]
    if models:
        lines += ["# HELP sd_model_workers Live workers taking a model's jobs, and those holding it loaded.",
                  "# TYPE sd_model_workers gauge"]
        for name, counts in sorted(models.items()):
            label = name.replace("\\", "\\\\").replace('"', '\\"')
            lines += [f'sd_model_workers{{model="{label}",state="{state}"}} {counts[state]}'
                      for state in ("workers", "loaded")]
    for name, (help_, bounds) in HISTOGRAMS.items():
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        for b in (*bounds, float("inf")):  # buckets in order, zeros included, as Prometheus expects
            key = f'{name}_bucket{{le="{_le(b)}"}}'
            lines.append(f"{key} {_num(stats.get(key, 0.0))}")
        lines += [f"{name}_sum {_num(stats.get(f'{name}_sum', 0.0))}",
                  f"{name}_count {_num(stats.get(f'{name}_count', 0.0))}"]
    for name, help_ in COUNTERS.items():
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
        lines += [f"{k} {_num(v)}" for k, v in sorted(stats.items()) if k.startswith(name)]
    return "\n".join(lines) + "\n"
