"""The first release's tables.

Runs databases made before migrations existed have no alembic_version; `core.db.init_db` starts them here,
so this revision only creates the tables they lack and keeps the ones they have (rows and all).

Revision ID: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _tables(sqlite: bool) -> dict[str, list]:
    # jobs.run_id and runs.job_id point at each other: SQLite takes jobs' key inline (it checks it only on
    # writes), other databases get it once runs exists (see upgrade).
    jobs_run_key = [sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_jobs_run_id", ondelete="SET NULL")]
    return {
        "datasets": [
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", sa.String(200), nullable=False),
            sa.Column("source", sa.Text, nullable=False),
            sa.Column("fingerprint", sa.String(128), nullable=False, unique=True),
            sa.Column("n_images", sa.Integer, nullable=False),
            sa.Column("n_classes", sa.Integer, nullable=False),
            sa.Column("n_skipped", sa.Integer, nullable=False),
            sa.Column("created", sa.DateTime, nullable=False),
        ],
        "models": [
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", sa.String(200), nullable=False, unique=True),
            sa.Column("source", sa.Text, nullable=False),
            sa.Column("dim", sa.Integer),
        ],
        "embedding_sets": [
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False,
                      index=True),
            sa.Column("model_name", sa.String(200), nullable=False),
            sa.Column("cache_key", sa.String(256), nullable=False),
            sa.Column("path", sa.Text, nullable=False),
            sa.Column("n", sa.Integer, nullable=False),
            sa.Column("dim", sa.Integer, nullable=False),
            sa.Column("dtype", sa.String(32), nullable=False),
            sa.Column("created", sa.DateTime, nullable=False),
            sa.UniqueConstraint("dataset_id", "cache_key", name="uq_embedding_sets_dataset_key"),
        ],
        "jobs": [
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("kind", sa.String(32), nullable=False, index=True),
            sa.Column("params", sa.JSON, nullable=False),
            sa.Column("params_hash", sa.String(64), nullable=False, index=True),
            sa.Column("status", sa.String(16), nullable=False, index=True),
            sa.Column("progress", sa.Float, nullable=False),
            sa.Column("message", sa.Text, nullable=False),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("worker_id", sa.String(200)),
            sa.Column("heartbeat_at", sa.DateTime),
            sa.Column("cancel_requested", sa.Boolean, nullable=False),
            sa.Column("error", sa.Text),
            sa.Column("run_id", sa.Integer),
            sa.Column("created", sa.DateTime, nullable=False),
            sa.Column("started", sa.DateTime),
            sa.Column("finished", sa.DateTime),
            *(jobs_run_key if sqlite else []),
        ],
        "runs": [
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("kind", sa.String(32), nullable=False, index=True),
            sa.Column("title", sa.Text, nullable=False),
            sa.Column("config", sa.JSON, nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("started", sa.DateTime, nullable=False),
            sa.Column("finished", sa.DateTime),
            sa.Column("duration_s", sa.Float),
            sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id", ondelete="SET NULL"), index=True),
            sa.Column("error", sa.Text),
            sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="SET NULL"), index=True),
        ],
        "results": [
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False, index=True),
            sa.Column("method", sa.Text, nullable=False),
            sa.Column("weights", sa.JSON),
            sa.Column("metrics", sa.JSON, nullable=False),
            sa.Column("split", sa.String(32), nullable=False),
            sa.Column("is_oracle", sa.Boolean, nullable=False),
            sa.Column("extra", sa.JSON),
        ],
        "run_curves": [
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False, index=True),
            sa.Column("step", sa.Integer, nullable=False),
            sa.Column("values", sa.JSON, nullable=False),
            sa.Column("created", sa.DateTime, nullable=False),
        ],
        "workers": [
            sa.Column("id", sa.String(200), primary_key=True),
            sa.Column("host", sa.String(200), nullable=False),
            sa.Column("pid", sa.Integer, nullable=False),
            sa.Column("kinds", sa.JSON),
            sa.Column("started", sa.DateTime, nullable=False),
            sa.Column("heartbeat_at", sa.DateTime, nullable=False, index=True),
            sa.Column("current_job_id", sa.Integer),
            sa.Column("stopped", sa.DateTime),
        ],
    }


def upgrade() -> None:
    bind = op.get_bind()
    sqlite = bind.dialect.name == "sqlite"
    existing = set(sa.inspect(bind).get_table_names())
    created = set()
    for name, columns in _tables(sqlite).items():
        if name not in existing:
            op.create_table(name, *columns)
            created.add(name)
    if not sqlite and "jobs" in created:
        op.create_foreign_key("fk_jobs_run_id", "jobs", "runs", ["run_id"], ["id"], ondelete="SET NULL")


def downgrade() -> None:
    raise NotImplementedError("The runs database is not downgraded: restore the backup that the upgrade wrote "
                              "beside it (runs.db.bak-<revision>-<time>) or your own PostgreSQL dump instead.")
