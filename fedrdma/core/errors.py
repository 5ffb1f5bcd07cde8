"""Errors a user can act on: each message names the problem and the fix."""

from __future__ import annotations


class FedRDMAError(Exception):
    """Base of every error fedrdma raises on purpose."""


class LayoutError(FedRDMAError):
    """Two sides disagree on what the bytes mean, or a layout cannot be built."""


class PlanError(FedRDMAError, ValueError):
    """A chunk plan or window setting that cannot work."""


class RangeError(FedRDMAError, ValueError):
    """A remote range that falls outside what the peer advertised."""


class TransferError(FedRDMAError):
    """A transfer that could not complete: retries used up, or the peer gone."""


class PeerLost(TransferError):
    """The peer stopped answering within its deadline."""


class ProtocolError(FedRDMAError):
    """A message that does not fit the session's protocol."""


class RunError(FedRDMAError, RuntimeError):
    """A run of processes (a benchmark's peers, a demo's federation) failed; the message
    carries what they printed, since the cause is often on the other side."""


class AggregationError(FedRDMAError, ValueError):
    """A fold or a round close that breaks FedAvg's rules (double fold, unknown silo, ...)."""


class NotEnoughSilos(AggregationError):
    """Fewer silos than `min_silos` survived the update checks; the global state is left as it was."""


class EncodingError(FedRDMAError, ValueError):
    """An update that cannot be encoded (NaN or Inf in its delta) or encoded bytes that do not
    decode (a block scale of 0, Inf or NaN; a layout a wire format cannot carry)."""
