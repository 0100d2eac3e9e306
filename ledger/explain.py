"""The texts behind an explanation: an output's prompt and completion, and the training
examples that influenced it most, read from the queries file and the registered shards and
checked against what the ledger recorded (the output's text sha256, each shard's sha256)."""

from __future__ import annotations

import json
import os
from typing import Any

from sqlalchemy.orm import Session

from attribution.data import read_jsonl, read_shard_texts, sha256_file
from attribution.types import InputError
from ledger import models as m
from ledger.recording import get_run


def shard_names(paths: list[str]) -> dict[str, str]:
    """Shard name (as example ids and the index record it) → registered path: the file name,
    with a hash of the path added where two shards share a file name (as `ledger index`)."""
    import hashlib

    counts: dict[str, int] = {}
    for path in paths:
        counts[os.path.basename(path)] = counts.get(os.path.basename(path), 0) + 1
    names = {}
    for path in paths:
        base = os.path.basename(path)
        digest = hashlib.sha256(path.encode()).hexdigest()[:8]
        names[base if counts[base] == 1 else f"{base}@{digest}"] = path
    return names


def output_texts(
    session: Session, explanation: dict[str, Any], outputs: str | None
) -> dict[str, Any]:
    """The output's prompt and completion from `outputs` (default: the run's queries file by
    name, here), if its text has the sha256 the ledger recorded; else a note saying why not."""
    run = get_run(session, explanation["run_id"])
    path = outputs or json.loads(run.manifest).get("queries_file", {}).get("name")
    if not path or not os.path.isfile(path):
        return {"note": f"queries file {path} not found (pass --outputs FILE)"}
    for _, obj in read_jsonl(path):
        if str(obj.get("id")) != explanation["external_id"]:
            continue
        prompt, completion = obj.get("prompt", ""), obj.get("completion", "")
        data = (str(prompt) + "\x00" + str(completion)).encode("utf-8", "surrogatepass")
        import hashlib

        if hashlib.sha256(data).hexdigest() != explanation["text_sha256"]:
            return {"note": f"{path}: the output's text differs from what the ledger recorded"}
        return {"prompt": prompt, "completion": completion}
    return {"note": f"{path} holds no output {explanation['external_id']!r}"}


def example_texts(
    session: Session, top: list[dict[str, Any]], resolve=lambda p: p
) -> dict[str, str | None]:
    """Example id → its training text (the whole row of its shard; a long text is indexed in
    chunks, numbered by the id's last part), for the examples of `top`. None where the shard
    is missing or its content is not the registered one. `resolve` maps a stored shard path to
    where the file is now."""
    shards = list(session.query(m.Shard))
    by_name = shard_names([s.path for s in shards])
    sha = {s.path: s.sha256 for s in shards}
    wanted: dict[str, dict[int, list[str]]] = {}
    for t in top:
        # Ids the ledger's own index gives are "shard:row:chunk"; an index built with the
        # library may name its examples otherwise, and then no text is looked up.
        parts = str(t["example_id"]).rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        name, row, _chunk = parts
        wanted.setdefault(name, {}).setdefault(int(row), []).append(t["example_id"])
    texts: dict[str, str | None] = {t["example_id"]: None for t in top}
    for name, rows in wanted.items():
        stored = by_name.get(name)
        if stored is None:
            continue
        path = resolve(stored)
        if not os.path.isfile(path) or sha256_file(path) != sha[stored]:
            continue
        try:
            for row, text in read_shard_texts(path):
                for example_id in rows.get(row, []):
                    texts[example_id] = text
        except InputError:
            continue
    return texts


def shorten(text: str, limit: int) -> str:
    """`text` on one line, cut to `limit` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
