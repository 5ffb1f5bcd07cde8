"""The lab's one error type, so the CLI can print it plainly and callers can catch it."""

from __future__ import annotations

from fedrdma.core.errors import FedRDMAError


class LabError(FedRDMAError, RuntimeError):
    """A lab operation refused or failed; the message names the problem and the fix."""
