"""A workspace an auditor can check: moved as a whole and read through a copy of its database,
`ledger verify` passes there; shards and indexes moved apart are pointed at with
`ledger workspace relocate` or `verify --index`, always checked by their recorded hashes; and
a ledger whose paths were recorded absolute is made relative by the upgrade."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from ledger.cli import cli
from ledger.db import make_engine, upgrade


@pytest.fixture
def built(demo_workspace: Path) -> tuple[Path, str]:
    """The demo workspace (never changed: tests move copies of it) and its run's id."""
    engine = make_engine(f"sqlite:///{demo_workspace / 'ledger.db'}")
    try:
        with engine.connect() as conn:
            (run_id,) = conn.execute(text("SELECT id FROM attribution_runs")).scalars().all()
    finally:
        engine.dispose()
    return demo_workspace, run_id


def ledger(cwd: Path, db: Path, *args: str, code: int = 0) -> str:
    """`ledger --db sqlite:///DB ARGS` run in `cwd`: its stdout, or all it printed when it
    must fail (`code`)."""
    res = CliRunner().invoke(cli, ["--db", f"sqlite:///{db}", *args], env={"LEDGER_QUIET": "1"})
    assert res.exit_code == code, (args, res.output, res.exception)
    return res.stdout if code == 0 else res.output


def paths(db: Path) -> list[str]:
    engine = make_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            return [p for (p,) in conn.execute(
                text("SELECT path FROM shards UNION ALL SELECT path FROM gradient_indexes")
            )]  # fmt: skip
    finally:
        engine.dispose()


def moved_copy(built: tuple[Path, str], tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """The workspace moved to a new place (nothing left at the old one), and a fresh copy of
    its database there; the current directory is the moved workspace."""
    staged = tmp_path / "staged"
    shutil.copytree(built[0], staged)
    moved = tmp_path / "elsewhere" / "moved-ws"
    moved.parent.mkdir()
    staged.rename(moved)  # mv
    copy = moved / "audit-copy.db"
    shutil.copyfile(moved / "ledger.db", copy)
    monkeypatch.chdir(moved)
    return moved, copy


def test_a_moved_workspace_verifies_on_a_copy_of_its_database(
    built: tuple[Path, str], tmp_path: Path, monkeypatch
) -> None:
    assert not any(p.startswith("/") for p in paths(built[0] / "ledger.db"))  # stored relative
    (index_dir,) = (built[0] / "indexes").iterdir()  # records its model relative to itself
    assert json.loads((index_dir / "source.json").read_text())["model_dir"] == "../../model"
    moved, db = moved_copy(built, tmp_path, monkeypatch)
    assert not (tmp_path / "staged").exists()
    out = ledger(moved, db, "verify", built[1][:12], "--sample", "2")
    assert "re-computed 2/2 outputs agree" in out and "FAIL" not in out
    check = ledger(moved, db, "workspace", "check", "--format", "csv")
    assert check.count(",ok\n") == 5 and str(moved) in check  # four shards and the index


def test_shards_and_an_index_moved_apart_are_found_by_their_hashes(
    built: tuple[Path, str], tmp_path: Path, monkeypatch
) -> None:
    moved, db = moved_copy(built, tmp_path, monkeypatch)
    apart = tmp_path / "apart"
    shutil.move(moved / "shards", apart / "shards")
    shutil.move(moved / "indexes", apart / "indexes")
    assert "missing" in ledger(moved, db, "workspace", "check", code=1)
    assert "no gradient index here" in ledger(moved, db, "verify", built[1][:12], code=1)
    (index_dir,) = (apart / "indexes").iterdir()
    out = ledger(moved, db, "verify", built[1][:12], "--sample", "1", "--index", str(index_dir))
    assert "re-computed 1/1 outputs agree" in out

    # A tampered shard at the new place: relocating is refused and nothing changes.
    shard = next((apart / "shards").iterdir())
    original = shard.read_bytes()
    shard.write_bytes(original.replace(b"the", b"teh", 1))
    before = paths(db)
    error = ledger(moved, db, "workspace", "relocate", str(moved), str(apart), code=1)
    assert shard.name in error and "sha256" in error and paths(db) == before
    shard.write_bytes(original)
    ledger(moved, db, "workspace", "relocate", str(moved), str(apart))
    assert all(p.startswith(str(apart)) for p in paths(db))
    ledger(moved, db, "workspace", "check")
    # The index, now apart from the model it records next to itself, is told where it is.
    error = ledger(moved, db, "verify", built[1][:12], "--sample", "1", code=1)
    assert f"{apart / 'model'}: model directory not found" in error
    out = ledger(moved, db, "verify", built[1][:12], "--sample", "1", "--model",
                 str(moved / "model"))  # fmt: skip
    assert "re-computed 1/1 outputs agree" in out


def test_the_upgrade_stores_paths_inside_the_workspace_relative(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine, "0006")
    inside, outside = str(tmp_path / "shards" / "a.jsonl"), "/elsewhere/b.jsonl"
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO providers (id, name, created_at) "
                          "VALUES (1, 'p', '2024-01-01')"))  # fmt: skip
        for i, path in enumerate((inside, outside)):
            conn.execute(
                text("INSERT INTO shards (path, sha256, provider_id, row_count, created_at) "
                     "VALUES (:p, :s, 1, 1, '2024-01-01')"),
                {"p": path, "s": str(i) * 64},
            )  # fmt: skip
        conn.execute(text("INSERT INTO gradient_indexes (id, path, manifest, status, created_at) "
                          f"VALUES ('{'9' * 64}', '{tmp_path}/indexes/x', '{{}}', 'finished', "
                          "'2024-01-01')"))  # fmt: skip
    upgrade(engine)
    engine.dispose()
    assert sorted(paths(db)) == sorted(["shards/a.jsonl", outside, "indexes/x"])
