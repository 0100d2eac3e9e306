"""Whether a directory already holds a demo workspace, and clearing one for `ledger demo --force`.

Kept apart from `ledger.demo` (which imports torch to train the model) so that re-running the
demo on a finished workspace answers at once.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

DEMO_FILES = ("ledger.db", "indexes", "model", "shards", "queries.jsonl")
"""What `ledger demo` writes into its directory (with the SQLite ledger's side files)."""


def demo_state(root: Path) -> str:
    """`new` (no demo file there), `finished` (its statement was built) or `unfinished`."""
    if not any((root / name).exists() for name in DEMO_FILES):
        return "new"
    db = root / "ledger.db"
    if not db.is_file():
        return "unfinished"
    try:
        # Read without a trace: no -wal or -shm file is made unless the ledger has one already.
        wal = db.with_name(db.name + "-wal").exists()
        connection = sqlite3.connect(
            f"{db.as_uri()}?{'mode=ro' if wal else 'immutable=1'}", uri=True
        )
        try:
            runs, statements = connection.execute(
                "SELECT (SELECT COUNT(*) FROM attribution_runs WHERE status = 'finished'), "
                "(SELECT COUNT(*) FROM statements)"
            ).fetchone()
        finally:
            connection.close()
    except sqlite3.Error:  # not a ledger, or one from before its tables were made
        return "unfinished"
    return "finished" if runs and statements else "unfinished"


def clear_demo(root: Path) -> None:
    """Remove what `ledger demo` wrote into `root`, and nothing else."""
    for name in DEMO_FILES:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for side in [*root.glob("ledger.db-wal"), *root.glob("ledger.db-shm"),
                 *root.glob("ledger.db.run-*.lock")]:  # fmt: skip
        side.unlink()
