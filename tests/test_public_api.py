"""The public surface: ``__all__``, docstrings, ``py.typed``, signatures and reprs."""

from __future__ import annotations

import enum
import importlib.metadata
import importlib.resources
import inspect
import types
from typing import Any

import asyncpg
import pytest

import aiopglock
from tests._helpers import Connect, holders, wait_until

KEY = "aiopglock-tests:public-api"


def _public_objects() -> list[tuple[str, Any]]:
    return [(name, getattr(aiopglock, name)) for name in aiopglock.__all__]


# --------------------------------------------------------------------------- __all__


def test_all_is_sorted_and_unique() -> None:
    names = list(aiopglock.__all__)
    assert names == sorted(names)
    assert len(names) == len(set(names))
    assert all(isinstance(name, str) for name in names)


def test_every_name_in_all_exists() -> None:
    missing = [name for name in aiopglock.__all__ if not hasattr(aiopglock, name)]
    assert missing == []


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, Any] = {}
    exec("from aiopglock import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(aiopglock.__all__)


def test_every_public_attribute_is_in_all() -> None:
    stray = [
        name
        for name, value in vars(aiopglock).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"  # bound by `from __future__ import annotations`
        and name not in aiopglock.__all__
    ]
    assert stray == []


def test_contract_names_are_exported() -> None:
    # The names DESIGN.md fixes that exist from the first release on.
    for name in (
        "Error",
        "LockLost",
        "LockNotAcquired",
        "Raise",
        "Return",
        "Skip",
        "UsageError",
        "advisory",
        "advisory_key",
        "configure",
    ):
        assert name in aiopglock.__all__, name


def test_version() -> None:
    assert isinstance(aiopglock.__version__, str)
    assert aiopglock.__version__ == importlib.metadata.version("aiopglock")


def test_py_typed_ships_in_the_package() -> None:
    marker = importlib.resources.files("aiopglock").joinpath("py.typed")
    assert marker.is_file()


# --------------------------------------------------------------------------- docstrings


def _documented(name: str, value: Any) -> Any:
    """The object whose docstring documents ``value`` (an enum member: its enum)."""
    if isinstance(value, enum.Enum):
        return type(value)
    return value


@pytest.mark.parametrize(
    ("name", "value"),
    [(name, value) for name, value in _public_objects() if name != "__version__"],
    ids=[name for name in aiopglock.__all__ if name != "__version__"],
)
def test_public_name_has_a_docstring_with_an_example(name: str, value: Any) -> None:
    documented = _documented(name, value)
    doc = documented.__doc__
    assert doc, f"{name} has no docstring"
    assert "Example" in doc, f"{name}'s docstring has no example"


def test_side_effect_members_are_members_of_side_effect() -> None:
    members = (aiopglock.Return, aiopglock.Raise, aiopglock.Skip)
    for member in members:
        assert isinstance(member, aiopglock.SideEffect)
    assert len(set(members)) == 3
    assert set(aiopglock.SideEffect) == set(members)


def test_public_names_come_from_private_modules() -> None:
    for name, value in _public_objects():
        module = getattr(_documented(name, value), "__module__", None)
        if module is not None and name != "__version__":
            assert module.startswith("aiopglock."), (name, module)
            assert module.split(".")[1].startswith("_"), (name, module)


# --------------------------------------------------------------------------- signatures


def test_advisory_signature() -> None:
    params = inspect.signature(aiopglock.advisory).parameters
    expected = [
        ("key", inspect.Parameter.POSITIONAL_OR_KEYWORD, None),
        ("db", inspect.Parameter.KEYWORD_ONLY, None),
        ("shared", inspect.Parameter.KEYWORD_ONLY, False),
        ("xact", inspect.Parameter.KEYWORD_ONLY, False),
        ("timeout", inspect.Parameter.KEYWORD_ONLY, None),
        ("side_effect", inspect.Parameter.KEYWORD_ONLY, None),
        ("cancel_on_lost", inspect.Parameter.KEYWORD_ONLY, True),
        ("fence", inspect.Parameter.KEYWORD_ONLY, False),
    ]
    assert [(p.name, p.kind, p.default) for p in params.values()] == expected


def test_advisory_key_and_configure_signatures() -> None:
    (key,) = inspect.signature(aiopglock.advisory_key).parameters.values()
    assert key.name == "key" and key.default is inspect.Parameter.empty
    configure = inspect.signature(aiopglock.configure).parameters
    assert "db" in configure
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in configure.values())


