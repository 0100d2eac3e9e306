"""Run manifests: canonical JSON with a content-addressed id (sha256 of the canonical form)."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "numpy", "polars", "safetensors", "sqlalchemy", "alembic")


def canonical_json(obj: Any) -> str:
    """Key-sorted, whitespace-free JSON: the form a manifest id is computed from."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def content_id(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical form of the manifest without its `id` field."""
    body = {k: v for k, v in manifest.items() if k != "id"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its content-addressed `id` set."""
    return {**manifest, "id": content_id(manifest)}


def verify_id(manifest: dict[str, Any]) -> bool:
    return manifest.get("id") == content_id(manifest)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def code_version() -> str:
    """Version of this package plus a hash of the attribution core's source files."""
    try:
        version = metadata.version("provider-credit-ledger")
    except metadata.PackageNotFoundError:
        version = "unknown"
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return f"{version}+src.{h.hexdigest()[:12]}"


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
