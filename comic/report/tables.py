"""Paper-style tables from ablation statistics (`comic.report.stats.aggregate`): frames of strings and their Markdown
and LaTeX renderings. Numbers in %, two decimals, as in the paper.

- `ours_table`: arms × metrics, each cell "mean ± std (n)".
- `differences_table`: every arm × metric: mean [95 % CI]; for non-reference arms the paired difference vs the
  reference [95 % CI], pairs, paired t-test p, and the verdict ("within noise" when the difference's CI contains 0).
- `cells_table`: one row per (arm, seed) with its state, metrics, cell key and MLflow run.
- `markdown`, `text` and `latex` render any frame; `run_summary` is the console table of one training run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

DASH = "-"


def _ok(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def mean_std(mean: float, std: float, n: int | None = None, digits: int = 2) -> str:
    """'55.08 ± 0.14 (3)'; one seed: '55.08 (1)'; none: '-'. Without `n`: '55.08 ± 0.14', '55.08' or '-'."""
    if n == 0 or not _ok(mean):
        return DASH
    count = "" if n is None else f" ({n})"
    if not _ok(std):
        return f"{mean:.{digits}f}{count}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}{count}"


def interval(low: float, high: float, digits: int = 2, signed: bool = False) -> str:
    """'[53.10, 57.06]' (or with signs); '-' when undefined."""
    if not (_ok(low) and _ok(high)):
        return DASH
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"[{f.format(low)}, {f.format(high)}]"


FEW_PAIRS = 3  # below this a paired t-test rests on one or two differences: a hint, not a finding


def verdict(within_noise: bool | None, p_value: float, pairs: int | None = None) -> str:
    """'within noise', 'real (p=0.002)', or with fewer than FEW_PAIRS pairs 'real? (p=0.03, only 2 seeds)'."""
    if within_noise is None or (isinstance(within_noise, float) and math.isnan(within_noise)):
        return "n/a (< 2 paired seeds)"
    if within_noise:
        return "within noise"
    p = f"p={p_value:.3g}" if _ok(p_value) else ""
    if pairs is not None and pairs < FEW_PAIRS:
        return f"real? ({p + ', ' if p else ''}only {pairs} seeds)"
    return f"real ({p})" if p else "real"


def _index(stats: pd.DataFrame) -> dict[tuple[str, str], Mapping[str, Any]]:
    return {(r["arm"], r["metric"]): r for r in stats.to_dict("records")}


def ours_table(stats: pd.DataFrame, arms: Sequence[str], metrics: Sequence[str], first: str = "arm") -> pd.DataFrame:
    """arms × metrics of 'mean ± std (n)' strings."""
    by = _index(stats)
    rows = []
    for arm in arms:
        row = {first: arm}
        for metric in metrics:
            s = by.get((arm, metric), {})
            row[metric] = mean_std(s.get("mean", math.nan), s.get("std", math.nan), int(s.get("n", 0) or 0))
        rows.append(row)
    return pd.DataFrame(rows, columns=[first, *metrics])


def differences_table(stats: pd.DataFrame, arms: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """arms × metrics: mean and its CI; for non-reference arms the paired difference vs the reference, its CI,
    the number of pairs, the paired t-test p and the verdict."""
    by = _index(stats)
    rows = []
    for arm in arms:
        for metric in metrics:
            s = by.get((arm, metric))
            if s is None:
                continue
            is_reference = not isinstance(s.get("reference"), str)
            diff = s["diff"]
            rows.append({
                "arm": arm, "metric": metric,
                "mean [95% CI]": f"{s['mean']:.2f} {interval(s['ci_low'], s['ci_high'])}" if _ok(s["mean"]) else DASH,
                "vs": DASH if is_reference else s["reference"],
                "diff [95% CI]": (f"{diff:+.2f} {interval(s['diff_ci_low'], s['diff_ci_high'], signed=True)}"
                                  if _ok(diff) else DASH),
                "pairs": int(s["n_pairs"]),
                "p (paired t)": f"{s['p_value']:.3g}" if _ok(s["p_value"]) else DASH,
                "verdict": "reference" if is_reference else verdict(s["within_noise"], s["p_value"],
                                                                    int(s["n_pairs"])),
            })
    return pd.DataFrame(rows, columns=["arm", "metric", "mean [95% CI]", "vs", "diff [95% CI]", "pairs",
                                       "p (paired t)", "verdict"])


def cells_table(rows: pd.DataFrame, metrics: Mapping[str, str]) -> pd.DataFrame:
    """One row per (arm, fold when there are several, seed): state, the table's metrics, cell key and MLflow run."""
    out = []
    folds = "fold" in rows and rows["fold"].nunique() > 1
    for r in rows.to_dict("records"):
        row = {"arm": r["arm"]} | ({"fold": int(r["fold"])} if folds else {})
        row |= {"seed": int(r["seed"]), "state": r.get("state", "")}
        for label, key in metrics.items():
            value = r.get(key, math.nan)
            row[label] = f"{value:.2f}" if _ok(value) else DASH
        row |= {"cell": r["key"], "mlflow run": r.get("run_id") or DASH}
        out.append(row)
    return pd.DataFrame(out)


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub-style Markdown table of the frame's string forms (no index)."""
    header = [str(c) for c in frame.columns]
    body = [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def text(frame: pd.DataFrame) -> str:
    """A fixed-width console table of the frame's string forms: the first column left-aligned, the rest right-aligned
    (no index)."""
    header = [str(c) for c in frame.columns]
    body = [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    def line(cells: list[str]) -> str:  # the first column (row labels) left-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                strict=True)))

    return "\n".join(line(cells) for cells in [header, *body])


def number(value: Any, digits: int = 4) -> str:
    """Floats to `digits` significant digits, NaN / None as '-', anything else as str()."""
    if isinstance(value, float):
        return DASH if math.isnan(value) else f"{value:.{digits}g}"
    return DASH if value is None else str(value)


RUN_GROUPS = {"total": "map", "many": "map_many", "medium": "map_medium", "few": "map_few", "average": "map_avg"}


def run_summary(metrics: Mapping[str, float]) -> str:
    """One run's console summary: val / test mAP (total, shot groups, average) at the best-on-val and the last
    epoch, the label-frequency (chance) baseline and the best epoch."""
    rows = []
    for split in ("val", "test"):
        for label, prefix in (("best", "best/"), ("last", "")):
            values = [metrics.get(f"{prefix}{split}/{key}") for key in RUN_GROUPS.values()]
            if any(_ok(v) for v in values):  # the last epoch has no test pass unless val/map improved there
                rows.append([f"{split} ({label})", *(f"{v:.2f}" if _ok(v) else DASH for v in values)])
    lines = [text(pd.DataFrame(rows, columns=["", *RUN_GROUPS]))]
    chance = metrics.get("test/map_chance", metrics.get("best/test/map_chance"))
    if _ok(chance):
        lines.append(f"label-frequency baseline (chance) test mAP: {chance:.2f}")
    if "best/epoch" in metrics:
        lines.append(f"best epoch by val/map: {int(metrics['best/epoch'])} of {int(metrics.get('epoch', 0))}")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return DASH if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


_LATEX_ESCAPES = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
                  "±": r"$\pm$", "−": r"$-$", "α": r"$\alpha$", "τ": r"$\tau$", "Δ": r"$\Delta$",
                  "~": r"\textasciitilde{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def latex(frame: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs LaTeX table (needs \\usepackage{booktabs}); the first column left-aligned, the rest centred."""
    spec = "l" + "c" * (len(frame.columns) - 1)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_latex_escape(caption)}}}", rf"\label{{{label}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(_latex_escape(str(c)) for c in frame.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex_escape(_cell(v)) for v in row) + r" \\" for row in frame.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)
