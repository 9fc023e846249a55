"""Columns added after the first release: each result's method stored as data (kind, models, head_path,
options, selected_on), a run's summary, and an embedding set's measured cost per image and its device.

Databases from releases in between have some of these columns already: only the missing ones are added.
Where the method columns are new, their values are read back from what the first release stored.

Revision ID: 0002
Revises: 0001
"""
import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# NOT NULL columns take the ORM's default for the rows already there (a column added NOT NULL needs one).
_ADDED_COLUMNS = {
    "results": [
        sa.Column("kind", sa.String(16), nullable=False, server_default="single"),
        sa.Column("models", sa.JSON, nullable=False, server_default="[]"),
        sa.Column("head_path", sa.Text),
        sa.Column("options", sa.JSON),
        sa.Column("selected_on", sa.String(16), nullable=False, server_default="none"),
    ],
    "runs": [sa.Column("summary", sa.JSON)],
    "embedding_sets": [sa.Column("seconds_per_image", sa.Float), sa.Column("device", sa.String(64))],
}


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    added = set()
    for table, columns in _ADDED_COLUMNS.items():
        present = {c["name"] for c in inspector.get_columns(table)}
        for column in columns:
            if column.name not in present:
                op.add_column(table, column)
                added.add((table, column.name))
    if ("results", "kind") not in added:  # the method was already stored as data
        return
    rows = bind.execute(sa.text(
        "SELECT results.id, results.method, results.weights, results.is_oracle, results.extra, runs.kind "
        "FROM results JOIN runs ON runs.id = results.run_id")).all()
    for row in rows:
        bind.execute(
            sa.text("UPDATE results SET kind = :kind, models = :models, weights = :weights, head_path = :head_path, "
                    "selected_on = :selected_on, extra = :extra WHERE id = :id"),
            {"id": row.id, **_inferred_method(row)})


def _inferred_method(row) -> dict[str, Any]:
    """What the first release left implicit, read back from its rows."""
    load = lambda value: json.loads(value) if isinstance(value, str) else value  # noqa: E731
    extra, weights = dict(load(row.extra) or {}), load(row.weights)
    run_kind = extra.get("source_run_kind", row.kind)
    models = list(extra.get("models") or ())
    head_path = extra.get("head_path")
    if weights is not None and run_kind == "sweep":
        extra["vector"] = weights  # the sweep table shows each row's weights as swept
    if run_kind == "train_head" or head_path:
        kind, selected_on, weights = "head", "validation", None
    elif weights is not None and sum(1 for w in weights if w) > 1:
        kind, selected_on = "concat", "eval" if row.is_oracle else "train"
    else:
        kind, selected_on, head_path = "single", "none", None
        if weights is not None and models:
            models = [m for m, w in zip(models, weights) if w][:1]
        models, weights = models or [row.method], None
    return {"kind": kind, "models": json.dumps(models), "weights": json.dumps(weights) if weights is not None else None,
            "head_path": head_path, "selected_on": selected_on, "extra": json.dumps(extra)}


def downgrade() -> None:
    raise NotImplementedError("The runs database is not downgraded: restore the backup that the upgrade wrote "
                              "beside it (runs.db.bak-<revision>-<time>) or your own PostgreSQL dump instead.")
