"""The ready line (proto/ready.py): one format, one parser, one waiter with a deadline."""

from __future__ import annotations

import io
import os

import pytest

from faasmoe.proto.errors import FaasmoeError
from faasmoe.proto.ready import NODE_READY, ROUTER_READY, ReadyLines, parse_ready, ready_line


@pytest.mark.parametrize("line, prefix, expected", [
    (ready_line(NODE_READY, {"address": "127.0.0.1:5"}) + "\n", NODE_READY, {"address": "127.0.0.1:5"}),
    (ready_line(ROUTER_READY, {"url": "http://x"}), ROUTER_READY, {"url": "http://x"}),
    (ready_line(ROUTER_READY, {"url": "http://x"}), NODE_READY, None),          # the other kind's line
    ("faasmoe-router serving ...\n", ROUTER_READY, None),
    ("", NODE_READY, None),
])
def test_parse_ready(line, prefix, expected):
    assert parse_ready(line, prefix) == expected


def test_the_waiter_skips_other_lines_and_reports_an_early_exit():
    text = "a log line\n" + ready_line(ROUTER_READY, {"url": "u"}) + "\nmore\n"
    assert ReadyLines(io.StringIO(text)).wait(ROUTER_READY, 5) == {"url": "u"}
    with pytest.raises(FaasmoeError, match="the router exited before it was ready"):
        ReadyLines(io.StringIO("only logs\n")).wait(ROUTER_READY, 5, "the router")


def test_the_waiter_has_a_deadline():
    read_fd, write_fd = os.pipe()                    # a child that never prints and never exits
    with os.fdopen(read_fd) as stream:
        try:
            with pytest.raises(FaasmoeError, match="node did not report ready within 0 s"):
                ReadyLines(stream).wait(NODE_READY, 0.2, "node")
        finally:
            os.close(write_fd)


def test_the_waiter_names_a_childs_exit_code():
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", "print('no ready line'); raise SystemExit(3)"],
                             stdout=subprocess.PIPE, text=True)
    with pytest.raises(FaasmoeError, match="node exited with code 3 before it was ready"):
        ReadyLines(child.stdout, child).wait(NODE_READY, 30, "node")
