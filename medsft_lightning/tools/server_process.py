"""vLLM's server as a subprocess: started in a process group of its own, waited for until ``/v1/models``
answers, stopped as a whole (its engine core is a child process). Used by ``medsft serve`` and its tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request


class ServerExited(RuntimeError):
    """The server process ended before it answered."""


def start_server(cmd: list[str], env: dict | None = None, stdout=None, stderr=None) -> subprocess.Popen:
    """Start vLLM (``cmd``: ``medsft serve``'s ``vllm_argv``) in a process group of its own, which :func:`stop_server`
    ends as a whole (its engine core is a child process)."""
    env = dict(os.environ if env is None else env)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    return subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)


def relay_output(proc: subprocess.Popen, sink, redact) -> threading.Thread:
    """Copy ``proc``'s output (started with ``stdout=PIPE``) to ``sink`` line by line through ``redact`` (a
    ``str -> str`` that masks secrets), in a daemon thread; join it after the process ended to flush the rest."""
    def copy() -> None:
        for line in iter(proc.stdout.readline, b""):
            sink.write(redact(line.decode("utf-8", errors="replace")))
            sink.flush()

    thread = threading.Thread(target=copy, name="vllm-output", daemon=True)
    thread.start()
    return thread


def wait_ready(url: str, timeout: float, proc: subprocess.Popen | None = None) -> float:
    """Wait until ``url`` (``.../v1/models``) answers; returns the seconds waited.

    Raises:
        ServerExited: ``proc`` exited first.
        TimeoutError: no answer within ``timeout`` seconds.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise ServerExited(f"vLLM exited with code {proc.returncode} before it was ready (its log is above)")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return time.monotonic() - start
        except urllib.error.HTTPError as err:
            if err.code == 401:  # --api-key: it answers
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> int:
    """Stop vLLM: SIGTERM to its API server, which shuts its engine processes down; after ``timeout`` s, or
    for anything of its process group still alive 10 s after it exited, SIGKILL. Returns its exit code."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid, signal.SIGKILL)
        code = proc.wait()
    deadline = time.monotonic() + 10  # its resource tracker may still be unlinking shared memory
    while time.monotonic() < deadline and _kill_group(proc.pid, 0):
        time.sleep(0.2)
    _kill_group(proc.pid, signal.SIGKILL)
    return code


def _kill_group(pgid: int, sig: int) -> bool:
    """``killpg``; whether the group still had a process."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def free_port(host: str) -> int:
    """A port nobody listens on at ``host`` (for ``--port 0``)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
