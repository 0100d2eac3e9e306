"""`ledger serve`: a local, read-only web view of the ledger (Starlette, served by uvicorn).

Pages: the statements, a statement with its charts (and each provider's own statement), the
providers with their trend, an output with its credits and top examples, the runs with their
manifests. They are built by the functions behind `ledger report` (ledger/statement_view.py,
ledger/html_report.py), so they show the same numbers.

Nothing can write through it, for three reasons that do not depend on each other: only GET and
HEAD are answered (any other method gets 405 before a route is looked at); every route only
reads; and the database itself refuses writes on the server's connections (SQLite's
`query_only`, PostgreSQL transactions that are READ ONLY), each request's transaction being
rolled back at its end. A draft is shown as it was last built: viewing never rebuilds it.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ledger import charts
from ledger import models as m
from ledger.db import make_engine
from ledger.errors import LedgerError, NotFoundError
from ledger.html_report import Links, render, render_statement
from ledger.money import format_minor
from ledger.recording import query_explanation
from ledger.statement_view import (
    granularity,
    list_run_rows,
    output_by_id,
    provider_by_id,
    provider_history,
    provider_rows,
    run_details,
    statement_view,
)
from ledger.statements import list_statements

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8023
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = {
    # The pages hold no script and fetch nothing: inline styles and inline SVG only.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _read_only_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """Make every transaction on this connection read-only, enforced by the database."""
    module = type(dbapi_connection).__module__
    if module.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA query_only = ON")
        cursor.close()
    elif module.startswith("psycopg"):
        dbapi_connection.read_only = True  # every transaction starts READ ONLY
    else:  # no way known to make this driver's connections read-only: refuse to serve
        raise LedgerError(f"ledger serve supports SQLite and PostgreSQL, not {module}")


def read_only_engine(url: str) -> Engine:
    """An engine whose connections the database keeps from writing (SQLite `query_only`,
    PostgreSQL READ ONLY transactions)."""
    engine = make_engine(url)
    event.listen(engine, "connect", _read_only_on_connect)
    return engine


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    """A session whose transaction is always rolled back."""
    session = Session(bind=engine, autoflush=False)
    try:
        yield session
    finally:
        session.rollback()
        session.close()


PAGE_TABLES = (
    "providers",
    "statements",
    "statement_lines",
    "statement_runs",
    "adjustments",
    "attribution_runs",
    "gradient_indexes",
    "queries",
    "query_results",
    "credits",
    "top_examples",
)
"""The tables the pages read (through the functions behind `ledger report`)."""


def check_readable(engine: Engine) -> None:
    """`LedgerError` (one line) unless this connection's user may read every table the pages
    read: a PostgreSQL `ledger_reader` sees the views only."""
    with read_session(engine) as session:
        for table in PAGE_TABLES:
            try:
                session.execute(text(f"SELECT 1 FROM {table} LIMIT 1"))
            except DBAPIError as exc:
                detail = str(exc.orig).strip().splitlines()[0]
                raise LedgerError(
                    f"ledger serve cannot read the table {table} as this database user "
                    f"({detail}); connect as the ledger's owner, a ledger_writer or a "
                    "ledger_approver (a ledger_reader sees the views only)"
                ) from exc


class GetOnly:
    """ASGI middleware: 405 for every method but GET and HEAD, on every path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD"):
            response = PlainTextResponse(
                "405 Method Not Allowed: this view of the ledger is read-only\n",
                status_code=405,
                headers={"Allow": "GET, HEAD", **SECURITY_HEADERS},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def public_url(url: str) -> str:
    """The database URL without its password, for the page header."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only shown, never used to connect
        return "the ledger"


def create_app(url: str, allowed_hosts: list[str] | None = None) -> Starlette:
    """The web view of the ledger at `url`. `allowed_hosts`: Host headers answered (the
    loopback names when serving on a loopback address, so that another site's page cannot
    reach it through DNS rebinding); None answers any."""
    engine = read_only_engine(url)
    links = Links(database=public_url(url))

    def page(body: Callable[[Session, Request], str]) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            try:
                with read_session(engine) as session:
                    html = body(session, request)
            except NotFoundError as exc:
                return _error(404, str(exc), links)
            except LedgerError as exc:
                return _error(400, str(exc), links)
            except DBAPIError as exc:  # unreachable, a permission withdrawn, ...
                log.warning("database error on %s: %s", request.url.path, exc)
                detail = str(exc.orig).strip().splitlines()[0]
                return _error(503, f"database error: {detail}", links)
            return HTMLResponse(html, headers=SECURITY_HEADERS)

        return endpoint

    def statements_page(session: Session, request: Request) -> str:
        rows = []
        for s in list_statements(session):
            rows.append(
                {
                    "id": s.id,
                    "period": s.period_label,
                    "status": s.status,
                    "pool": None
                    if s.pool_minor is None
                    else format_minor(s.pool_minor, s.currency),
                    "currency": s.currency,
                    "queries": s.query_count,
                    "providers": len(s.lines),
                    "finalized_at": s.finalized_at,
                }
            )
        return render("statements.html", title="Statements", statements=rows, links=links)

    def statement_page(session: Session, request: Request) -> str:
        statement_id = request.path_params["statement_id"]
        return render_statement(statement_view(session, statement_id), links)

    def provider_statement_page(session: Session, request: Request) -> str:
        provider = provider_by_id(session, request.path_params["provider_id"])
        view = statement_view(session, request.path_params["statement_id"], provider.name)
        return render_statement(view, links)

    def providers_page(session: Session, request: Request) -> str:
        return render(
            "providers.html", title="Providers", providers=provider_rows(session), links=links
        )

    def provider_page(session: Session, request: Request) -> str:
        provider = provider_by_id(session, request.path_params["provider_id"])
        history = provider_history(session, provider.id)
        palette = charts.colours([provider.name])
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for row in history:
            by_kind.setdefault(granularity(row["period"]), []).append(row)
        svgs = [
            charts.trend_chart(rows, palette, f"Value of {provider.name} by {kind}")
            for kind, rows in by_kind.items()
        ]
        return render(
            "provider.html",
            title=provider.name,
            provider=provider,
            history=history,
            charts=svgs,
            links=links,
        )

    def output_page(session: Session, request: Request) -> str:
        from ledger.explain import output_texts

        external_id = output_by_id(session, request.path_params["query_id"])
        e = query_explanation(session, external_id)
        # The prompt and completion, from the run's queries file where the view was started
        # (as `ledger explain` reads them), if its text is the one the ledger recorded.
        e["output"] = output_texts(session, e, None)
        names = [c["provider"] for c in e["credits"]]
        ids = dict(
            session.execute(
                select(m.Provider.name, m.Provider.id).where(m.Provider.name.in_(names))
            )
            .tuples()
            .all()
        )
        total = math.fsum(c["credit"] for c in e["credits"])
        chart = None
        if total > 0:
            shares = [
                {"provider": c["provider"], "share": c["credit"] / total} for c in e["credits"]
            ]
            chart = charts.share_chart(
                shares,
                charts.colours(names),
                "Shares of the credit",
                "share of the output's credit",
            )
        return render(
            "output.html",
            title=f"Output {external_id}",
            e=e,
            provider_ids=ids,
            chart=chart,
            links=links,
        )

    def runs_page(session: Session, request: Request) -> str:
        return render("runs.html", title="Runs", runs=list_run_rows(session), links=links)

    def run_page(session: Session, request: Request) -> str:
        run_id = request.path_params["run_id"]
        run = run_details(session, run_id)
        statements = list(
            session.scalars(
                select(m.Statement)
                .join(m.statement_runs, m.statement_runs.c.statement_id == m.Statement.id)
                .where(m.statement_runs.c.run_id == run_id)
                .order_by(m.Statement.period_start)
            )
        )
        return render(
            "run.html", title=f"Run {run_id[:16]}", run=run, statements=statements, links=links
        )

    routes = [
        Route("/", page(statements_page)),
        Route("/statements/{statement_id:int}", page(statement_page)),
        Route(
            "/statements/{statement_id:int}/providers/{provider_id:int}",
            page(provider_statement_page),
        ),
        Route("/providers", page(providers_page)),
        Route("/providers/{provider_id:int}", page(provider_page)),
        Route("/outputs/{query_id:int}", page(output_page)),
        Route("/runs", page(runs_page)),
        Route("/runs/{run_id}", page(run_page)),
    ]
    middleware = [Middleware(GetOnly)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, f"no page at {request.url.path}", links)

    app = Starlette(routes=routes, middleware=middleware, exception_handlers={404: not_found})
    app.state.engine = engine
    return app


def _error(status: int, message: str, links: Links) -> Response:
    html = render("error.html", title=str(status), status_code=status, message=message, links=links)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 takes a free one. `LedgerError` if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LedgerError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(url: str, host: str, port: int, announce: Callable[[str], None]) -> None:
    """Serve the web view of the ledger at `url` until Ctrl-C (or SIGTERM); `announce` gets
    the address once the server accepts requests (with the port chosen when `port` is 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if not self.should_exit:
                announce(f"http://{shown}:{sock.getsockname()[1]}/")

    allowed = ["127.0.0.1", "localhost", "[::1]", "::1"] if host in LOOPBACK else None
    app = create_app(url, allowed_hosts=allowed)
    shown = f"[{host}]" if ":" in host else host
    try:
        check_readable(app.state.engine)
        sock = bind(host, port)
    except LedgerError:
        app.state.engine.dispose()
        raise
    try:
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C is how the view is stopped: not an interruption
        pass
    finally:
        sock.close()
        app.state.engine.dispose()
