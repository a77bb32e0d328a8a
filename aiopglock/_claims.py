"""Per-process claims of advisory keys, kept before asking the server.

PostgreSQL re-enters per session: two tasks sharing one caller's Connection
would both be granted the same key. Exclusion between them is kept here, by
connection: a handle claims its key on the connection before its lock
statement, and waits for a conflicting claim of another task to end.

And a count per key of the handles acquiring or holding it through a Pool:
a release through the pool's reset (a loop turn later) is used only when no
other handle of this process wants the key.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio

from ._conntypes import RawConn
from ._keys import AdvisoryKey

__all__ = ["KeyClaim"]


class _ConnClaim:
    """A key claimed on a caller's Connection by one handle, from just before
    its lock statement until its exit."""

    __slots__ = ("released", "shared", "task")

    def __init__(self, task: asyncio.Task[Any], shared: bool) -> None:
        self.task = task
        self.shared = shared
        self.released = asyncio.Event()


# id(raw connection) -> key -> the claims on it.
_conn_claims: dict[int, dict[AdvisoryKey, list[_ConnClaim]]] = {}

# How many handles of this process are acquiring or holding each key through
# a Pool.
_wanted: dict[AdvisoryKey, int] = {}


class KeyClaim:
    """One handle's claims of its key in this process.

    Example::

        claims = KeyClaim(key, shared=False)
        left = await claims.claim_on(raw, task, timeout)  # a caller's Connection
        if left is not None and left < 0:
            ...  # another task sharing the connection kept the key
        ...
        claims.release()
    """

    __slots__ = ("_claim", "_wants", "key", "shared")

    def __init__(self, key: AdvisoryKey, shared: bool) -> None:
        self.key = key
        self.shared = shared
        self._claim: tuple[int, _ConnClaim] | None = None
        self._wants = False

    def want(self) -> None:
        """Count this handle as acquiring or holding the key through a Pool."""
        _wanted[self.key] = _wanted.get(self.key, 0) + 1
        self._wants = True

    def wanted_alone(self) -> bool:
        """Whether no other handle of this process wants the key."""
        return _wanted.get(self.key) == 1

    async def claim_on(
        self, raw: RawConn | None, task: asyncio.Task[Any], timeout: float | None
    ) -> float | None:
        """Wait (within ``timeout``) until no other task's claim on this same
        connection conflicts, then claim the key. Returns the time left for the
        server wait, or -1 when the key stayed busy."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            claims = _conn_claims.setdefault(id(raw), {}).setdefault(self.key, [])
            # This task's own hold is not in the way (a transaction-level
            # request under its session hold): the server grants it at once.
            blocking = next(
                (c for c in claims if c.task is not task and not (c.shared and self.shared)),
                None,
            )
            if blocking is None:
                claim = _ConnClaim(task, self.shared)
                claims.append(claim)
                self._claim = (id(raw), claim)
                if deadline is None or timeout == 0:
                    return timeout
                return max(deadline - loop.time(), 0.001)
            if deadline is not None and (timeout == 0 or deadline <= loop.time()):
                return -1.0
            with anyio.move_on_after(None if deadline is None else deadline - loop.time()):
                await blocking.released.wait()

    def release(self) -> None:
        """End both claims (each only if made); wakes a waiter of another task."""
        if self._wants:
            self._wants = False
            count = _wanted[self.key] - 1
            if count:
                _wanted[self.key] = count
            else:
                del _wanted[self.key]
        if self._claim is None:
            return
        raw_id, claim = self._claim
        self._claim = None
        by_key = _conn_claims.get(raw_id, {})
        claims = by_key.get(self.key, [])
        if claim in claims:
            claims.remove(claim)
            if not claims:
                by_key.pop(self.key, None)
            if not by_key:
                _conn_claims.pop(raw_id, None)
        claim.released.set()
