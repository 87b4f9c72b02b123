"""Server processes for benchmarks/serve.py: free ports, readiness, CPU time, start and stop by pid."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port(span: int = 1) -> int:
    """A port with ``span`` free ports from it (PyTriton takes three: HTTP, gRPC, metrics)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span < 65535 and all(_free(port + i) for i in range(1, span)):
            return port
    raise RuntimeError("no free port")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def ready(port: int, timeout: float, path: str = "/v2/health/ready") -> bool:
    """Poll GET ``path`` until 200; False after ``timeout`` seconds."""
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return True
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.002)
    return False


def cpu_seconds(root: int) -> float:
    """User+system CPU seconds of process ``root`` and all its descendants (PyTriton runs several)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
        stats[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)  # ppid, utime+stime
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in stats.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(stats[p][1] for p in tree if p in stats)


class Server:
    """A server process started in its own process group, stopped by its pid."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None,
                 same_session: bool = False, ready_path: str = "/v2/models/bnpipe/ready") -> None:
        self.name, self.cmd, self.port, self.env, self.same_session = name, cmd, port, env, same_session
        self.ready_path = ready_path  # by default the model's: Triton loads the model after its health is up

    def __enter__(self) -> Server:
        self.log = tempfile.TemporaryFile()
        # Its own process group, to stop all of it; and by default its own session, as a server started
        # from another shell: under the kernel's autogroup scheduling (Linux's default) each session is
        # a scheduling group, so CFS splits the cores between the server and the load generators.
        # same_session puts them in one group, where the cores are shared among all their threads.
        group = {"preexec_fn": os.setpgrp} if self.same_session else {"start_new_session": True}
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, **group)
        if not ready(self.port, 120, self.ready_path):
            self.__exit__()
            self.log.seek(0)
            sys.exit(f"{self.name} did not become ready: {self.log.read().decode()[-2000:]}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        try:  # its own group: PyTriton's tritonserver and stub can outlive their parent's exit
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()
