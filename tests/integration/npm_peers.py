"""Test peers from the npm registry (tests/peers/*): installed with ``npm ci`` on first use.

A test that runs one calls :func:`install_npm_peer` first: it does nothing when the package is there,
runs ``npm ci`` (bounded in time) when it is not, skips the test only when npm cannot reach the
registry, and fails it for any other install error. Test processes running at once (pytest-xdist
workers) take turns under a file lock in ``peer``, so one installs and the others find it there."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path

import pytest

NPM_CI_SECONDS = 240
_OFFLINE_HINTS = (
    "ENOTFOUND",
    "EAI_AGAIN",
    "ECONNREFUSED",
    "ETIMEDOUT",
    "ECONNRESET",
    "network",
    "ENETUNREACH",
    "fetch failed",
)


def install_npm_peer(peer: Path, installed: str, what: str) -> None:
    """``npm ci`` in ``peer`` unless ``peer/node_modules/<installed>/package.json`` exists; ``what``
    names the peer in skip and failure messages."""
    with (peer / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes; held while npm writes
        if not (peer / "node_modules" / installed / "package.json").exists():
            _npm_ci(peer, what)


def _npm_ci(peer: Path, what: str) -> None:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.fail(f"Node 20+ and npm are needed to run {what}")
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=peer,
            capture_output=True,
            text=True,
            timeout=NPM_CI_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm ci did not finish within {NPM_CI_SECONDS} s: is the npm registry reachable?")
    if done.returncode != 0:
        output = done.stdout + done.stderr
        if any(hint in output for hint in _OFFLINE_HINTS):
            pytest.skip(f"npm cannot reach the registry to install {what}: " + output.strip()[-300:])
        pytest.fail(f"npm ci failed in {peer}:\n{output[-2000:]}")
