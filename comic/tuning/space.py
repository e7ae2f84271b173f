"""Search spaces of sweeps: dotted config keys -> `Dimension`s (uniform, loguniform, int, choice), read from a
mapping or a YAML file and checked against the base config before anything runs. A method's own space is declared
with it in the registry (`comic.methods.search_space`; `method_space` here).

YAML form, one key per line:
    htb.alpha: [0.5, 4.0]                       # uniform
    optim.lr_feature: {loguniform: [1.0e-4, 1.0e-2]}
    model.groups: {int: [1, 4]}
    rlc.distribution: {choice: [dynamic, static]}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ray import tune

from comic.config import Config, ConfigError, apply_overrides, field_specs, read_yaml_mapping, to_flat_dict
from comic.methods import list_methods, loss_defaults, search_space

log = logging.getLogger(__name__)

SPACE_KINDS = ("uniform", "loguniform", "int", "choice")


@dataclass(frozen=True)
class Dimension:
    """One searched config key: `uniform` / `loguniform` over [low, high], `int` (inclusive) or `choice`."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    def to_tune(self) -> Any:
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "int":
            return tune.randint(int(self.low), int(self.high) + 1)  # Tune's upper bound is exclusive
        return tune.choice(list(self.choices))

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.choices
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def describe(self) -> dict[str, list[Any]]:
        return {self.kind: list(self.choices) if self.kind == "choice" else [self.low, self.high]}


def parse_space(raw: Mapping[str, Any], base: Config | None = None) -> dict[str, Dimension]:
    """Dotted config key -> Dimension from `{key: [low, high]}` (uniform) or `{key: {kind: values}}`.

    Kinds: uniform / loguniform / int: [low, high]; choice: [a, b, ...]. With `base`, both bounds (or every choice)
    must be valid values of the key, so a bad range fails here and not in the middle of a sweep.
    """
    if not raw:
        raise ConfigError("the search space is empty; give at least one key, e.g. 'rlc.tau: [0.5, 0.95]'")
    specs = field_specs()
    space = {}
    for key, value in raw.items():
        if key not in specs:
            apply_overrides(Config(), {key: 0})  # raises the unknown-key error naming the closest key
        if key == "train.epochs":
            raise ConfigError("space: train.epochs cannot be searched: it is ASHA's budget (set it in the base config)")
        space[key] = _dimension(key, value)
        if base is not None:
            _check_values(base, key, space[key])
    return space


def _dimension(key: str, value: Any) -> Dimension:
    usage = "expected [low, high] or {uniform|loguniform|int: [low, high]} or {choice: [a, b, ...]}"
    if isinstance(value, (list, tuple)):
        value = {"uniform": list(value)}
    if not (isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in SPACE_KINDS):
        raise ConfigError(f"space: {key}: {usage}; got {value!r}")
    kind, values = next(iter(value.items()))
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"space: {key}: {usage}; got {value!r}")
    if kind == "choice":
        return Dimension("choice", choices=tuple(values))
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"space: {key}: {kind} needs two numbers [low, high]; got {values!r}")
    low, high = float(values[0]), float(values[1])
    if not low < high:
        raise ConfigError(f"space: {key}: low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"space: {key}: loguniform needs low > 0; got {low}")
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"space: {key}: int bounds must be whole numbers; got {values!r}")
    return Dimension(kind, low, high)


def _check_values(base: Config, key: str, dim: Dimension) -> None:
    for value in dim.choices if dim.kind == "choice" else (dim.low, dim.high):
        try:
            apply_overrides(base, {key: value})
        except ConfigError as err:
            raise ConfigError(f"space: {key}: the value {value!r} is not allowed ({err})") from err


def method_space(base: Config) -> dict[str, Dimension]:
    """The space the registry declares for `base.method`, checked against `base`."""
    return parse_space(search_space(base.method), base)


def format_spaces() -> str:
    """Every registered method's search space, one key and range per line."""
    lines = []
    for method in list_methods():
        lines.append(f"{method}:")
        lines += [f"  {key:<28} {kind} {values}" for key, raw in search_space(method).items()
                  for kind, values in raw.items()]
    return "\n".join(lines)


def load_space(path: str | os.PathLike[str], base: Config | None = None) -> dict[str, Dimension]:
    """Read a search space YAML file (same format as `parse_space`)."""
    return parse_space(read_yaml_mapping(path, "config keys to ranges"), base)


def with_learning_rate(space: Mapping[str, Dimension], base: Config, key: str = "optim.lr_feature",
                       factor: float = 10.0) -> dict[str, Dimension]:
    """The space plus `key` searched on a log scale over [base / factor, base * factor] (around the default)."""
    value = to_flat_dict(base)[key]
    return dict(space) | {key: Dimension("loguniform", value / factor, value * factor)}


def default_point(space: Mapping[str, Dimension], base: Config) -> dict[str, Any] | None:
    """The base config's values of the searched keys (the paper's defaults; a loss parameter the config leaves unset:
    the loss's own default), or None when one lies outside."""
    flat = to_flat_dict(base) | loss_defaults(base)
    point = {key: flat[key] for key in space}
    outside = [key for key, dim in space.items() if not dim.contains(point[key])]
    if outside:
        log.warning("the base values of %s lie outside the search space: not evaluated first", ", ".join(outside))
        return None
    return point
