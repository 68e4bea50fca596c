"""Section 1: the scale table, alpha / r next to alpha / sqrt(r)."""

from __future__ import annotations

from ..scaling import scale_table


def run(cfg) -> dict:
    rows = scale_table(cfg.table_alpha, cfg.table_ranks)
    return {"alpha": cfg.table_alpha,
            "rows": [{"r": row["r"], "standard": row["standard"], "rslora": row["rslora"],
                      "ratio": row["rslora"] / row["standard"]} for row in rows]}
