"""Checks of option values, in one place: each returns the value (converted) or raises `InputError`.

Every message names the option, the value received and what was expected, e.g.
"maxiter must be a positive integer. Received: maxiter=0."

Example:
  >>> positive_int(5, "maxiter")
  5
  >>> one_of("warn", "on_indefinite", ("warn", "raise", "ignore"))
  'warn'
"""

import numpy as np

from tf_influence.errors import InputError


def _is_integer(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def integer(value, name, *, minimum=None, owner=None):
    """`value` as an int; refuses bools, floats and values below `minimum`."""
    if not _is_integer(value) or (minimum is not None and value < minimum):
        bound = {None: "an integer", 0: "an integer ≥ 0", 1: "a positive integer"}.get(
            minimum, f"an integer ≥ {minimum}")
        raise InputError(f"{_prefix(owner)}{name} must be {bound}. Received: {name}={value!r}.")
    return int(value)


def positive_int(value, name, *, owner=None):
    """`value` as an int ≥ 1."""
    return integer(value, name, minimum=1, owner=owner)


def positive_float(value, name, *, owner=None):
    """`value` as a finite float > 0."""
    if not _is_number(value) or not np.isfinite(value) or value <= 0:
        raise InputError(f"{_prefix(owner)}{name} must be a positive number. Received: {name}={value!r}.")
    return float(value)


def nonnegative_float(value, name, *, owner=None):
    """`value` as a finite float ≥ 0."""
    if not _is_number(value) or not np.isfinite(value) or value < 0:
        raise InputError(f"{_prefix(owner)}{name} must be a finite number ≥ 0. Received: {name}={value!r}.")
    return float(value)


def one_of(value, name, choices, *, owner=None):
    """`value` if it is one of `choices`."""
    if value not in choices:
        raise InputError(f"{_prefix(owner)}{name} must be one of {tuple(choices)}. Received: {name}={value!r}.")
    return value


def _prefix(owner):
    return f"{owner}: " if owner else ""
