"""The server fixtures' own promise: a server started by a test is stopped, also when it fails."""

from __future__ import annotations

import os
import sys

import pytest
from deploy_support import LOOPBACK, free_port, port_open, server_process, wait_for


@pytest.mark.timeout(60)
def test_server_is_stopped_with_its_children_when_the_test_body_raises(tmp_path):
    port = free_port()
    # A server that starts a child in its own process group, like uvicorn workers or flow runs.
    script = (
        "import http.server, subprocess, sys;"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']);"
        f"http.server.ThreadingHTTPServer(('{LOOPBACK}', {port}), "
        "http.server.SimpleHTTPRequestHandler).serve_forever()"
    )
    started = None
    with (
        pytest.raises(RuntimeError, match="the test failed"),
        server_process(
            "http.server",
            [sys.executable, "-c", script],
            {"PATH": "/usr/bin:/bin"},
            tmp_path / "server.log",
            f"http://{LOOPBACK}:{port}/",
            timeout=30,
            cwd=tmp_path,
        ) as server,
    ):
        started = server
        assert port_open(port)
        raise RuntimeError("the test failed")
    assert started is not None and not started.running
    assert not port_open(port)

    def group_gone() -> bool:
        try:
            os.killpg(started.proc.pid, 0)  # signal 0: only asks whether the group exists
        except ProcessLookupError:
            return True
        return False

    wait_for(group_gone, 10, 0.2, "the server's child to be gone (reaped)")


def test_free_ports_are_on_loopback_and_distinct():
    ports = {free_port() for _ in range(5)}
    assert len(ports) >= 4 and all(1024 < p < 65536 for p in ports)
    assert not any(port_open(p) for p in ports)
