"""Discovery methods, registered by name (as peft registers its tuners).

A new method is one new file implementing `melbo.engine.methods.base.Method` (usually by subclassing
`GradientMethod`) and one `register_method(...)` line below; `--method NAME` and `discover(method=NAME)` then
find it, and its runs load through its `artifact_kind`.
"""

from __future__ import annotations

from melbo.errors import MelboError
from melbo.engine.methods.adapters import SteeringAdapterMethod
from melbo.engine.methods.base import Fit, GradientMethod, Method, Params, Setting
from melbo.engine.methods.dct import DCTMethod
from melbo.engine.methods.jacobian import JacobianMethod
from melbo.engine.methods.vectors import SteeringVectorMethod

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Make `cls` available by its `name` (usable as a class decorator)."""
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise MelboError(f"unknown method {name!r}: use one of {', '.join(METHODS)}") from None


register_method(SteeringVectorMethod)
register_method(SteeringAdapterMethod)
register_method(JacobianMethod)
register_method(DCTMethod)

__all__ = ["METHODS", "DCTMethod", "Fit", "GradientMethod", "JacobianMethod", "Method", "Params", "Setting",
           "SteeringAdapterMethod", "SteeringVectorMethod", "method_class", "register_method"]
