"""What every decorator of aiopglock does with the function it decorates.

``advisory()``, ``Locker.advisory()``, ``lock_timeout()``/``statement_timeout()``
and ``prioritize()`` decorate coroutine functions. :func:`target` accepts, besides
an ``async def`` function or bound method:

- a ``functools.partial`` of one (nested partials too): it is called as it is;
  its default lock name is the wrapped function's (the code that runs);
- a ``staticmethod`` or ``classmethod`` object (the decorator written above
  ``@staticmethod``): the wrapper is made a ``staticmethod``/``classmethod``
  again, so the method works as if the two decorators were swapped.

Anything else (a plain ``def``, an async generator, a class, a callable
object) is a TypeError that names the decorator.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["Target", "target"]


def _innermost(fn: Any) -> Any:
    """``fn`` without its ``functools.partial`` layers."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _shown_function(fn: Any) -> str:
    inner = _innermost(fn)
    name = getattr(inner, "__qualname__", None)
    shown = repr(name) if isinstance(name, str) else repr(inner)
    if isinstance(fn, functools.partial):
        return f"functools.partial of {shown}"
    return shown


class Target:
    """A function to decorate: :attr:`fn` is what the wrapper awaits."""

    __slots__ = ("_kind", "fn")

    def __init__(self, fn: Callable[..., Any], kind: type[Any] | None) -> None:
        self.fn = fn
        self._kind = kind

    def default_name(self, decorator: str) -> str:
        """``"module.qualname"`` of the function that runs: the default lock
        name of ``advisory()``. TypeError when the callable has no name."""
        inner = _innermost(self.fn)
        qualname = getattr(inner, "__qualname__", None)
        if not isinstance(qualname, str):
            raise TypeError(
                f"key: {decorator} names the lock of a decorated function after its "
                f"__qualname__, and {inner!r} has none; pass key= explicitly"
            )
        return f"{getattr(inner, '__module__', None)}.{qualname}"

    def finish(self, wrapper: Callable[..., Any]) -> Any:
        """``wrapper`` dressed as the decorated function (name, docstring,
        ``__wrapped__``), and made a staticmethod/classmethod again if the
        decorated object was one."""
        functools.update_wrapper(wrapper, self.fn)
        if isinstance(self.fn, functools.partial):
            # A partial has no name of its own (and the docstring of its class).
            inner = _innermost(self.fn)
            for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
                if hasattr(inner, attr):
                    setattr(wrapper, attr, getattr(inner, attr))
        if self._kind is not None:
            return self._kind(wrapper)
        return wrapper


def target(fn: object, decorator: str) -> Target:
    """Check what ``decorator`` (e.g. ``"aiopglock.advisory"``) is applied to.

    Example::

        def __call__(self, fn):
            decorated = target(fn, "aiopglock.advisory")

            async def wrapper(*args, **kwargs):
                return await decorated.fn(*args, **kwargs)

            return decorated.finish(wrapper)
    """
    kind: type[Any] | None = None
    if isinstance(fn, (staticmethod, classmethod)):
        kind = type(fn)
        fn = fn.__func__
    inner = _innermost(fn)
    # inspect unwraps partials itself from Python 3.8 on; asking about the
    # innermost function as well keeps that from depending on the version.
    if not callable(fn) or not (
        inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(inner)
    ):
        what = (
            _shown_function(fn) if kind is None else f"the {kind.__name__} of {_shown_function(fn)}"
        )
        raise TypeError(f"{decorator} decorates coroutine functions (async def); {what} is not one")
    return Target(fn, kind)
