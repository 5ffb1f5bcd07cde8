"""Where a site's node keeps its socket and token, and who may enter there.

The directory is the first gate: only the site's user may enter it (mode 0700, owned by
that user), so no other user of the host can reach the socket or read the token. A
directory that someone else owns or that others may enter is refused, not repaired: in a
shared /tmp that is how a socket is planted.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedrdma.core.errors import FedRDMAError

TOKEN_BYTES = 32
"""The token's random bytes: unguessable; it only proves an app can read a file of the site's user."""

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


class NodeUnavailable(FedRDMAError):
    """No node answers for this site, or its files cannot be used; the message says how to start one."""


def default_runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR/fedrdma (per user, made by the login manager), else /tmp/fedrdma-UID."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "fedrdma" if base else Path(tempfile.gettempdir()) / f"fedrdma-{os.geteuid()}"


@dataclass(frozen=True)
class NodePaths:
    directory: Path
    site: str

    @classmethod
    def of(cls, site: str, runtime_dir: Path | None = None) -> NodePaths:
        return cls(Path(runtime_dir) if runtime_dir is not None else default_runtime_dir(), site)

    @property
    def socket(self) -> Path:
        return self.directory / f"{self.site}.sock"

    @property
    def token(self) -> Path:
        return self.directory / f"{self.site}.token"

    def make_private(self) -> None:
        """Create the directory for this user alone, or refuse one another user could enter."""
        self.directory.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        self.check_private()

    def check_private(self) -> None:
        info = self.directory.stat()
        if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise NodeUnavailable(
                f"{self.directory} is owned by uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}; a node's "
                f"directory must be this user's (uid {os.geteuid()}) alone, mode 700: fix it with "
                f"`chmod 700 {self.directory}`, or give another --runtime-dir")

    def write_token(self) -> str:
        """A fresh token in a file only this user can read; an earlier node's token stops working."""
        token = secrets.token_hex(TOKEN_BYTES)
        self.token.unlink(missing_ok=True)
        fd = os.open(self.token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        with os.fdopen(fd, "w") as out:
            out.write(token)
        return token

    def read_token(self) -> str:
        try:
            return self.token.read_text().strip()
        except PermissionError:
            raise NodeUnavailable(f"cannot read the node's token {self.token}: run the app as the user that "
                                  f"runs `fedrdma node --site {self.site}`") from None
        except FileNotFoundError:
            raise NodeUnavailable(self.not_running()) from None

    def not_running(self) -> str:
        return (f"no fedrdma node is running for site {self.site!r} at {self.socket}: start one with "
                f"`fedrdma node --site {self.site}`" + ("" if self.directory == default_runtime_dir()
                                                        else f" --runtime-dir {self.directory}"))


def same_token(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())
