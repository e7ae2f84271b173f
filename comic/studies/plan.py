"""The grid of an ablation study and its content addresses: arms × folds × seeds -> cells, each with a key.

A `Study` names its arms (variants: dicts of dotted overrides of the base config; benchmark variants: overrides of
`data.*`, each building its own benchmark) and its seeds. Every (arm, seed) is a `Cell` whose key is the run
identity (`comic.config.identity_hash`) of

  the resolved config (less the keys that only say how a run executes: paths, workers, threads, progress, ...)
  + the benchmark's content digest (its card's parameters, annotation checksums and label counts; not its paths)
  + the code version (a hash of the library's computing code, `comic.tracking.provenance.code_version`).

Two arms that resolve to the same config share one cell (e.g. a default point named in two grids).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from comic._io import stable_hash
from comic.cli import check_seeds
from comic.config import Config, ConfigError, apply_overrides, identity_hash, to_flat_dict
from comic.data.build import benchmark_digest
from comic.tracking.provenance import code_version


@dataclass(frozen=True)
class Arm:
    """One row of a table: a variant on a benchmark variant, with their merged overrides."""

    name: str
    variant: str
    benchmark: str
    overrides: Mapping[str, Any]


@dataclass(frozen=True)
class Study:
    """A grid: `variants` × `benchmarks` × `seeds`. `reference` names the variant (or, with one variant, the
    benchmark variant) every other arm is compared with; default: the first."""

    name: str
    variants: Mapping[str, Mapping[str, Any]]
    seeds: Sequence[int]
    benchmarks: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"": {}})
    reference: str | None = None
    folds: int = 0  # k >= 2: every arm and seed on each of k disjoint test folds (`comic.data.folds`)
    # (variant, fold) -> overrides of that variant on that fold only: a configuration selected on each fold's own
    # training and validation data (the tuned study) differs from fold to fold.
    per_fold: Mapping[tuple[str, int], Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not self.variants or not self.benchmarks:
            raise ConfigError("a study needs a name, at least one variant and at least one benchmark variant")
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(f"folds={self.folds}: give 0 (the benchmark's own test set) or k >= 2 (--folds)")
        check_seeds(self.seeds)
        names = self.variants if self._compare_variants else self.benchmarks
        if self.reference is not None and self.reference not in names:
            raise ConfigError(f"reference={self.reference!r} is not one of {', '.join(map(repr, names))}")
        for bench in self.benchmarks.values():
            bad = [k for k in bench if not k.startswith("data.")]
            if bad:
                raise ConfigError(f"benchmark variants may only set data.* keys, got {bad}; put them in a variant")

    def fold_ids(self) -> list[int]:
        """The test folds every arm runs on: 0 .. k-1, or [0] (the benchmark's own test set) without folds."""
        return list(range(self.folds)) if self.folds else [0]

    def fold_overrides(self, fold: int, variant: str = "") -> dict[str, Any]:
        """The data keys of test fold `fold`, and what `per_fold` sets for `variant` there."""
        own = dict(self.per_fold.get((variant, fold), {}))
        return ({"data.folds": self.folds, "data.fold": fold} if self.folds else {}) | own

    def arms(self) -> list[Arm]:
        """Benchmark-major order: each benchmark variant's arms in variant order."""
        out = []
        for bench, bench_overrides in self.benchmarks.items():
            for variant, overrides in self.variants.items():
                out.append(Arm(self._arm_name(variant, bench), variant, bench, {**bench_overrides, **overrides}))
        return out

    def _arm_name(self, variant: str, bench: str) -> str:
        if len(self.benchmarks) == 1:
            return variant
        return bench if len(self.variants) == 1 else f"{bench} / {variant}"

    @property
    def _compare_variants(self) -> bool:
        """Arms are compared across variants (on each benchmark), unless the only dimension is the benchmarks."""
        return len(self.variants) > 1 or len(self.benchmarks) == 1

    def references(self) -> dict[str, str | None]:
        """arm name -> the arm it is compared with (None for a reference arm): the reference variant on the same
        benchmark when there are several variants, else the reference benchmark variant."""
        ref_variant = self.reference or next(iter(self.variants))
        ref_bench = self.reference or next(iter(self.benchmarks))
        out: dict[str, str | None] = {}
        for arm in self.arms():
            ref = (self._arm_name(ref_variant, arm.benchmark) if self._compare_variants
                   else self._arm_name(arm.variant, ref_bench))
            out[arm.name] = None if ref == arm.name else ref
        return out


@dataclass(frozen=True)
class Cell:
    arm: Arm
    seed: int
    config: Config
    key: str
    dataset: str  # content digest of the benchmark
    fold: int = 0  # the test fold (0 without folds)


# --------------------------------------------------------------------------------------------- content addresses


def cell_key(cfg: Config, dataset: str, code: str) -> str:
    """The cell's content address: the run identity of `cfg` with the dataset digest and the code version."""
    return identity_hash(cfg, dataset=dataset, code=code)


def plan(study: Study, base: Config, code: str | None = None) -> list[Cell]:
    """Every (arm, fold, seed) cell of `study` on `base`, arm-major then fold-major; builds each benchmark (variant
    and fold) once if missing."""
    code = code or code_version()
    digests: dict[str, str] = {}
    cells = []
    for arm in study.arms():
        for fold in study.fold_ids():
            for seed in study.seeds:
                try:
                    cfg = apply_overrides(base, {**arm.overrides, **study.fold_overrides(fold, arm.variant),
                                                 "seed": seed})
                except ConfigError as err:
                    raise ConfigError(f"arm {arm.name!r}: {err}") from err
                data_id = stable_hash({k: v for k, v in to_flat_dict(cfg).items() if k.startswith("data.")})
                if data_id not in digests:
                    digests[data_id] = benchmark_digest(cfg.data)
                cells.append(Cell(arm, seed, cfg, cell_key(cfg, digests[data_id], code), digests[data_id], fold))
    return cells
