"""Name -> value dispatch that fails with the list of valid names."""

from __future__ import annotations

from typing import Any, Iterable, Mapping


def choose(kind: str, name: Any, options: Mapping[str, Any] | Iterable[str]) -> Any:
    """Return ``options[name]`` (or ``name`` itself for a plain collection of names).

    Raises ``ValueError("unknown <kind> 'x'; valid values: a, b, c")`` otherwise, so that
    a mistyped flag produces one clear line instead of a ``KeyError`` deep in a stack.
    """
    if name in options:
        return options[name] if isinstance(options, Mapping) else name
    valid = ", ".join(str(option) for option in options)
    raise ValueError(f"unknown {kind} {name!r}; valid values: {valid}")