# --------------------------------------------------------------------------- reprs


@pytest.mark.parametrize(
    ("member", "text"),
    [
        (aiopglock.Return, "aiopglock.Return"),
        (aiopglock.Raise, "aiopglock.Raise"),
        (aiopglock.Skip, "aiopglock.Skip"),
    ],
)
def test_side_effect_repr_is_how_it_is_spelled(member: aiopglock.SideEffect, text: str) -> None:
    assert repr(member) == text
    assert eval(repr(member), {"aiopglock": aiopglock}) is member


def test_advisory_request_repr() -> None:
    text = repr(aiopglock.advisory(42, timeout=5, shared=True, side_effect=aiopglock.Raise))
    assert "advisory" in text
    assert "42" in text
    assert "5" in text
    assert "shared=True" in text
    assert "aiopglock.Raise" in text


async def test_repr_of_an_acquired_handle(pool: asyncpg.Pool, admin: asyncpg.Connection) -> None:
    async with aiopglock.advisory(KEY + ":acquired", db=pool) as lock:
        assert await holders(admin, lock.key) == [lock.pid]
        text = repr(lock)
        assert text.startswith("<AdvisoryLock") and text.endswith(">"), text
        assert repr(lock.key) in text, text
        assert f"pid={lock.pid}" in text, text
        assert "acquired" in text and "not acquired" not in text, text
        assert "nested" not in text and "lost" not in text, text
        assert "exclusive" in text and "shared" not in text, text
        assert "session" in text, text
    text = repr(lock)
    assert "not acquired" in text or "released" in text, text


async def test_repr_of_a_nested_handle(pool: asyncpg.Pool, admin: asyncpg.Connection) -> None:
    async with aiopglock.advisory(KEY + ":nested", db=pool) as outer:
        async with aiopglock.advisory(KEY + ":nested", db=pool) as inner:
            assert await holders(admin, inner.key) == [outer.pid]
            assert inner.pid == outer.pid
            text = repr(inner)
            assert "nested" in text, text
            assert f"pid={outer.pid}" in text and repr(inner.key) in text, text
            assert "not acquired" not in text, text
        assert "nested" not in repr(outer)
        assert "not acquired" not in repr(outer)
        assert await holders(admin, outer.key) == [outer.pid]


async def test_repr_of_a_handle_not_acquired(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    key = aiopglock.advisory_key(KEY + ":busy")
    other = await connect()
    await other.execute("SELECT pg_advisory_lock($1::int8)", key)
    try:
        async with aiopglock.advisory(KEY + ":busy", db=pool, timeout=0) as lock:
            assert not lock
            text = repr(lock)
            assert "not acquired" in text, text
            assert repr(key) in text, text
            assert "pid=" not in text, text  # this handle holds nothing on any backend
        assert await holders(admin, key) == [other.get_server_pid()]
    finally:
        await other.execute("SELECT pg_advisory_unlock($1::int8)", key)


async def test_repr_of_shared_pair_and_xact_handles(
    pool: asyncpg.Pool, connect: Connect, admin: asyncpg.Connection
) -> None:
    async with aiopglock.advisory((-5, 123_457), db=pool, shared=True) as lock:
        assert await holders(admin, (-5, 123_457), mode="ShareLock") == [lock.pid]
        text = repr(lock)
        assert "shared" in text and "(-5, 123457)" in text, text
    conn = await connect()
    async with conn.transaction(), aiopglock.advisory(KEY + ":xact", db=conn, xact=True) as lock:
        assert await holders(admin, lock.key) == [conn.get_server_pid()]
        assert "xact" in repr(lock), repr(lock)


async def test_repr_of_a_lost_handle(pool: asyncpg.Pool, admin: asyncpg.Connection) -> None:
    with pytest.raises(aiopglock.LockLost) as info:
        async with aiopglock.advisory(KEY + ":lost", db=pool, cancel_on_lost=False) as lock:
            assert await holders(admin, lock.key) == [lock.pid]
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", lock.pid)

            async def lost() -> bool:
                return lock.lost

            await wait_until(lost, message="the handle to notice its connection died")
            text = repr(lock)
            assert "lost" in text and f"pid={lock.pid}" in text, text
    assert info.value.key == lock.key
    assert info.value.pid == lock.pid
    assert "lost" in repr(lock)
