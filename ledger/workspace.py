"""A workspace that can be moved or copied as a whole: database, shards, indexes and model.

Paths of shards and indexes that lie inside the workspace are stored relative to its root: the
directory of the SQLite database file, or on PostgreSQL the root recorded in
``ledger_settings`` (set by ``ledger workspace relocate``). Paths recorded absolute (before
migration 0007, or in an index's ``source.json``) that lie under the root recorded when they
were written are looked for at the same place under the root where the workspace is now.
Files found at a new place are always checked by their recorded hashes before they are used
(`ledger workspace check`, `ledger verify`, `ledger index`), and `relocate` rewrites the
stored paths of files moved apart from the database.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from ledger import models as m
from ledger.errors import LedgerError

ROOT_SETTING = "workspace_root"


def _inside(path: str, root: Path) -> bool:
    try:
        return os.path.commonpath([str(root), path]) == str(root)
    except ValueError:  # another drive, or a mix of relative and absolute
        return False


@dataclass(frozen=True)
class Workspace:
    root: Path | None
    """Where the workspace is now: relative stored paths are relative to it."""
    recorded: Path | None
    """Where it was when absolute paths were recorded (the ``workspace_root`` setting)."""

    @classmethod
    def of(cls, session: Session) -> Workspace:
        """The workspace of the ledger `session` is connected to."""
        bind = session.get_bind()
        recorded = None
        if inspect(bind).has_table(m.Setting.__tablename__):
            value = session.scalar(select(m.Setting.value).where(m.Setting.name == ROOT_SETTING))
            recorded = Path(value) if value else None
        database = bind.url.database if bind.dialect.name == "sqlite" else None
        if database not in (None, "", ":memory:") and not bind.url.query.get("uri"):
            return cls(Path(os.path.realpath(database)).parent, recorded)
        return cls(recorded, recorded)

    def store(self, path: str | os.PathLike[str]) -> str:
        """How a path is stored: relative to the root (with "/") when inside it, else absolute."""
        absolute = os.path.realpath(path)
        if self.root is not None and _inside(absolute, self.root):
            return Path(os.path.relpath(absolute, self.root)).as_posix()
        return absolute

    def relative_to(self, path: str | os.PathLike[str], base: str | os.PathLike[str]) -> str:
        """`path` relative to the directory `base` when both lie inside the workspace (they then
        move together), else absolute."""
        absolute, start = os.path.realpath(path), os.path.realpath(base)
        if self.root is not None and _inside(absolute, self.root) and _inside(start, self.root):
            return os.path.relpath(absolute, start)
        return absolute

    def locate(self, stored: str) -> str:
        """Where the file or directory stored as `stored` is now (it may not exist)."""
        if not os.path.isabs(stored):
            return str((self.root or Path.cwd()) / stored)
        if self.root is not None and self.recorded is not None and self.root != self.recorded:
            if _inside(stored, self.recorded):
                moved = self.root / os.path.relpath(stored, self.recorded)
                if moved.exists():
                    return str(moved)
        return stored


def set_root(session: Session, root: Path) -> None:
    """Record `root` as the workspace's root (``ledger_settings.workspace_root``)."""
    setting = session.get(m.Setting, ROOT_SETTING)
    if setting is None:
        session.add(m.Setting(name=ROOT_SETTING, value=str(root)))
    else:
        setting.value = str(root)
    session.flush()


@dataclass(frozen=True)
class Located:
    kind: str
    """"shard" or "index"."""
    stored: str
    found: str
    ok: bool
    problem: str | None = None


def _check_shard(shard: m.Shard, path: str) -> str | None:
    from attribution.data import sha256_file

    if not os.path.isfile(path):
        return "missing"
    if sha256_file(path) != shard.sha256:
        return f"content differs from the registered sha256 {shard.sha256[:12]}"
    return None


def _check_index(row: m.GradientIndex, path: str) -> str | None:
    """None when `path` holds the index `row` registered: its manifest's id verifies, is the
    registered id, and every block file has the sha256 the manifest records."""
    from attribution.data import sha256_file
    from attribution.manifest import verify_id
    from attribution.store import GradientIndex
    from attribution.types import IndexDamagedError

    if not os.path.isdir(path):
        return "missing"
    try:
        index = GradientIndex.open(path)
    except (IndexDamagedError, OSError, ValueError) as exc:
        return f"not a readable index ({str(exc).splitlines()[0]})"
    if not verify_id(index.manifest) or index.id != row.id:
        return f"holds index {index.id[:16]}, not {row.id[:16]}"
    blocks = [sha256_file(f) for f in index.block_files()]
    if blocks != [b["sha256"] for b in index.manifest["blocks"]]:
        return "a block file differs from the sha256 its manifest records"
    return None


def check_workspace(session: Session) -> list[Located]:
    """Every registered shard and index: where it is now, and whether it is the file that
    was registered (by its hashes)."""
    ws = Workspace.of(session)
    out = []
    for shard in session.scalars(select(m.Shard).order_by(m.Shard.path)):
        found = ws.locate(shard.path)
        problem = _check_shard(shard, found)
        out.append(Located("shard", shard.path, found, problem is None, problem))
    for row in session.scalars(select(m.GradientIndex).order_by(m.GradientIndex.created_at)):
        found = ws.locate(row.path)
        problem = _check_index(row, found)
        out.append(Located("index", row.path, found, problem is None, problem))
    return out


def relocate(session: Session, old: str, new: str) -> list[Located]:
    """Point every shard and index found under `old` (as stored, or where it is now) at the
    same place under `new`, each checked by its hashes there first; nothing is changed if
    any is not the registered file. On PostgreSQL a recorded root under `old` moves too."""
    ws = Workspace.of(session)
    old_root, new_root = Path(os.path.abspath(old)), Path(os.path.abspath(new))
    if not new_root.is_dir():
        raise LedgerError(f"{new}: no such directory")
    planned: list[tuple[object, Located]] = []
    rows = [("shard", s) for s in session.scalars(select(m.Shard))] + [
        ("index", i) for i in session.scalars(select(m.GradientIndex))
    ]
    for kind, row in rows:
        where = next(
            (
                p
                for p in (ws.locate(row.path), row.path)
                if os.path.isabs(p) and _inside(p, old_root)
            ),
            None,
        )
        if where is None:
            continue
        target = str(new_root / os.path.relpath(where, old_root))
        problem = _check_shard(row, target) if kind == "shard" else _check_index(row, target)
        if problem is not None:
            raise LedgerError(f"{kind} {row.path} at {target}: {problem}; nothing was relocated")
        planned.append((row, Located(kind, row.path, target, True)))
    if not planned:
        raise LedgerError(f"no registered shard or index lies under {old}")
    if ws.recorded is not None and _inside(str(ws.recorded), old_root):
        moved = new_root / os.path.relpath(ws.recorded, old_root)
        set_root(session, moved)
        ws = Workspace(ws.root if ws.root != ws.recorded else moved, moved)
    for row, located in planned:
        row.path = ws.store(located.found)
    session.flush()
    return [located for _, located in planned]
