"""Tables as people read them: counts as integers, a missing value as '-', means with ± std."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd


def _is_count(values: pd.Series, std: pd.Series | None) -> bool:
    """Integer-typed, or integer-valued in every row, the same in every seed, and not a rate (some
    value above 1)."""
    if pd.api.types.is_integer_dtype(values):
        return True
    finite = [float(v) for v in values if _finite(v)]
    spread = [] if std is None else [float(s) for s in std if _finite(s)]
    return bool(finite) and all(v == round(v) for v in finite) and max(map(abs, finite)) > 1 and not any(spread)


def _is_count_over_seeds(values: pd.Series, std: pd.Series | None, seeds: pd.Series | None) -> bool:
    """Means of integers over seeds (a round, a number of clients): each mean times its seed count
    is a whole number, a mean the seeds agree on (no spread) is itself whole (2.5 in every seed is
    a ratio, not a count), and some value is above 1 (not a rate)."""
    if std is None or seeds is None:
        return False
    rows = [(float(v), float(n), s) for v, n, s in zip(values, seeds, std, strict=True) if _finite(v) and _finite(n)]
    whole = all(abs(v * n - round(v * n)) < 1e-6 for v, n, _ in rows)
    agreed_whole = all(v == round(v) for v, _, s in rows if not _spread(s))
    return bool(rows) and whole and agreed_whole and max(abs(v) for v, _, _ in rows) > 1


def _spread(std: Any) -> bool:
    """Whether a std says the seeds differ (NaN: a single seed, no spread)."""
    return _finite(std) and std != 0


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def readable(table: pd.DataFrame, digits: int = 4) -> str:
    """Markdown of `table` as `readable_cells` writes it."""
    shown, align = readable_cells(table, digits)
    return shown.to_markdown(index=False, disable_numparse=True, colalign=align)


def readable_cells(table: pd.DataFrame, digits: int = 4) -> tuple[pd.DataFrame, list[str]]:
    """`table` as text cells, with each column's alignment: a column with `<name>_std` beside it as
    mean ± std; integer counts as integers (a mean of counts over seeds as an integer when the seeds
    agree, else with one decimal); NaN or inf as '-' (no value: a speedup over a method that
    trained nothing, a distance that was not kept); other numbers with `digits` decimals."""
    shown, align = {}, []
    for column in (c for c in table.columns if not str(c).endswith("_std")):
        values = table[column]
        std = table[f"{column}_std"] if f"{column}_std" in table.columns else None
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            shown[column] = ["-" if pd.isna(v) else str(v) for v in values]
            align.append("left")
            continue
        count = _is_count(values, std)
        counts_over_seeds = not count and _is_count_over_seeds(values, std, table.get("seeds"))
        cells = []
        for row, value in enumerate(values):
            if not _finite(value):
                cells.append("-")
            elif count or (counts_over_seeds and not _spread(std.iloc[row])):  # type: ignore[union-attr]
                cells.append(str(int(round(float(value)))))
            elif counts_over_seeds:
                cells.append(f"{float(value):.1f} ± {float(std.iloc[row]):.1f}")  # type: ignore[union-attr]
            else:
                cell = f"{float(value):.{digits}f}"
                if std is not None and _finite(std.iloc[row]):
                    cell += f" ± {float(std.iloc[row]):.{digits}f}"
                cells.append(cell)
        shown[column] = cells
        align.append("right")
    return pd.DataFrame(shown, columns=list(shown)), align


AUDIT_COLUMNS = ("balanced_accuracy", "balanced_accuracy_relabelled", "null_95", "chance", "NDCG@10")


def audit_columns(audits: pd.DataFrame) -> list[str]:
    """The global audit's figures a table shows, those the audits hold (null_95: since 2026-12-07)."""
    return [column for column in AUDIT_COLUMNS if column in audits]


def privacy_summary(table: pd.DataFrame) -> pd.DataFrame:
    """The demo's short table: per defence, attribute and attacker on the embeddings, the global
    balanced accuracy (as answered, and relabelled: a below-chance attacker flipped, the information
    left) against the relabelled figure's null band and chance, the local audit's share at risk, and
    NDCG@10."""
    embedding = table[table["view"] == "embedding"]
    keys = ["defence", "attribute", "attacker"]
    columns = [*keys, *audit_columns(embedding)]
    global_rows = embedding[embedding["audit"] == "global"][columns]
    local = embedding[embedding["audit"] == "local"]
    if local.empty:  # audit.local = false
        return global_rows
    local_rows = local[[*keys, "at_risk"]].rename(columns={"at_risk": "local_at_risk"})
    return global_rows.merge(local_rows, on=keys, how="left")
