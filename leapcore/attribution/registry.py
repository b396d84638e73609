"""Attribution methods by name: a registry with a decorator, as zennit's ``@register_composite``."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from leapcore.errors import InputError

GRADIENT_FRAMEWORKS = ("pt", "tf")
TORCH_ONLY = ("pt",)


@dataclass(frozen=True)
class MethodSpec:
    """One attribution method.

    Attributes:
        name: registry name (what ``methods=[...]`` and ``leap explain --methods`` take).
        compute: ``(context, images, targets) -> maps [B, H, W]`` or ``(maps, extras)``.
        library: the library that does the work (``captum``, ``zennit``, ``zennit-crp``, ``leapcore``).
        passes: cost in model passes per image and target (forward + backward = one pass), for docs.
        frameworks: ``"pt"`` and/or ``"tf"``; TensorFlow models go through the gradient bridge, so
            only methods that need nothing but forward calls and input gradients accept them.
        defaults: the method's options and their default values (anything else is refused).
        aliases: other names it answers to.
    """

    name: str
    compute: Callable[..., Any]
    library: str
    passes: str
    frameworks: tuple[str, ...] = TORCH_ONLY
    defaults: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


METHODS: dict[str, MethodSpec] = {}
ALIASES: dict[str, str] = {}


def register_method(
    name: str,
    *,
    library: str,
    passes: str,
    frameworks: tuple[str, ...] = TORCH_ONLY,
    defaults: dict[str, Any] | None = None,
    aliases: tuple[str, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``compute`` under ``name`` (and ``aliases``); see :class:`MethodSpec`."""

    def wrap(compute: Callable[..., Any]) -> Callable[..., Any]:
        spec = MethodSpec(name, compute, library, passes, frameworks, dict(defaults or {}), aliases)
        METHODS[name] = spec
        for alias in aliases:
            ALIASES[alias] = name
        return compute

    return wrap


#: Modules whose import registers built-in methods (they import captum / zennit lazily themselves).
#: Found by name, as plug-ins are: they import this registry, so it must not import them.
BUILTIN_MODULES = (
    "leapcore.attribution.captum_methods",
    "leapcore.attribution.influence",
    "leapcore.attribution.lrp",
    "leapcore.attribution.vit",
)


def _load_builtin() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _load_builtin()
    return sorted(METHODS)


def get_method(name: str) -> MethodSpec:
    """The method registered under ``name`` or one of its aliases.

    Raises:
        InputError: unknown name, with the closest names and the full list.
    """
    _load_builtin()
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key in METHODS:
        return METHODS[key]
    known = sorted(METHODS) + sorted(ALIASES)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise InputError(
        f"unknown attribution method {name!r}.{hint} Known methods: {', '.join(sorted(METHODS))} "
        f"(aliases: {', '.join(f'{a}={t}' for a, t in sorted(ALIASES.items()))})."
    )


def methods_markdown() -> str:
    """The registry as a Markdown table (name, aliases, library, cost in passes, frameworks, options)."""
    _load_builtin()
    lines = [
        "| method | aliases | library | model passes per image and target | frameworks | options (defaults) |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(METHODS):
        spec = METHODS[name]
        options = ", ".join(f"`{k}={v!r}`" for k, v in spec.defaults.items()) or "-"
        aliases = ", ".join(f"`{a}`" for a in spec.aliases) or "-"
        lines.append(
            f"| `{name}` | {aliases} | {spec.library} | {spec.passes} | {', '.join(spec.frameworks)} | {options} |"
        )
    return "\n".join(lines) + "\n"
