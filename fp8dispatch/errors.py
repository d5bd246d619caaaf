"""The exception types: every failure the library raises is one of these."""

from __future__ import annotations


class Fp8DispatchError(Exception):
    """Base of every error fp8dispatch raises on purpose."""


class Unsupported(Fp8DispatchError):
    """A backend cannot run this problem; the message gives its reasons."""


class NoBackend(Unsupported):
    """No backend allowed by the request can run this problem; one reason block per backend."""


class NumericalOverflowError(Fp8DispatchError, ArithmeticError):
    """Values exceed the FP8 range under the given scale and `overflow` forbids saturating."""


class Fp8ValueError(Fp8DispatchError, ValueError):
    """A bad argument value; the message names the argument, what was expected and what was seen."""


class Fp8TypeError(Fp8DispatchError, TypeError):
    """A bad argument type or dtype; the message names the argument."""


class Fp8IndexError(Fp8DispatchError, IndexError):
    """An index out of range; the message names what was indexed and the valid range."""


class UnknownBackend(Fp8ValueError):
    """A backend name that is not registered; the message lists the known ones."""


class ShardMisaligned(Fp8ValueError):
    """A tensor-parallel split would cut through a scale block (or leave ranks unequal shares); the
    message names the dimension and lists the world sizes that do split it."""
