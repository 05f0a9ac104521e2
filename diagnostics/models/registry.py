"""A registry of model factories, as timm keeps one: configs name a model, never an import path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_REGISTRY: dict[str, Callable[..., Any]] = {}


class UnknownModelError(KeyError, ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown model {self.name!r}; registered models: {', '.join(list_models())}"


def register_model(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: `@register_model("resnet18")` over a factory `fn(**kw) -> nn.Module`."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def _ensure_builtin() -> None:
    # The built-in networks register themselves when their module is imported.
    import diagnostics.models.cxr  # noqa: F401


def list_models() -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY)


def create_model(name: str, **kw: Any) -> Any:
    """Build a registered model. Unknown names raise an error listing the valid ones."""
    _ensure_builtin()
    if name not in _REGISTRY:
        raise UnknownModelError(name)
    return _REGISTRY[name](**kw)
