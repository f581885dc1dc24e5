"""Query strategies, one module per family, reachable by name through one registry.

Every module in this package is imported on first use; its classes register themselves with
`@register_strategy`, so adding a strategy never means editing a second list.
"""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import ConfigError
from .base import QueryState, Strategy, options_help, picks_available, top_k

_REGISTRY: dict[str, type[Strategy]] = {}
_LOADED = False


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"strategy name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    _LOADED = True


def strategy_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def strategy_class(name: str) -> type[Strategy]:
    _load_all()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown strategy {name!r}; choose from: {', '.join(strategy_names())}")
    return _REGISTRY[name]


def get_strategy(name: str, **options) -> Strategy:
    """A configured strategy by name; unknown names and options raise ValueError (ConfigError)."""
    return strategy_class(name)(**options)


def describe_strategies() -> list[tuple[str, str, str]]:
    """(name, one line of help, options with defaults) for every strategy."""
    return [(name, _REGISTRY[name].help, options_help(_REGISTRY[name].Options)) for name in strategy_names()]


__all__ = ["QueryState", "Strategy", "get_strategy", "picks_available", "register_strategy", "strategy_names",
           "strategy_class", "describe_strategies", "top_k"]
