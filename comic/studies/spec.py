"""What an `ablations/*.py` script declares: one paper table or figure as an `AblationSpec` (arms as dotted COMIC
overrides, metric columns, the paper's numbers), and the `Outcome` a figure builder receives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

# The columns of the paper's shot-group tables (Tables 3-5, Fig. 3): test metrics at the best-on-validation epoch.
SHOT_COLUMNS = {"total": "best/test/map", "many": "best/test/map_many", "medium": "best/test/map_medium",
                "few": "best/test/map_few"}


@dataclass(frozen=True)
class PaperTable:
    """The paper's numbers for the same table, keyed by our arm names; `source` names the table in the paper."""

    source: str
    columns: Sequence[str]
    rows: Mapping[str, Sequence[str]]
    note: str = ""


@dataclass
class Outcome:
    """What a figure builder gets: the spec, the per-(arm, seed) rows, the statistics and the curves."""

    spec: AblationSpec
    arms: list[str]
    rows: pd.DataFrame
    stats: pd.DataFrame
    curves: pd.DataFrame


FigureFn = Callable[[Outcome], "Figure"]


@dataclass(frozen=True)
class AblationSpec:
    """One study as a grid of COMIC overrides. `columns`: table label -> metric key; `paper`: None when the study is
    not a table of the paper (then the report shows ours only); `gap`: a floor and a ceiling arm (e.g. BCE on the
    observed labels and on the full labels) between which the report places every arm."""

    name: str
    title: str
    variants: Mapping[str, Mapping[str, Any]]
    columns: Mapping[str, str]
    paper: PaperTable | None = None
    benchmarks: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"": {}})
    reference: str | None = None
    arm_label: str = "arm"
    figure: FigureFn | None = None
    smoke_variants: Sequence[str] | None = None  # a smaller grid for --smoke-test (None: all)
    gap: tuple[str, str] | None = None  # (floor arm, ceiling arm): report the % of that gap each arm closes
    gap_columns: Sequence[str] = ("total",)  # where floor and ceiling differ enough for a ratio to mean something
    also_against: str | None = None  # a second arm every arm is paired with too (e.g. -HTB: which form beats none)

    def describe(self) -> str:
        """The arms and their overrides, for --help."""
        lines = [f"{self.title}. Arms ({self.arm_label}):"]
        arms = {**self.benchmarks, **self.variants} if len(self.variants) > 1 else self.benchmarks
        for name, overrides in arms.items():
            if name:
                text = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                for k, v in overrides.items()) or "(the base config)"
                lines.append(f"  {name:<28} {text}")
        lines.append("Columns: " + ", ".join(f"{label} = {key}" for label, key in self.columns.items()))
        return "\n".join(lines)
