"""Discovery methods, registered by name."""

from melbo.methods.adapters import SteeringAdapterMethod
from melbo.methods.base import Method, Params, Setting
from melbo.methods.vectors import SteeringVectorMethod

METHODS = {"vectors": SteeringVectorMethod, "adapters": SteeringAdapterMethod}

__all__ = ["METHODS", "Method", "Params", "Setting", "SteeringAdapterMethod", "SteeringVectorMethod"]
