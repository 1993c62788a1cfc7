"""Request options of the train tasks, parsed one way for both trainers: MONAI Label passes whatever the client sent
(JSON values, or strings from Slicer's options table), so each value is converted and range-checked here, and a bad
one raises ``ValueError`` with the option's name before any work starts."""

from __future__ import annotations

import math
from typing import Any, Optional

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def parse_bool(value: Any, name: str = "option") -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"'{name}' must be true or false, got {value!r}")


def _number(value: Any, name: str, kind, minimum=None, maximum=None):
    if isinstance(value, bool):
        raise ValueError(f"'{name}' must be a number, got {value!r}")
    try:
        number = kind(float(value)) if kind is int and isinstance(value, str) and "." in value else kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"'{name}' must be {'a whole number' if kind is int else 'a number'}, got {value!r}") from None
    if kind is float and not math.isfinite(number):
        raise ValueError(f"'{name}' must be finite, got {value!r}")
    if kind is int and isinstance(value, float) and value != number:
        raise ValueError(f"'{name}' must be a whole number, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"'{name}' must be at least {minimum}, got {value!r}")
    if maximum is not None and number > maximum:
        raise ValueError(f"'{name}' must be at most {maximum}, got {value!r}")
    return number


def parse_int(value: Any, name: str = "option", minimum=None, maximum=None) -> Optional[int]:
    """None for an absent value (None or ""), else a range-checked int."""
    return None if value is None or value == "" else _number(value, name, int, minimum, maximum)


def parse_float(value: Any, name: str = "option", minimum=None, maximum=None) -> Optional[float]:
    """None for an absent value (None or ""), else a finite, range-checked float."""
    return None if value is None or value == "" else _number(value, name, float, minimum, maximum)
