"""`nanoseek.precision`: where `resolve` reports its choice."""
import io
import sys

import torch

from nanoseek import precision


def test_resolve_reports_to_stderr_as_it_is_at_the_call(monkeypatch):
    """The line goes to the current sys.stderr, not to the stream of the module's import (a test's captured stream,
    closed since: the commands that call it then failed with 'I/O operation on closed file')."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    dtype = precision.resolve("auto", "cpu", "probe")
    assert dtype in (torch.float32, torch.bfloat16)
    assert err.getvalue().startswith("probe: dtype auto -> ")
