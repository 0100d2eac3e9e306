"""Providers, training shards and gradient indexes known to the ledger."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from attribution.data import read_shard_texts, sha256_file
from attribution.types import InputError
from ledger.errors import ConflictError, LedgerError, NotFoundError
from ledger.models import GradientIndex, Provider, Shard, utcnow

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def canonical_json(document: Any) -> str:
    """The canonical JSON text of a manifest: sorted keys, no insignificant whitespace."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise LedgerError(f"invalid provider name {name!r}: must be a non-empty string")
    name = name.strip()
    limit = Provider.__table__.c.name.type.length
    if len(name) > limit:
        raise LedgerError(f"invalid provider name {name[:40]!r}…: longer than {limit} characters")
    if "\x00" in name:
        raise LedgerError(f"invalid provider name {name!r}: contains a NUL character")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (undecodable bytes on the command line)
        raise LedgerError(f"invalid provider name {name!r}: not valid Unicode text") from exc
    return name


def check_sha256(value: str, what: str) -> str:
    if not isinstance(value, str) or _HEX64.fullmatch(value) is None:
        raise LedgerError(f"invalid {what} {value!r}: expected 64 hexadecimal characters")
    return value.lower()


def add_provider(session: Session, name: str) -> Provider:
    """Register a new provider; raises `ConflictError` if the name is already registered."""
    name = _check_name(name)
    if session.scalar(select(Provider).where(Provider.name == name)) is not None:
        raise ConflictError(f"provider {name!r} already exists")
    provider = Provider(name=name, created_at=utcnow())
    session.add(provider)
    session.flush()
    return provider


def get_or_create_provider(session: Session, name: str) -> Provider:
    """The provider called `name`, registering it first if it is new."""
    name = _check_name(name)
    provider = session.scalar(select(Provider).where(Provider.name == name))
    return provider if provider is not None else add_provider(session, name)


def get_provider(session: Session, name: str) -> Provider:
    """The provider called `name`; raises `NotFoundError` if it is not registered."""
    provider = session.scalar(select(Provider).where(Provider.name == name))
    if provider is None:
        raise NotFoundError(f"unknown provider {name!r}")
    return provider


def list_providers(session: Session) -> list[Provider]:
    """All providers, by name."""
    return list(session.scalars(select(Provider).order_by(Provider.name)))


def add_shard(session: Session, path: str, sha256: str, provider: str, rows: int) -> Shard:
    """Register a training shard, creating its provider if needed.

    Registering the same path again with the same content is a no-op that returns the existing
    shard; the same path with a different sha256 raises `ConflictError` ("content changed"), as
    does the same path under a different provider or row count. Content already registered
    under another path raises `ConflictError` too (the index would hold its rows twice), unless
    both paths name the same file (a symbolic link): then the existing shard is returned.
    """
    from ledger.workspace import Workspace

    sha256 = check_sha256(sha256, "shard sha256")
    if not isinstance(rows, int) or rows < 0:
        raise LedgerError(f"shard {path!r}: row count {rows!r} must be a non-negative integer")
    workspace = Workspace.of(session)
    existing = session.scalar(select(Shard).where(Shard.path == path))
    if existing is not None:
        if existing.sha256 != sha256:
            raise ConflictError(
                f"shard {path!r}: content changed (registered sha256 {existing.sha256}, "
                f"now {sha256}); register the new content under a new path"
            )
        if existing.provider.name != provider or existing.row_count != rows:
            raise ConflictError(
                f"shard {path!r} is registered for provider {existing.provider.name!r} with "
                f"{existing.row_count} rows, not {provider!r} with {rows}"
            )
        return existing
    same_content = session.scalar(select(Shard).where(Shard.sha256 == sha256))
    if same_content is not None:
        if os.path.realpath(workspace.locate(same_content.path)) == os.path.realpath(
            workspace.locate(path)
        ):
            return add_shard(session, same_content.path, sha256, provider, rows)
        raise ConflictError(
            f"shard {path!r}: the same content is already registered as {same_content.path!r} "
            f"(provider {same_content.provider.name!r}); a copy would count its rows twice"
        )
    shard = Shard(
        path=path,
        sha256=sha256,
        provider=get_or_create_provider(session, provider),
        row_count=rows,
        created_at=utcnow(),
    )
    session.add(shard)
    session.flush()
    return shard


def list_shards(session: Session) -> list[Shard]:
    """All shards, by path."""
    return list(session.scalars(select(Shard).order_by(Shard.path)))


def register_index(
    session: Session, index_id: str, path: str, manifest: dict[str, Any]
) -> GradientIndex:
    """Record a gradient index by its content-addressed id (idempotent for the same manifest).

    The same id with a different manifest raises `ConflictError`.
    """
    index_id = check_sha256(index_id, "index id")
    text = canonical_json(manifest)
    existing = session.get(GradientIndex, index_id)
    if existing is not None:
        if existing.manifest != text:
            raise ConflictError(f"index {index_id} is already registered with another manifest")
        if existing.path != path:
            existing.path = path
        return existing
    now = utcnow()
    index = GradientIndex(
        id=index_id, path=path, manifest=text, status="finished", created_at=now, finished_at=now
    )
    session.add(index)
    session.flush()
    return index


def get_index(session: Session, index_id: str) -> GradientIndex:
    """The gradient index with this id; raises `NotFoundError` otherwise."""
    index = session.get(GradientIndex, index_id)
    if index is None:
        raise NotFoundError(f"unknown gradient index {index_id!r}")
    return index


def register_shards(engine: Engine, paths: list[str], provider: str) -> list[Shard]:
    """Validate every row of every shard, then register them all in one transaction."""
    from ledger.db import session_scope
    from ledger.workspace import Workspace

    specs = []
    for path in paths:
        if not os.path.isfile(path):
            raise InputError(path, None, None, "shard file not found")
        rows = sum(1 for _ in read_shard_texts(path))  # every row is validated here
        if rows == 0:
            raise InputError(path, None, None, "no rows: a shard needs at least one text")
        specs.append((os.path.abspath(path), sha256_file(path), rows))
    with session_scope(engine) as session:
        get_provider(session, provider)
        workspace = Workspace.of(session)  # inside it, paths are stored relative to it
        added = [
            add_shard(session, workspace.store(path), sha, provider, rows)
            for path, sha, rows in specs
        ]
        return list({shard.id: shard for shard in added}.values())  # a path given twice: once
