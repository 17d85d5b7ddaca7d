"""Building frozen dataclass objects on hot paths without their ``__init__``.

A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``,
several times what setting a slot through its own descriptor costs. Code that
builds such an object for every reading takes the slots' setters once
(:func:`slot_setters`) and sets them on ``object.__new__(cls)``: the same object
in every way. The setters are asked for by name, in the class's field order,
and checked against it, so a field added, renamed or moved stops the import
instead of leaving a slot unset or set from the wrong value.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def slot_setters(cls: type, names: tuple[str, ...]) -> tuple[Any, ...]:
    """The ``__set__`` of each slot of dataclass ``cls``, for ``names``: all its fields
    in their order (TypeError otherwise)."""
    if tuple(f.name for f in fields(cls)) != names:
        raise TypeError(f"{cls.__name__} fields changed: update its fast constructor")
    return tuple(cls.__dict__[name].__set__ for name in names)
