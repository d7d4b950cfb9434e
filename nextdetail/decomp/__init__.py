"""Mumford-Shah smoothing by Ambrosio-Tortorelli and CART's hierarchical decompositions."""
from .at import ATResult, ambrosio_tortorelli
from .energy import at_energy
from .hierarchy import (Decomposer, Decomposition, MethodInfo, available_decompositions, decompose,
                        method_info, register_decomposition)
from .params import ATParams
from . import intrinsic, specular  # importing them registers "intrinsic" and "specular"

__all__ = ["ATParams", "ATResult", "ambrosio_tortorelli", "at_energy", "Decomposer", "Decomposition",
           "MethodInfo", "available_decompositions", "decompose", "intrinsic", "method_info",
           "register_decomposition", "specular"]
