"""The asyncpg types aiopglock's signatures name, as short aliases.

``Conn`` is one server session as a caller hands it over: an
``asyncpg.Connection`` or a pool's ``PoolConnectionProxy`` (asyncpg's stubs
give both the same methods, but neither derives from the other).
``RawConn`` is asyncpg's connection itself, ``Proxy`` a pool's lease of one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias, Union

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

__all__ = ["Conn", "Pool", "Proxy", "RawConn"]

Conn: TypeAlias = Union["asyncpg.Connection[Any]", "PoolConnectionProxy[Any]"]
Pool: TypeAlias = "asyncpg.Pool[Any]"
RawConn: TypeAlias = "asyncpg.Connection[Any]"
Proxy: TypeAlias = "PoolConnectionProxy[Any]"
