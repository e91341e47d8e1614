"""lora/common/cli.py: the "lora" logger and run_main."""

import io
import logging
import sys

from lora.common import cli


def test_the_lora_logger_writes_to_the_stderr_of_the_moment(monkeypatch):
    """A script run once in a process (the web UI, a test) and then again after sys.stderr was
    swapped and the old one closed logs to the new stderr instead of failing on a closed file."""
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    monkeypatch.setattr(cli.log, "handlers", [])
    cli.setup_logging(logging.INFO)
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    cli.log.info("hello %s", "there")
    assert "hello there" in second.getvalue()
