"""Run a script as several JAX processes on this machine, for the many-process tests.

``launch(script, processes=2, devices=4)`` starts ``processes`` Python
processes of ``script``, each with ``devices`` fake CPU devices, coordinated by
``jax.distributed`` on a free port of 127.0.0.1; the script calls
``initialize()`` (below) first, which joins them with gloo collectives.
Everything is bounded: the coordinator's wait, and the whole run (a process
that fails stops the others at once). Every process started is killed by its
pid when the run ends, however it ends: none is left running.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the repository: toylib and tests/ importable
# How a launched process learns its place (read by `initialize`).
COORDINATOR, PROCESS_ID, PROCESS_COUNT = (
    "TOYLIB_TEST_COORDINATOR",
    "TOYLIB_TEST_PROCESS_ID",
    "TOYLIB_TEST_PROCESS_COUNT",
)
JOIN_TIMEOUT = 60  # seconds for the processes to find each other


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(
    script: Path, *args: str, processes: int = 2, devices: int = 4, timeout: float = 120
) -> list[str]:
    """Run ``script`` as ``processes`` JAX processes; each one's stdout, in process order.

    Raises AssertionError (with every process's output) if one exits with an
    error or the run outlasts ``timeout`` seconds.
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as logs:
        started: list[tuple[subprocess.Popen, Path, Path]] = []
        try:
            for i in range(processes):
                env = {
                    **os.environ,
                    "JAX_PLATFORMS": "cpu",
                    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
                    COORDINATOR: f"127.0.0.1:{port}",
                    PROCESS_ID: str(i),
                    PROCESS_COUNT: str(processes),
                }
                # Output to files, not pipes: a process never blocks on a full pipe.
                out, err = Path(logs, f"{i}.out"), Path(logs, f"{i}.err")
                with open(out, "w") as stdout, open(err, "w") as stderr:
                    command = [sys.executable, str(script), *args]
                    process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr)
                started.append((process, out, err))
            failed = _wait([p for p, _, _ in started], timeout)
        finally:
            for process, _, _ in started:
                if process.poll() is None:
                    process.kill()  # this pid only: SIGKILL
                process.wait()
        outputs = [(out.read_text(), err.read_text()) for _, out, err in started]
    if failed:
        report = "\n".join(
            f"--- process {i} (pid {p.pid}, exit {p.returncode}) stdout:\n{o}\n"
            f"--- stderr:\n{e[-6000:]}"
            for i, ((p, _, _), (o, e)) in enumerate(zip(started, outputs, strict=True))
        )
        raise AssertionError(f"{script.name}: {failed}\n{report}")
    return [o for o, _ in outputs]


def _wait(processes: list[subprocess.Popen], timeout: float) -> str:
    """Wait for all to exit; "" if all exited 0, else what went wrong (then the rest are killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in processes]
        bad = [i for i, code in enumerate(codes) if code not in (None, 0)]
        if bad:  # the others would wait for it in a collective until their timeouts
            return f"process {bad[0]} exited with {codes[bad[0]]}"
        if all(code == 0 for code in codes):
            return ""
        time.sleep(0.05)
    return f"timed out after {timeout:g} s"


def initialize() -> None:
    """In a launched script: join the others (gloo collectives across processes on CPU)."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        os.environ[COORDINATOR],
        num_processes=int(os.environ[PROCESS_COUNT]),
        process_id=int(os.environ[PROCESS_ID]),
        initialization_timeout=JOIN_TIMEOUT,
        # The coordinator (in process 0) listens on loopback only, not on JAX's
        # default of every interface; a lost peer is noticed in seconds, not minutes.
        coordinator_bind_address=os.environ[COORDINATOR],
        heartbeat_timeout_seconds=JOIN_TIMEOUT,
        shutdown_timeout_seconds=JOIN_TIMEOUT,
    )


def records(stdout: str) -> dict[str, Any]:
    """The JSON objects a launched script printed, one per line, merged."""
    merged: dict[str, Any] = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            merged.update(json.loads(line))
    return merged
