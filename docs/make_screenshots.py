"""Regenerate docs/img/statement.png and docs/img/provider.png.

Records a year of credits for the demo's four providers through the ledger's library (random
but seeded, so every run draws the same ledger), closes three quarters, leaves the fourth a draft
with an adjustment, starts `ledger serve` on it and photographs a statement page and a
provider's own statement in headless Chromium (Debian's `chromium`, driven by Playwright).

    python docs/make_screenshots.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from ledger.db import make_engine, session_scope, upgrade
from ledger.periods import parse_period
from ledger.recording import (
    ProviderCredit,
    QueryRecord,
    QueryResult,
    TopExample,
    finish_run,
    record_results,
    start_run,
)
from ledger.registry import add_shard, register_index
from ledger.statements import add_adjustment, build_statement, finalize_statement

PROVIDERS = {  # name: how often outputs in its style are served, per quarter
    "stellar-press": (12, 14, 15, 17),
    "kitchen-table": (8, 9, 7, 8),
    "harbor-logs": (4, 3, 5, 6),
    "lexis-archive": (2, 3, 2, 2),
}
QUARTERS = ("2024-Q1", "2024-Q2", "2024-Q3", "2024-Q4")
POOLS = ("180000", "210000", "250000", "265000")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build_ledger(url: str) -> dict[str, int]:
    """The ledger photographed; returns each quarter's statement id."""
    rng = random.Random(2024)
    engine = make_engine(url)
    upgrade(engine)
    names = sorted(PROVIDERS)
    with session_scope(engine) as s:
        for name in names:
            add_shard(s, f"shards/{name}-000.jsonl", sha(name), name, 400)
        index_id = sha("index")
        register_index(s, index_id, "indexes/example", {"shards": names})
    ids = {}
    for q, quarter in enumerate(QUARTERS):
        period = parse_period(quarter)
        results = []
        serial = 0
        for style in names:
            for _ in range(PROVIDERS[style][q]):
                # Mostly, not only, the provider whose style the output imitates.
                positive = {p: rng.uniform(0.2, 1.0) * (6 if p == style else 1) for p in names}
                total = sum(positive.values())
                served = period.start.replace(tzinfo=None) + timedelta(
                    minutes=rng.randint(0, 60 * 24 * 88)
                )
                ranked = sorted(positive.items(), key=lambda kv: -kv[1])
                serial += 1
                results.append(
                    QueryResult(
                        QueryRecord(
                            f"o{q + 1}-{serial:03d}", served, Decimal(1), sha(f"{q}{serial}")
                        ),
                        [ProviderCredit(p, v, v / total) for p, v in positive.items()],
                        [
                            TopExample(
                                r,
                                f"{p}-000:{rng.randint(0, 399)}",
                                f"shards/{p}-000.jsonl",
                                rng.randint(0, 399),
                                p,
                                v,
                            )
                            for r, (p, v) in enumerate(ranked, start=1)
                        ],  # fmt: skip
                        unattributed=False,
                    )
                )
        run_id = sha(f"run {quarter}")
        manifest = {
            "kind": "attribution-run",
            "index_id": index_id,
            "queries_file": {"name": f"outputs-{quarter}.jsonl", "sha256": sha(quarter)},
        }
        with session_scope(engine) as s:
            start_run(s, run_id, index_id, manifest)
            record_results(s, run_id, results)
            finish_run(s, run_id)
        with session_scope(engine) as s:
            ids[quarter] = build_statement(s, period, Decimal(POOLS[q]), "USD").id
        if quarter != QUARTERS[-1]:
            with session_scope(engine) as s:
                finalize_statement(s, ids[quarter])
    with session_scope(engine) as s:
        add_adjustment(
            s, ids["2024-Q2"], "harbor-logs", Decimal("412.80"), "outputs of 2 June left out"
        )
    engine.dispose()
    return ids


def serve(url: str, cwd: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from ledger.cli import main; main()", "--db", url, "serve",
         "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )  # fmt: skip
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    found = re.search(r"http://\S+/", line[0] if line else "")
    if found is None:
        proc.kill()
        raise SystemExit("ledger serve did not start")
    return proc, found.group(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Chromium: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ids = build_ledger(f"sqlite:///{Path(tmp) / 'ledger.db'}")
        proc, base = serve("sqlite:///ledger.db", cwd=tmp)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium)
                page = browser.new_page(viewport={"width": 1100, "height": 900})
                page.goto(f"{base}statements/{ids['2024-Q4']}")
                page.screenshot(path=args.out / "statement.png", full_page=True)
                page.locator("#lines a", has_text="harbor-logs").click()
                page.wait_for_load_state()
                page.screenshot(path=args.out / "provider.png", full_page=True)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"wrote {args.out / 'statement.png'} and {args.out / 'provider.png'}")


if __name__ == "__main__":
    main()
