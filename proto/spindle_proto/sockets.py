"""The shards' unix sockets: a socket a live process listens on is never removed; a stale one (its process
died without cleaning up) is. Used by the launcher before it starts anything and by a shard before it binds,
so a second instance on the same --shard-uds-path fails with a clear error instead of taking the first
instance's socket over (the first one's router would reconnect to the second one's shard)."""

from __future__ import annotations

import errno
import os
import socket
import stat


class SocketInUse(RuntimeError):
    """A live process listens on the path."""


def is_listening(path: str, timeout_s: float = 1.0) -> bool:
    """True when a connect to the unix socket at `path` succeeds (or times out: a stopped listener still has
    a backlog that fills); False when nothing listens (the socket is stale) or the path is no socket."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            s.connect(path)
        except socket.timeout:
            return True  # someone holds it, busy or stopped: not ours to take
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            if e.errno == errno.EAGAIN:  # the listener's backlog is full: it is alive
                return True
            raise
    return True


def remove_stale_socket(path: str) -> bool:
    """Remove `path` when it is a socket nobody listens on; True when removed. Raises SocketInUse when a
    process listens on it, and FileExistsError when it is something other than a socket."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a unix socket; choose another --shard-uds-path")
    if is_listening(path):
        raise SocketInUse(
            f"{path} is in use: another Spindle instance (or another program) listens on it; "
            "give this instance its own --shard-uds-path"
        )
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
