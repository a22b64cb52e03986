"""The one exception type for mistakes a user can fix.

It lives in ``cluster`` because that is the bottom of the import graph
(flows → tasks → cluster): every layer can raise it, and the CLI prints it as
one line instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


class UserError(ValueError):
    """An input the user gave cannot work; the message names it and the fix."""


def registered(registry: Mapping[str, T], kind: str, name: str) -> T:
    """The entry ``name`` of a registry of ``kind`` (framework, recipe, …).

    Raises:
        UserError: for a name that is not registered, listing those that are.
    """
    try:
        return registry[name]
    except KeyError:
        raise UserError(f"{kind}={name!r} is unknown; choose one of {', '.join(registry)}.") from None
