"""The `ledger` command: providers, shards, the gradient index, attribution, statements.

Every command that writes does so in transactions; bad input gets a one-line error naming the
file, line and field, a non-zero exit status, and nothing written.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Engine
from sqlalchemy.exc import DatabaseError, IntegrityError

from attribution.config import (
    DEFAULT_CURVATURE,
    DEFAULT_CURVATURE_EXAMPLES,
    DEFAULT_DAMPING_FACTOR,
    DEFAULT_FACTOR_EXAMPLES,
    DEFAULT_FISHER_LABELS,
    DEFAULT_HEAD_K_OUT,
    DEFAULT_HEAD_PROJECTION,
    DEFAULT_K,
    DEFAULT_LM_CURVATURE_LABELS,
    DEFAULT_LM_CURVATURE_PRIOR_EXAMPLES,
    DEFAULT_MAX_LENGTH,
    IndexConfig,
    ProjectionConfig,
    ScoreConfig,
)
from attribution.types import IndexDamagedError, IndexMismatchError, InputError, first_line
from ledger import render
from ledger.db import (
    DEFAULT_QUERY_TIMEOUT_S,
    checked_url,
    database_url,
    has_ledger_tables,
    make_engine,
    session_scope,
    sqlite_file,
    upgrade,
)
from ledger.errors import LedgerError
from ledger.torchrun import torchrun_job

FORMATS = click.Choice(["table", "json", "csv"])
log = logging.getLogger("ledger")


class Context:
    def __init__(self, db: str | None, quiet: bool) -> None:
        self.url = database_url(db)
        self.quiet = quiet
        self._engine: Engine | None = None

    def engine(self, require_tables: bool = True) -> Engine:
        if self._engine is None:
            path = sqlite_file(checked_url(self.url))
            if require_tables and path is not None and not path.exists():
                # Connecting would create an empty file where the user expected a ledger.
                raise LedgerError(f"no ledger at {path}; run `ledger init` to create one")
            self._engine = make_engine(self.url)
        if require_tables and not has_ledger_tables(self._engine):
            raise LedgerError(f"the ledger at {self.url} is not initialised; run `ledger init`")
        return self._engine

    def echo(self, text: str = "") -> None:
        if not self.quiet:
            click.echo(text)


def user_errors(fn: Callable) -> Callable:
    """Turn the errors a user can cause into one-line messages and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (
            InputError,
            LedgerError,
            IndexMismatchError,
            IndexDamagedError,
            FileNotFoundError,
        ) as exc:
            raise click.ClickException(str(exc).splitlines()[0]) from exc
        except IntegrityError as exc:
            # Every write checks first; a conflict here means another process wrote the same
            # rows between that check and this write (two runs of one command at once).
            detail = str(exc.orig).strip().splitlines()[0]
            raise click.ClickException(
                f"another process wrote the same ledger rows at the same time ({detail}); this "
                "step was rolled back: re-run the command to resume"
            ) from exc
        except DatabaseError as exc:  # unreachable, locked, not a database at all, ...
            detail = str(exc.orig).strip().splitlines()[0]
            raise click.ClickException(f"database error: {detail}") from exc

    return wrapper


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    metavar="URL",
    help="Ledger database URL (default: $LEDGER_DATABASE_URL "
    "or sqlite:///ledger.db in the current directory).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or summaries.")
@click.option("-v", "--verbose", is_flag=True, help="Log what the commands do.")
@click.version_option(package_name="provider-credit-ledger")
@click.pass_context
def cli(ctx: click.Context, db: str | None, quiet: bool, verbose: bool) -> None:
    """Credit data providers for what a language model says, and turn it into statements.

    \b
    Example (a typical session):
      ledger init
      ledger providers add stellar-press
      ledger shards add shards/stellar-press.jsonl --provider stellar-press
      ledger index --model model/
      ledger attribute --outputs queries.jsonl
      ledger report --period 2024-Q3 --pool 250000 --currency USD
    """
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")  # stderr
    for name in ("ledger", "attribution"):  # even where logging was set up before (tests)
        logging.getLogger(name).setLevel(level)
    if quiet:
        os.environ["LEDGER_QUIET"] = "1"
    ctx.obj = Context(db, quiet)
    log.info("ledger %s, database %s", ctx.invoked_subcommand, _shown_url(ctx.obj.url))


def _shown_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an invalid URL is reported by the command itself
        return "(invalid URL)"


@cli.command()
@pass_ctx
@user_errors
def init(ctx: Context) -> None:
    """Create the ledger database, or upgrade it to the newest schema.

    Example: `ledger init` (SQLite file ledger.db here), or
    `ledger --db postgresql://user@host/ledger init`.
    """
    upgrade(ctx.engine(require_tables=False))
    ctx.echo(f"ledger ready at {ctx.url}")


# --- providers and shards ----------------------------------------------------------------------


@cli.group()
def providers() -> None:
    """Data providers who are credited. Example: `ledger providers list`."""


@providers.command("add")
@click.argument("names", nargs=-1, required=True)
@pass_ctx
@user_errors
def providers_add(ctx: Context, names: tuple[str, ...]) -> None:
    """Register providers by name. Example: `ledger providers add stellar-press`."""
    from ledger.registry import add_provider

    with session_scope(ctx.engine()) as session:
        for name in names:
            add_provider(session, name)
    ctx.echo(f"added {len(names)} provider(s)")


@providers.command("list")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@pass_ctx
@user_errors
def providers_list(ctx: Context, fmt: str) -> None:
    """List providers with their shard counts. Example: `ledger providers list --format csv`."""
    from ledger.registry import list_providers, list_shards

    with session_scope(ctx.engine()) as session:
        shards = list_shards(session)
        rows = [
            {
                "provider": p.name,
                "shards": sum(s.provider_id == p.id for s in shards),
                "rows": sum(s.row_count for s in shards if s.provider_id == p.id),
            }
            for p in list_providers(session)
        ]
    _emit(rows, fmt, right=("shards", "rows"))


@cli.group()
def shards() -> None:
    """Training shards (jsonl or parquet files with a `text` field), each of one provider.

    Example: `ledger shards list`.
    """


@shards.command("add")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--provider", required=True, help="The registered provider who licensed them.")
@pass_ctx
@user_errors
def shards_add(ctx: Context, paths: tuple[str, ...], provider: str) -> None:
    """Register training shards; every row is checked and the sha256 recorded.

    A shard whose content changes later is refused by `ledger index`.
    Example: `ledger shards add shards/a.jsonl shards/b.parquet --provider stellar-press`.
    """
    from ledger.registry import register_shards

    added = register_shards(ctx.engine(), list(paths), provider)
    ctx.echo(
        f"registered {len(added)} shard(s) for {provider}: {sum(s.row_count for s in added)} rows"
    )


@shards.command("list")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@pass_ctx
@user_errors
def shards_list(ctx: Context, fmt: str) -> None:
    """List registered shards with provider, rows and sha256. Example: `ledger shards list`."""
    from ledger.registry import list_shards

    with session_scope(ctx.engine()) as session:
        rows = [
            {
                "path": s.path,
                "provider": s.provider.name,
                "rows": s.row_count,
                "sha256": s.sha256[:16],
            }
            for s in list_shards(session)
        ]
    _emit(rows, fmt, right=("rows",))


# --- index and attribution ---------------------------------------------------------------------

# Where `attribute` and `verify` find the index's model and checkpoints when they have moved.
moved_model = click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False),
    help="Model directory (default: the one the index was built from).",
)
moved_checkpoints = click.option(
    "--checkpoint",
    "checkpoint_dirs",
    multiple=True,
    type=click.Path(file_okay=False),
    help="The index's further checkpoints, in order (default: those it was built with).",
)


def _print_plan(ctx: Context, model_dir: str, root: Path, config: Any, max_length: int | None,
                batch_size: int, checkpoint_dirs: tuple[str, ...], device: str,
                precision: str) -> None:  # fmt: skip
    """`ledger index --plan`: the plan's lines on stdout; a build that cannot fit is refused
    (exit status 1) naming the first reason."""
    from ledger.index_plan import plan_ledger_index

    try:
        plan, out = plan_ledger_index(
            ctx.engine(), model_dir, root, config, max_length=max_length,
            batch_size=batch_size, checkpoint_dirs=checkpoint_dirs, device=device,
            precision=precision,
        )  # fmt: skip
    except ValueError as exc:
        if isinstance(exc, InputError | LedgerError):
            raise
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    click.echo(f"index directory: {out}")
    for line in plan.lines():
        click.echo(line)
    if plan.problems:
        raise click.ClickException(f"the build cannot fit: {plan.problems[0]}")


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value.strip().lower() in ("auto", "cpu"):  # always valid: no torch to import for them
        return value
    from attribution.device import resolve_device  # torch: only when the command runs

    try:
        resolve_device(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc
    return value


def device_option(fn: Callable) -> Callable:
    """`--device`: where the model runs and the rows are multiplied; an unknown or unavailable
    device is refused before any work."""
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        metavar="auto|cpu|cuda|cuda:N",
        callback=_check_device,
        help="Where the model runs (auto: the GPU when there is one).",
    )(fn)


@cli.command("index")
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Local Hugging Face causal LM directory (safetensors).",
)
@click.option(
    "--checkpoint",
    "checkpoint_dirs",
    multiple=True,
    type=click.Path(file_okay=False),
    help="An earlier checkpoint of the model's training run, indexed with it (repeat for "
    "more); scores then sum each checkpoint's influence.",
)
@click.option(
    "--out",
    "out_root",
    default="indexes",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory that holds gradient indexes.",
)
@click.option(
    "--kind",
    type=click.Choice(["pca", "random"]),
    default=ProjectionConfig.kind,
    show_default=True,
    help="LoGra projection initialisation.",
)
@click.option(
    "--k-in",
    type=int,
    default=DEFAULT_K,
    show_default=True,
    help="Projected input dimension per layer.",
)
@click.option(
    "--k-out",
    type=int,
    default=DEFAULT_K,
    show_default=True,
    help="Projected output-gradient dimension per layer.",
)
@click.option(
    "--modules",
    multiple=True,
    metavar="GLOB",
    help="Track only layers whose name matches (repeatable).",
)
@click.option(
    "--tied-head/--no-tied-head",
    default=ProjectionConfig.tied_head,
    show_default=True,
    help="Track an output head whose weight is tied to the input embedding (GPT-2).",
)
@click.option(
    "--head-projection",
    type=click.Choice(["random", "pca"]),
    default=DEFAULT_HEAD_PROJECTION,
    show_default=True,
    help="Projection of the output head's vocabulary side when --kind is pca.",
)
@click.option(
    "--head-k-out",
    type=int,
    default=DEFAULT_HEAD_K_OUT,
    show_default=True,
    help="Projected size of the output head's vocabulary side, capped at the vocabulary "
    "(0: --k-out). Fewer directions shrink the index and cost accuracy (see "
    "benchmarks/results/accuracy.md).",
)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option(
    "--curvature",
    type=click.Choice(["ekfac", "full"]),
    default=DEFAULT_CURVATURE,
    show_default=True,
    help="Kronecker-factored eigenbasis with corrected eigenvalues, or the full Fisher.",
)
@click.option(
    "--fisher-labels",
    type=click.Choice(["sampled", "data"]),
    default=DEFAULT_FISHER_LABELS,
    show_default=True,
    help="Labels of the KFAC-factor pass: drawn from the model (true Fisher) or the text's own.",
)
@click.option(
    "--curvature-labels",
    type=click.Choice(["data", "sampled"]),
    default=DEFAULT_LM_CURVATURE_LABELS,
    show_default=True,
    help="Gradients the curvature's eigenvalues are fitted on: a further pass with tokens "
    "drawn from the model, or the stored ones (text's own tokens; no further pass).",
)
@click.option(
    "--curvature-draws",
    type=int,
    default=1,
    show_default=True,
    help="Draws per example for --curvature-labels sampled.",
)
@click.option(
    "--curvature-examples",
    type=int,
    default=DEFAULT_CURVATURE_EXAMPLES,
    show_default=True,
    help="At most about this many examples, spread over the data, go through the pass of "
    "--curvature-labels sampled (0: all).",
)
@click.option(
    "--factor-examples",
    type=int,
    default=DEFAULT_FACTOR_EXAMPLES,
    show_default=True,
    help="At most about this many examples, spread over the data, go through the first pass "
    "that estimates the KFAC factors (PCA directions, EKFAC eigenbasis) (0: all).",
)
@click.option(
    "--curvature-prior-examples",
    type=int,
    default=DEFAULT_LM_CURVATURE_PRIOR_EXAMPLES,
    show_default=True,
    help="When --curvature-examples keeps fewer examples than the data has, each EKFAC "
    "eigenvalue is shrunk toward the whole data's KFAC one as if that were seen in this many "
    "more examples (0: no shrinkage).",
)
@click.option(
    "--damping",
    type=float,
    default=DEFAULT_DAMPING_FACTOR,
    show_default=True,
    help="Damping factor: λ = factor × mean eigenvalue of each layer's Fisher.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Storage precision of projected gradients.",
)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option(
    "--rows-per-block",
    type=int,
    default=1024,
    show_default=True,
    help="Examples per index block: the unit a killed build resumes from and that the ranks of "
    "a torchrun job share out.",
)
@click.option(
    "--max-length",
    type=int,
    default=None,
    help=f"Tokens per training chunk [default: {DEFAULT_MAX_LENGTH}, or the model's position "
    "limit when that is smaller].",
)
@device_option
@click.option(
    "--precision",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="The model's weights and forward/backward passes (projected gradients and curvature "
    "stay float32/float64; queries are scored in the index's precision).",
)
@click.option(
    "--plan",
    "plan_only",
    is_flag=True,
    help="Print what the build will take (rows, dims per layer, disk, memory, time from a few "
    "timed batches) and build nothing; exit status 1 when it cannot fit.",
)
@pass_ctx
@torchrun_job
@user_errors
def index_cmd(
    ctx: Context,
    device: str,
    precision: str,
    plan_only: bool,
    model_dir: str,
    checkpoint_dirs: tuple[str, ...],
    out_root: str,
    kind: str,
    k_in: int,
    k_out: int,
    modules: tuple[str, ...],
    tied_head: bool,
    head_projection: str,
    head_k_out: int,
    seed: int,
    curvature: str,
    fisher_labels: str,
    curvature_labels: str,
    curvature_draws: int,
    curvature_examples: int,
    factor_examples: int,
    curvature_prior_examples: int,
    damping: float,
    dtype: str,
    batch_size: int,
    rows_per_block: int,
    max_length: int | None,
) -> None:
    """Build the gradient index of every registered shard (resumes after a kill).

    Example: `ledger index --model model/ --kind pca --k-in 16 --k-out 16`.
    """
    from attribution.curvature import check_damping_factor
    from ledger.jobs import build_ledger_index

    for name, value in (
        ("--k-in", k_in),
        ("--k-out", k_out),
        ("--curvature-draws", curvature_draws),
        ("--batch-size", batch_size),
        ("--rows-per-block", rows_per_block),
    ):
        if value is not None and value < 1:
            raise click.BadParameter(f"must be positive, got {value}", param_hint=name)
    if max_length is not None and max_length < 2:  # a prediction needs a token before it
        raise click.BadParameter(f"must be at least 2, got {max_length}", param_hint="--max-length")
    for name, value in (
        ("--head-k-out", head_k_out),
        ("--curvature-examples", curvature_examples),
        ("--factor-examples", factor_examples),
        ("--curvature-prior-examples", curvature_prior_examples),
    ):
        if value < 0:
            raise click.BadParameter(f"must be 0 or positive, got {value}", param_hint=name)
    try:
        check_damping_factor(damping)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--damping") from exc
    config = IndexConfig(
        projection=ProjectionConfig(
            kind=kind,
            k_in=k_in,
            k_out=k_out,
            seed=seed,
            modules=tuple(modules),
            tied_head=tied_head,
            head_projection=head_projection,
            head_k_out=head_k_out or None,
        ),
        dtype=dtype,
        curvature=curvature,
        fisher_labels=fisher_labels,
        curvature_labels=curvature_labels,
        curvature_draws=curvature_draws,
        curvature_examples=curvature_examples or None,
        factor_examples=factor_examples or None,
        curvature_prior_examples=curvature_prior_examples,
        damping_factor=damping,
        rows_per_block=rows_per_block,
    )
    if plan_only:
        _print_plan(ctx, model_dir, Path(out_root), config, max_length, batch_size,
                    checkpoint_dirs, device, precision)  # fmt: skip
        return
    created = not Path(out_root).exists()
    try:
        index = build_ledger_index(
            ctx.engine(),
            model_dir,
            Path(out_root),
            config,
            max_length=max_length,
            batch_size=batch_size,
            show_progress=not ctx.quiet,
            checkpoint_dirs=checkpoint_dirs,
            device=device,
            precision=precision,
        )
    except Exception as exc:
        if created and Path(out_root).is_dir() and not any(Path(out_root).iterdir()):
            Path(out_root).rmdir()  # refused before anything was written: leave no trace
        if isinstance(exc, ValueError) and not isinstance(exc, InputError | LedgerError):
            # Settings the model or data cannot satisfy (no layer matches, ...).
            raise click.ClickException(str(exc).splitlines()[0]) from exc
        if isinstance(exc, RuntimeError):  # a model that loads but cannot run (a bad config)
            raise click.ClickException(
                f"{model_dir}: the model failed on the training data: {first_line(exc)}"
            ) from exc
        raise
    ctx.echo(f"index {index.id[:16]}: {index.rows} examples × {index.dim} dims at {index.root}")


@cli.command()
@click.option(
    "--outputs",
    required=True,
    type=click.Path(dir_okay=False),
    help="JSONL of served outputs: id, timestamp, prompt, completion[, weight|revenue].",
)
@click.option("--index", "index_ref", help="Index id (or prefix) or path; default the newest.")
@moved_model
@moved_checkpoints
@click.option(
    "--top-k",
    type=int,
    default=10,
    show_default=True,
    help="Training examples kept per output for audit.",
)
@click.option(
    "--batch-size",
    type=int,
    default=256,
    show_default=True,
    help="Outputs scored per pass over the index and written per transaction.",
)
@click.option(
    "--query-loss",
    type=click.Choice(["sum", "mean"]),
    default="sum",
    show_default=True,
    help="An output's loss: its completion's summed negative log-likelihood, or the mean per "
    "token (recorded in the run's manifest).",
)
@click.option(
    "--sample",
    "sample_size",
    type=click.IntRange(min=1),
    help="Attribute a probability sample of this many of the file's outputs (docs/sampling.md).",
)
@click.option(
    "--sample-rate",
    type=click.FloatRange(0, 1, min_open=True),
    help="Or a sample of this fraction of the file's outputs (rounded up).",
)
@click.option(
    "--seed",
    "sample_seed",
    type=click.IntRange(0, 2**63 - 1),
    help="The sample's seed (default: a fresh one, recorded with the run).",
)
@click.option(
    "--weight-field",
    help="Draw outputs with probability proportional to this field (e.g. revenue or weight).",
)
@click.option(
    "--strata",
    help="Stratify the sample by this field, or by served month, day or year (month, day, year).",
)
@click.option(
    "--supersede",
    is_flag=True,
    help="Replace the credits of outputs attributed over another index (without --index).",
)
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@device_option
@pass_ctx
@torchrun_job
@user_errors
def attribute(
    ctx: Context,
    device: str,
    outputs: str,
    index_ref: str | None,
    model_dir: str | None,
    checkpoint_dirs: tuple[str, ...],
    top_k: int,
    batch_size: int,
    query_loss: str,
    sample_size: int | None,
    sample_rate: float | None,
    sample_seed: int | None,
    weight_field: str | None,
    strata: str | None,
    supersede: bool,
    fmt: str,
) -> None:
    """Attribute served outputs to providers and record the credits.

    Re-running on the same file changes nothing; a killed run resumes. Outputs whose credits
    come from another index than the one used now (the newest, unless --index names one)
    keep them unless --index names the index or --supersede is given; what is superseded is
    printed first.
    Example: `ledger attribute --outputs queries.jsonl`.
    """
    from ledger.jobs import attribute_outputs

    if top_k < 1 or batch_size < 1:
        raise click.BadParameter("--top-k and --batch-size must be positive")
    plan = _sample_plan(sample_size, sample_rate, sample_seed, weight_field, strata)
    _check_supersede(ctx, outputs, index_ref, supersede)
    summary = attribute_outputs(
        ctx.engine(),
        outputs,
        index_ref=index_ref,
        model_dir=model_dir,
        checkpoint_dirs=checkpoint_dirs,
        config=ScoreConfig(top_k=top_k, query_loss=query_loss),
        batch_size=batch_size,
        show_progress=not ctx.quiet,
        sample=plan,
        device=device,
    )
    if fmt == "json":
        click.echo(render.to_json(summary.as_dict()))
        return
    ctx.echo(
        f"run {summary.run_id[:16]} over index {summary.index_id[:16]}: "
        f"{summary.queries} outputs, {summary.attributed} attributed, "
        f"{summary.skipped} skipped as already done, {summary.unattributed} unattributed"
        + (f" (a sample drawn with seed {plan.seed})" if plan is not None else "")
    )


def _check_supersede(ctx: Context, outputs: str, index_ref: str | None, supersede: bool) -> None:
    """Refuse to change which index pays the file's outputs unless told, and say what is
    superseded before anything is written (`ledger.supersede`)."""
    from attribution.data import read_queries
    from ledger.jobs import open_ledger_index
    from ledger.supersede import check_supersede, superseded_results

    ids = [q.id for q in read_queries(outputs)]  # validated here before anything else
    with session_scope(ctx.engine()) as session:
        index = open_ledger_index(session, index_ref)
        superseded = superseded_results(session, ids, index.id)
    check_supersede(superseded, outputs, index_named=index_ref is not None, supersede=supersede)
    if superseded.outputs and not ctx.quiet:
        click.echo(f"superseding: {superseded.describe(outputs)}", err=True)


def _sample_plan(
    size: int | None, rate: float | None, seed: int | None, field: str | None, strata: str | None
) -> Any:
    """The `--sample`/`--sample-rate` options as a plan (None: attribute every output)."""
    import secrets

    from ledger.samples import SamplePlan

    if size is not None and rate is not None:
        raise click.UsageError("give --sample N or --sample-rate R, not both")
    if size is None and rate is None:
        if seed is not None or field or strata:
            raise click.UsageError(
                "--seed, --weight-field and --strata need --sample or --sample-rate"
            )
        return None
    seed = secrets.randbits(63) if seed is None else seed
    return SamplePlan(seed, size, rate, field or None, strata or None)


@cli.command("sample-size")
@click.option("--period", required=True, help="The pilot's period, e.g. 2024-Q3.")
@click.option(
    "--precision",
    type=click.FloatRange(0, 1, min_open=True),
    required=True,
    help="Half-width of the 95% interval wanted on the largest share, e.g. 0.005 (±0.5%).",
)
@click.option(
    "--uniform",
    is_flag=True,
    help="Plan a sample drawn with equal probabilities (default: proportional to weight).",
)
@click.option(
    "--throughput",
    type=click.FloatRange(0, min_open=True),
    help="Outputs attributed per second (default: measured on the pilot's runs).",
)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@pass_ctx
@user_errors
def sample_size(
    ctx: Context, period: str, precision: float, uniform: bool, throughput: float | None, fmt: str
) -> None:
    """How many outputs to attribute for a given precision, planned from a pilot's credits.

    Example: `ledger sample-size --period 2024-Q3 --precision 0.005`.
    """
    from ledger.periods import parse_period
    from ledger.samples import plan_sample_size

    with session_scope(ctx.engine()) as session:
        plan = plan_sample_size(session, parse_period(period), precision, not uniform, throughput)
    if fmt == "json":
        click.echo(render.to_json(plan.as_dict()))
        return
    timing = (
        f"about {_duration(plan.seconds)} at {plan.outputs_per_second:.3g} outputs/s"
        if plan.seconds is not None
        else "no finished run to measure a throughput on (give --throughput)"
    )
    click.echo(
        f"{plan.period}: attribute {plan.outputs} of about {plan.population:,.0f} outputs "
        f"({plan.design}) for ±{100 * plan.precision:.2f}% at 95% on {plan.provider}'s share "
        f"(now {100 * plan.share:.2f}%, from {plan.pilot_outputs} pilot outputs); {timing}"
    )


# --- statements --------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--period",
    required=True,
    help="2024-Q3, 2024-07, 2024-H1, 2024, or 2024-07-01..2024-10-01 (end exclusive).",
)
@click.option("--pool", help="Royalty pool to allocate, e.g. 250000 or 1999.50.")
@click.option(
    "--currency",
    help="Currency of --pool [default: the saved draft's, else USD]; another currency than a "
    "saved or final statement's is refused unless --pool rebuilds a draft in it.",
)
@click.option("--min-payout", help="Smaller amounts are carried forward to the next statement.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json", "parquet", "xlsx", "html"]),
    default="table",
    show_default=True,
    help="html: one self-contained page with charts (no network needed to view it).",
)
@click.option("--out", type=click.Path(dir_okay=False), help="Write to a file instead of stdout.")
@click.option(
    "--provider",
    "provider_name",
    metavar="NAME",
    help="With --format html: that provider's own statement (its line, trend and top outputs; "
    "of the others only the pool total).",
)
@click.option("--save", is_flag=True, help="Keep the statement as a draft (a preview otherwise).")
@click.option("--finalize", is_flag=True, help="Close the statement: it can never change again.")
@click.option(
    "--allow-unfinished",
    is_flag=True,
    help="With --finalize: close it even while an attribution run is unfinished.",
)
@pass_ctx
@user_errors
def report(
    ctx: Context,
    period: str,
    pool: str | None,
    currency: str | None,
    min_payout: str | None,
    fmt: str,
    out: str | None,
    provider_name: str | None,
    save: bool,
    finalize: bool,
    allow_unfinished: bool,
) -> None:
    """The value statement of a period: per provider value, share and royalty amount.

    Shown as a preview: built from the current credits and not kept (a saved draft keeps its
    pool unless --pool is given). --save keeps it as a draft; --finalize closes it; a final
    statement is shown as it was. Every exported line carries the statement's id, period,
    currency and status, and a last line holds the totals (payable included).
    Example: `ledger report --period 2024-Q3 --pool 250000 --currency USD`.
    """
    from ledger.periods import parse_period
    from ledger.reports import prepare_statement, preview_scope, statement_report
    from ledger.statements import finalize_statement

    p = parse_period(period)
    if provider_name is not None and fmt != "html":
        raise click.UsageError("--provider writes one provider's statement: use --format html")
    if fmt in ("parquet", "xlsx") and out is None:
        raise click.ClickException(f"--format {fmt} writes a file: give --out FILE")
    out_dir = Path(out).absolute().parent if out is not None else None
    if out_dir is not None and not out_dir.is_dir():
        # Checked before the statement is built, so a bad path leaves the ledger as it was.
        raise click.ClickException(f"--out {out}: directory {out_dir} does not exist")
    keep = save or finalize
    with (session_scope if keep else preview_scope)(ctx.engine()) as session:
        statement, built = prepare_statement(session, p, pool, currency, min_payout)
        log.info(
            "statement %s for %s: %s", statement.id, p.label,
            "built from the current credits" + ("" if keep else ", a preview not kept")
            if built else f"{statement.status}, shown as it was kept",
        )  # fmt: skip
        if finalize and statement.status != "final":
            finalize_statement(session, statement.id, allow_unfinished=allow_unfinished)
            log.info("statement %s finalised: sealed and its money booked", statement.id)
        # Built here and not kept: a preview (a saved draft shown as it was saved is not).
        doc = statement_report(session, statement.id, preview=built and not keep)
        if fmt == "html":
            from ledger.html_report import statement_html

            page = statement_html(session, statement.id, provider_name, built and not keep)
    if fmt == "html":
        _write_text(page, out)
    else:
        _render_report(doc, fmt, out)
    if save and statement.status != "final" and not ctx.quiet:
        click.echo(f"saved draft statement {statement.id} for {p.label}", err=True)


def _write_text(text: str, out: str | None) -> None:
    if out:
        Path(out).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    else:
        click.echo(text, nl=not text.endswith("\n"))


def _minor(amount: Any, currency: str) -> int:
    from ledger.money import to_minor

    return to_minor(amount, currency.upper())


def _render_report(doc: dict, fmt: str, out: str | None) -> None:
    """A `ledger.reports.statement_report` in `fmt`, to `out` or stdout."""
    from ledger.reports import report_frame, write_report

    if fmt in ("parquet", "xlsx") or (fmt == "csv" and out):
        write_report(doc, fmt, out)
        return
    if fmt == "csv":
        text = report_frame(doc).write_csv()
    elif fmt == "json":
        text = render.to_json(doc)
    else:
        text = _statement_text(doc["statement"], doc["lines"])
    if out:
        Path(out).write_text(text if text.endswith("\n") else text + "\n")
    else:
        click.echo(text, nl=not text.endswith("\n"))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _half_width(row: dict) -> dict:
    """A share estimated from a sample, shown with its 95% interval's half-width."""
    half = row.get("share_half_width")
    return {} if half is None else {"share": f"{100 * row['share']:.2f}% ± {100 * half:.2f}%"}


def _sample_line(sample: dict) -> str:
    designs = ", ".join(d[:16] for d in sample["designs"])
    return (
        f"Estimated from a sample: {sample['sampled_outputs']} sampled outputs of about "
        f"{sample['estimated_outputs']:,.0f} served; shares ± half-width of their 95% "
        f"interval; amounts on the estimates (design {designs})"
    )


def _statement_text(s: dict, lines: list[dict]) -> str:
    from ledger.money import format_minor

    name = "preview" if s["id"] is None else str(s["id"])
    status = (
        "preview: not saved; --save keeps it as a draft"
        if s["status"] == "preview"
        else s["status"]
    )
    head = [
        f"Statement {name} for {s['period']} [{status}]  "
        f"{s['period_start']:%Y-%m-%d} to {s['period_end']:%Y-%m-%d} (exclusive)"
    ]
    head.append(f"Queries: {s['queries']} credited, {s['unattributed_queries']} unattributed")
    if s.get("sample"):
        head.append(_sample_line(s["sample"]))
    if s["pool"] is not None:
        head.append(
            f"Pool: {s['pool']} {s['currency']}"
            + (f"  minimum payout {s['min_payout']}" if s["min_payout"] else "")
        )
    cols = ["provider", "value", "share"]
    rows = [
        {**r, "value": render.number(r["value"]), "share": f"{100 * r['share']:.2f}%"}
        | _half_width(r)
        for r in lines
    ]
    if s["pool"] is not None:
        cols += ["amount", "payable"]
    body = render.table(rows, cols, right=("value", "share", "amount", "payable"))
    foot = []
    totals = s["totals"]
    if s["pool"] is not None:
        total = totals["amount_minor"]
        foot.append(
            f"Total amount: {format_minor(total, s['currency'])} {s['currency']}"
            + (" (= pool)" if total == s["pool_minor"] else " (≠ pool!)")
        )
    for adj in s["adjustments"]:
        foot.append(
            f"Adjustment {adj['id']}: {adj['provider']} {adj['amount']} — corrects "
            f"statement {adj['corrects_statement_id']} ({adj['corrects_period']}): "
            f"{adj['reason']}"
        )
    if s["pool"] is not None:
        moved = [
            (totals["carried_in_minor"], "carried in", "+"),
            (totals["carried_forward_minor"], "carried forward", "-"),
            (totals["adjustments_minor"], "adjustments", "+"),
        ]
        parts = [
            f"{sign} {format_minor(abs(v), s['currency'])} {what}"
            if v >= 0
            else f"{'-' if sign == '+' else '+'} {format_minor(-v, s['currency'])} {what}"
            for v, what, sign in moved
            if v
        ]
        foot.append(
            f"Total payable: {totals['payable']} {s['currency']}"
            + (f" (amount {' '.join(parts)})" if parts else "")
        )
    runs = ", ".join(
        f"{r['run_id'][:16]} (index {r['index_id'][:16]}"
        + (
            ", unfinished: interrupted or still running"
            if r.get("status", "finished") != "finished"
            else ""
        )
        + ")"
        for r in s["runs"]
    )
    foot.append(f"Rests on runs: {runs or '(none)'}")
    return "\n".join(head + ["", body, ""] + foot)


@cli.group()
def statements() -> None:
    """List, finalise and adjust value statements. Example: `ledger statements list`."""


@statements.command("list")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@pass_ctx
@user_errors
def statements_list(ctx: Context, fmt: str) -> None:
    """All statements, oldest period first. Example: `ledger statements list --format csv`."""
    from ledger.money import format_minor
    from ledger.statements import list_statements

    with session_scope(ctx.engine()) as session:
        rows = [
            {
                "id": s.id,
                "period": s.period_label,
                "status": s.status,
                "pool": None if s.pool_minor is None else format_minor(s.pool_minor, s.currency),
                "currency": s.currency,
                "queries": s.query_count,
            }
            for s in list_statements(session)
        ]
    _emit(rows, fmt, right=("id", "pool", "queries"))


@statements.command("finalize")
@click.argument("statement")
@click.option("--pool", help="Build the period's statement with this pool and close it.")
@click.option("--currency", help="Currency of --pool [default: the saved draft's, else USD].")
@click.option("--min-payout", help="With --pool: smaller amounts are carried forward.")
@click.option(
    "--allow-unfinished",
    is_flag=True,
    help="Close it even while an attribution run is unfinished (its later credits for this "
    "period are refused).",
)
@pass_ctx
@user_errors
def statements_finalize(
    ctx: Context,
    statement: str,
    pool: str | None,
    currency: str | None,
    min_payout: str | None,
    allow_unfinished: bool,
) -> None:
    """Close a statement (by id or period label); it can never change afterwards.

    A saved draft must be up to date with the ledger (save it again with `ledger report
    --save` otherwise). A period with no saved draft, or given with --pool, is built from the
    current credits exactly as `ledger report` previews it and closed in the same
    transaction. Its money is booked as balanced transfers and its content sealed with a
    sha256 chained to the previous final statement's.
    Example: `ledger statements finalize 2024-Q3 --pool 250000 --currency USD`.
    """
    from ledger.periods import parse_period
    from ledger.reports import prepare_statement
    from ledger.statements import finalize_statement, find_statement

    with session_scope(ctx.engine()) as session:
        ref = statement
        build = not (ref.isascii() and ref.isdigit()) and (
            pool is not None or find_statement(session, parse_period(ref)) is None
        )
        if build:
            target, _ = prepare_statement(session, parse_period(ref), pool, currency, min_payout)
        else:
            if pool is not None or currency is not None or min_payout is not None:
                raise LedgerError("--pool, --currency and --min-payout need a period, not an id")
            target = get_statement_ref(session, ref)
        s = finalize_statement(session, target.id, allow_unfinished=allow_unfinished)
        ctx.echo(
            f"statement {s.id} for {s.period_label} is final (sha256 {s.content_sha256[:16]}, "
            f"finalised by {s.finalized_by})"
        )


@statements.command("discard")
@click.argument("statement")
@pass_ctx
@user_errors
def statements_discard(ctx: Context, statement: str) -> None:
    """Delete a saved draft statement (by id or period label). A final statement is never
    discarded, nor a draft that carries adjustments.

    Example: `ledger statements discard 2024-Q3`.
    """
    from ledger.reports import discard_draft

    with session_scope(ctx.engine()) as session:
        s = discard_draft(session, _statement_id(session, statement))
        ctx.echo(f"discarded draft statement {s.id} for {s.period_label}")


def get_statement_ref(session: Any, ref: str) -> Any:
    from ledger.statements import get_statement

    return get_statement(session, _statement_id(session, ref))


@statements.command("verify")
@click.argument("statement")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@pass_ctx
@user_errors
def statements_verify(ctx: Context, statement: str, fmt: str) -> None:
    """Check a final statement against what it sealed: its hash and chain link, its lines,
    adjustments, runs and provider names, its values re-summed from the credits, and its
    journal. Exit status 1 on any difference. Same as `ledger verify --statement`.

    Example: `ledger statements verify 2024-Q3`.
    """
    _verify_statement(ctx, statement, fmt)


def _verify_statement(ctx: Context, statement: str, fmt: str) -> None:
    from ledger.audit import verify_statement

    with session_scope(ctx.engine()) as session:
        report = verify_statement(session, _statement_id(session, statement))
    _print_checks(report, fmt)


def _print_checks(report: Any, fmt: str) -> None:
    if fmt == "json":
        click.echo(render.to_json(report.as_dict()))
    else:
        for check in report.checks:
            click.echo(f"{'ok  ' if check.ok else 'FAIL'} {check.name}")
            if check.detail:
                click.echo(f"     {check.detail}")
    if not report.ok:
        raise SystemExit(1)


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@pass_ctx
@user_errors
def audit(ctx: Context, fmt: str) -> None:
    """Check every invariant of the ledger (docs/invariants.md); exit status 1 on any breach.

    One current result per output; credits that add up to each output's weight; every final
    statement's hash, chain link, content, values and journal; carried-forward money paid once;
    payables settled; final pools that never overlap; adjustments in their statement's
    currency; nothing recorded into a closed period.

    Example: `ledger audit --format json`.
    """
    from ledger.audit import audit_ledger

    with session_scope(ctx.engine()) as session:
        report = audit_ledger(session)
    _print_checks(report, fmt)
    if fmt == "text":
        ctx.echo(f"{sum(c.ok for c in report.checks)}/{len(report.checks)} checks passed")


@cli.command()
@click.argument("role", type=click.Choice(["reader", "writer", "approver"]))
@click.argument("user")
@click.option("--create", is_flag=True, help="Create USER as a login role first.")
@click.option(
    "--timeout",
    default="60s",
    show_default=True,
    help="For a reader: the statement timeout set on USER's sessions.",
)
@pass_ctx
@user_errors
def grant(ctx: Context, role: str, user: str, create: bool, timeout: str) -> None:
    """Give a PostgreSQL user one of the ledger's roles (run as the database's owner).

    reader: SELECT on the views only, with a statement timeout. writer: records credits and
    builds drafts; cannot TRUNCATE, ALTER or finalise. approver: a writer who may finalise.
    Who finalised and adjusted is recorded as the database user.

    Example: `ledger --db postgresql://owner@db/ledger grant reader analyst --create`.
    """
    from ledger.db import grant_role

    grant_role(ctx.engine(), role, user, create=create, timeout=timeout)
    ctx.echo(f"{user} is now a ledger {role}")


@statements.command("adjust")
@click.option("--corrects", required=True, help="The final statement (id or period) corrected.")
@click.option("--provider", required=True)
@click.option("--amount", required=True, help="Positive: owed to the provider; negative: back.")
@click.option("--reason", required=True)
@click.option(
    "--period",
    "carrier",
    help="The later period whose statement carries it [default: the first open statement "
    "after the corrected one, else a new draft for the period after it].",
)
@pass_ctx
@user_errors
def statements_adjust(
    ctx: Context, corrects: str, provider: str, amount: str, reason: str, carrier: str | None
) -> None:
    """Correct a final statement with an entry on a later open statement.

    Where no open statement follows the corrected one (no outputs of the next period yet), a
    draft with a pool of 0 is saved for the next period of the same kind (2024-Q3 → 2024-Q4)
    to carry it; `ledger report --period 2024-Q4 --pool ... --save` later adds that period's
    pool. Example: `ledger statements adjust --corrects 2024-Q3 --provider harbor-logs
    --amount 100.50 --reason "missed output q000031"`.
    """
    from ledger.money import parse_amount
    from ledger.periods import parse_period
    from ledger.statements import add_adjustment, get_statement

    with session_scope(ctx.engine()) as session:
        target = get_statement(session, _statement_id(session, corrects))
        adj = add_adjustment(
            session,
            target.id,
            provider,
            parse_amount(amount, target.currency),
            reason,
            carrier=None if carrier is None else parse_period(carrier),
            open_next=True,
        )
        carried = get_statement(session, adj.statement_id)
        ctx.echo(
            f"adjustment {adj.id} recorded on statement {adj.statement_id} "
            f"({carried.period_label}, draft)"
        )


def _statement_id(session: Any, ref: str) -> int:
    from ledger.periods import parse_period
    from ledger.statements import find_statement

    if ref.isascii() and ref.isdigit():  # str.isdigit alone also takes '２' and '²'
        return int(ref)
    found = find_statement(session, parse_period(ref))
    if found is None:
        raise LedgerError(f"no statement for period {ref}")
    return found.id


# --- the workspace -----------------------------------------------------------------------------


@cli.group()
def workspace() -> None:
    """Where the ledger's shards and indexes are: check them, or point at where they moved.

    Example: `ledger workspace check`.
    """


@workspace.command("check")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@pass_ctx
@user_errors
def workspace_check(ctx: Context, fmt: str) -> None:
    """Find every registered shard and index and check it by its recorded hashes (a shard's
    sha256; an index's manifest id and block hashes). Exit status 1 if any is missing or
    differs. Paths are stored relative to the workspace (the database's directory) when
    inside it, so a workspace moved or copied whole is found where it lands.
    Example: `ledger workspace check`.
    """
    from ledger.workspace import check_workspace

    with session_scope(ctx.engine()) as session:
        found = check_workspace(session)
    rows = [
        {"kind": f.kind, "stored": f.stored, "found": f.found, "check": f.problem or "ok"}
        for f in found
    ]
    _emit(rows, fmt)
    if not all(f.ok for f in found):
        raise SystemExit(1)


@workspace.command("relocate")
@click.argument("old")
@click.argument("new", type=click.Path(file_okay=False))
@pass_ctx
@user_errors
def workspace_relocate(ctx: Context, old: str, new: str) -> None:
    """Record that the shards and indexes that were under OLD are now under NEW. Each is
    checked by its hashes at its new place first; if any differs, nothing changes.
    Example: `ledger workspace relocate /data/old-place /data/new-place`.
    """
    from ledger.workspace import relocate

    with session_scope(ctx.engine()) as session:
        moved = relocate(session, old, new)
    ctx.echo(
        f"relocated {sum(m.kind == 'shard' for m in moved)} shard(s) and "
        f"{sum(m.kind == 'index' for m in moved)} index(es) to {new}"
    )


# --- runs, verification, explanation -----------------------------------------------------------


@cli.group()
def runs() -> None:
    """Attribution runs and their manifests. Example: `ledger runs list`."""


@runs.command("list")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@pass_ctx
@user_errors
def runs_list(ctx: Context, fmt: str) -> None:
    """All attribution runs, oldest first; a run that stopped before its end (Ctrl-C, a kill)
    and that no process works on is shown as interrupted.

    Example: `ledger runs list --format json`.
    """
    import json

    from ledger.liveness import shown_status
    from ledger.recording import list_runs

    with session_scope(ctx.engine()) as session:
        rows = [
            {
                "run": r.id[:16],
                "index": r.index_id[:16],
                "index_dir": Path(r.index.path).name,  # named by its inputs, not by its id
                "status": shown_status(ctx.engine(), r),
                "started": r.started_at,
                "queries_file": json.loads(r.manifest).get("queries_file", {}).get("name"),
            }
            for r in list_runs(session)
        ]
    _emit(rows, fmt)


@runs.command("show")
@click.argument("run_id")
@pass_ctx
@user_errors
def runs_show(ctx: Context, run_id: str) -> None:
    """The manifest of a run (id or prefix) and of the index it used, as JSON.

    Example: `ledger runs show 8409a0ae` (a prefix from `ledger runs list`).
    """
    import json

    from ledger.liveness import shown_status
    from ledger.recording import get_run, resolve_run_id

    with session_scope(ctx.engine()) as session:
        run = get_run(session, resolve_run_id(session, run_id))
        doc = {
            "run": json.loads(run.manifest),
            "status": shown_status(ctx.engine(), run),
            "started_at": run.started_at,
            "finished_at": run.finished_at,
            "index": {"path": run.index.path, "manifest": json.loads(run.index.manifest)},
        }
    click.echo(render.to_json(doc))


@cli.command()
@click.argument("run_id", required=False)
@click.option(
    "--statement",
    "statement_ref",
    help="Check a final statement (id or period) against what it sealed instead of a run.",
)
@click.option(
    "--outputs",
    type=click.Path(dir_okay=False),
    help="The run's queries file (default: its file name, here).",
)
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Outputs re-computed and compared, drawn at random (see --seed).",
)
@click.option("--all", "every", is_flag=True, help="Re-compute every output of the run.")
@click.option(
    "--seed",
    type=click.IntRange(0, 2**63 - 1),
    default=None,
    help="Draw the sample with this seed (printed by each verify) to repeat a check.",
)
@click.option(
    "--index",
    "index_dir",
    type=click.Path(file_okay=False),
    help="The run's index directory, where it has moved (checked by its manifest id and block "
    "hashes; default: where the ledger finds it, see docs/auditing.md).",
)
@moved_model
@moved_checkpoints
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@device_option
@pass_ctx
@torchrun_job
@user_errors
def verify(
    ctx: Context,
    device: str,
    run_id: str | None,
    statement_ref: str | None,
    outputs: str | None,
    sample: int,
    every: bool,
    seed: int | None,
    index_dir: str | None,
    model_dir: str | None,
    checkpoint_dirs: tuple[str, ...],
    fmt: str,
) -> None:
    """Re-check a run from its manifest: hashes of index, model and queries, every output's
    stored credits against its weight, and a random sample of outputs (or --all) re-computed
    and compared with the run's stored results. Exit status 1 on any disagreement. A
    workspace moved or copied as a whole (database included) is found where it is; --index,
    --model and --checkpoint name files that moved apart from it.

    With --statement ID: a final statement's hash and chain link, its content rebuilt from its
    lines, adjustments, runs and provider names, its values re-summed from the credits, and
    its journal.

    \b
    Example:
      ledger verify 8409a0ae --outputs queries.jsonl --sample 4
      ledger verify --statement 2024-Q3
    """
    if (run_id is None) == (statement_ref is None):
        raise click.UsageError("give a RUN_ID or --statement ID (one of them)")
    if statement_ref is not None:
        _verify_statement(ctx, statement_ref, fmt)
        return
    from ledger.jobs import STORED_CHECK, verify_run

    v = verify_run(
        ctx.engine(), run_id, outputs, model_dir=model_dir, sample=None if every else sample,
        seed=seed, checkpoint_dirs=checkpoint_dirs, device=device, index_dir=index_dir,
    )  # fmt: skip
    if fmt == "json":
        click.echo(render.to_json(v.as_dict()))
    else:
        for name, ok in v.checks.items():
            click.echo(f"{'ok  ' if ok else 'FAIL'} {name}" + (
                f" ({v.outputs} outputs)" if name == STORED_CHECK else ""
            ))  # fmt: skip
        for note in v.notes:  # why a check failed
            click.echo(f"     {note}")
        if v.sampled:
            click.echo(
                f"{'ok  ' if v.agreeing == v.sampled else 'FAIL'} re-computed "
                f"{v.agreeing}/{v.sampled} outputs agree "
                f"(largest credit difference {v.max_credit_difference:.3g}; "
                f"sample seed {v.seed})"
            )
        elif not v.notes:
            click.echo("FAIL no output was re-computed")
    if not v.ok:
        raise SystemExit(1)


@cli.command()
@click.option("--query", "query_id", required=True, help="The output's id.")
@click.option(
    "--outputs",
    type=click.Path(dir_okay=False),
    help="The queries file holding the output's text (default: its run's file name, here).",
)
@click.option("--full", is_flag=True, help="Whole texts instead of their first line's worth.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@pass_ctx
@user_errors
def explain(ctx: Context, query_id: str, outputs: str | None, full: bool, fmt: str) -> None:
    """The providers and top training examples behind one output, with the output's prompt
    and completion and the examples' texts (each checked against the sha256 the ledger
    recorded; cut to a line unless --full; JSON holds them whole).

    Example: `ledger explain --query q000001 --full`.
    """
    from ledger.explain import example_texts, output_texts, shorten
    from ledger.recording import query_explanation

    with session_scope(ctx.engine()) as session:
        e = query_explanation(session, query_id)
        e["output"] = output_texts(session, e, outputs)
        texts = example_texts(session, e["top"], _resolver(session))
    for t in e["top"]:
        t["text"] = texts[t["example_id"]]
    if fmt == "json":
        click.echo(render.to_json(e))
        return
    click.echo(
        f"Output {e['external_id']} served {e['served_at']:%Y-%m-%d %H:%M:%S} UTC, "
        f"weight {e['weight']}, run {e['run_id'][:16]}"
        + ("  (unattributed: no positive influence)" if e["unattributed"] else "")
    )
    cut = (lambda text: text) if full else (lambda text: shorten(text, 100))
    if "note" in e["output"]:
        click.echo(f"  ({e['output']['note']})")
    else:
        click.echo(f"  prompt:     {cut(e['output']['prompt'])}")
        click.echo(f"  completion: {cut(e['output']['completion'])}")
    click.echo("")
    click.echo(
        render.table(
            [
                {"provider": c["provider"], "credit": render.number(c["credit"])}
                for c in e["credits"]
            ],
            right=("credit",),
        )
    )
    click.echo("")
    unread = "(text unavailable: shard missing or changed)"
    rows = [
        {**t, "text": shorten(t["text"], 60) if t["text"] is not None else unread} for t in e["top"]
    ]
    columns = ["rank", "provider", "example_id", "score"]
    click.echo(render.table(rows, columns + ([] if full else ["text"]), right=("rank", "score")))
    if full:
        for t in e["top"]:
            click.echo(f"\n[{t['rank']}] {t['example_id']} ({t['provider']})")
            click.echo(t["text"] if t["text"] is not None else unread)


def _resolver(session: Any) -> Callable[[str], str]:
    """Where a stored shard path is now (see `ledger.workspace`)."""
    from ledger.workspace import Workspace

    return Workspace.of(session).locate


TABLE_ROWS = 1000
"""Rows `ledger sql --format table` shows unless --limit says otherwise (it needs every row it
shows before printing, for the column widths; csv and json stream any number)."""


@cli.command()
@click.argument("query")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_QUERY_TIMEOUT_S,
    show_default=True,
    help="Seconds the query, with the reading of its rows, may take before it is stopped.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help=f"At most this many rows (default: all for csv and json, {TABLE_ROWS} for table).",
)
@pass_ctx
@user_errors
def sql(ctx: Context, query: str, fmt: str, timeout: float, limit: int | None) -> None:
    """Run a read-only SQL query against the ledger (views: see docs/sql.md).

    Example: `ledger sql "SELECT * FROM statement_lines_named"`. The database runs it
    read-only (SQLite's query_only, a PostgreSQL READ ONLY transaction as the role
    ledger_reader, which reads the views only, one statement) within --timeout seconds, and the
    transaction is rolled back, so nothing can be changed this way. csv and json rows are
    written as they come from the database; the table shows the first --limit rows.
    """
    from ledger.db import read_only_query

    first = query.lstrip().split(None, 1)[0].lower() if query.strip() else ""
    if first not in ("select", "with", "explain", "values"):
        raise LedgerError("only SELECT (or WITH ... SELECT) queries are allowed here")
    rows = read_only_query(ctx.engine(), query, timeout=timeout)
    try:
        if fmt == "table":
            _emit_table_rows(rows, limit or TABLE_ROWS)
            return
        pieces = render.json_lines if fmt == "json" else render.csv_lines
        buffer: list[str] = []
        for piece in pieces(itertools.islice(rows, limit)):
            buffer.append(piece)
            if len(buffer) >= 1000:
                click.echo("".join(buffer), nl=False)
                buffer.clear()
        click.echo("".join(buffer), nl=False)
    finally:
        rows.close()  # ends the query (and its transaction) if rows were left unread


def _emit_table_rows(rows: Iterator[dict], limit: int) -> None:
    """Up to `limit` rows as a table, and a note on stderr if the query had more."""
    shown = list(itertools.islice(rows, limit + 1))
    click.echo(render.table(shown[:limit]))
    if len(shown) > limit:
        click.echo(
            f"(the first {limit} rows; --limit N shows more, --format csv or json streams "
            "every row)",
            err=True,
        )


@cli.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; other machines can reach the view only if this is not a "
    "loopback address.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8023,
    show_default=True,
    help="Port to listen on (0: any free port, printed at start).",
)
@pass_ctx
@user_errors
def serve(ctx: Context, host: str, port: int) -> None:
    """A local, read-only web view of the ledger: statements with their charts, providers with
    their trend, outputs with their credits and top examples, runs with their manifests.

    Pages show what `ledger report` shows (a draft as last saved); only GET is answered, and
    the database itself keeps the server's transactions read-only. Stop it with Ctrl-C.
    Example: `ledger serve`, then open http://127.0.0.1:8023/.
    """
    from ledger.web import serve as serve_ledger

    ctx.engine()  # an uninitialised ledger is one line here, not an error page
    serve_ledger(
        ctx.url,
        host,
        port,
        lambda address: click.echo(f"Serving the ledger read-only at {address} (Ctrl-C stops)"),
    )


@cli.command()
@click.argument("directory", default="demo-workspace", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Rebuild a workspace that is already there.")
@pass_ctx
@user_errors
def demo(ctx: Context, directory: str, force: bool) -> None:
    """Build a complete demo workspace and run the main job in it (no network; the time it
    takes is measured in docs/benchmarks.md).

    A generated corpus of several providers, a tiny GPT-2 trained on it, shards registered,
    the index built, sampled outputs attributed, and the 2024-Q3 statement printed. A finished
    workspace is left as it is (--force rebuilds it).

    \b
    Example:
      ledger demo
      cd demo-workspace && ledger report --period 2024-Q3
    """
    from ledger.demo_state import clear_demo, demo_state

    root = Path(directory).absolute()
    state = demo_state(root)
    if state != "new" and not force:
        if state == "unfinished":
            raise LedgerError(
                f"{root} holds an unfinished demo workspace; rebuild it with `ledger demo --force`"
            )
        click.echo(
            f"demo workspace {root} exists; try `cd {directory} && ledger report --period "
            "2024-Q3`, or rebuild it with `ledger demo --force`"
        )
        return
    if state != "new":
        clear_demo(root)
    from ledger.demo import run_demo

    run_demo(root, quiet=ctx.quiet)


def _emit(rows: list[dict], fmt: str, right: tuple[str, ...] = ()) -> None:
    if fmt == "json":
        click.echo(render.to_json(rows))
    elif fmt == "csv":
        click.echo(render.to_csv(rows), nl=False)
    else:
        click.echo(render.table(rows, right=right))


# click 8.2+ signals a group called without a command with this usage error.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


INTERRUPTED = "interrupted; run the same command again to resume"
"""What Ctrl-C prints: every command that writes resumes where it stopped, or had written
nothing (each step is one transaction)."""


def main() -> None:
    """The `ledger` entry point. Every error is one line on stderr: usage errors (a missing or
    invalid option) exit 2 with a pointer to the command's help, other errors exit 1."""
    for arg in sys.argv[1:]:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:  # bytes the file system allows but the ledger cannot store
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            click.echo(
                f"Error: argument {shown!r} is not valid UTF-8; rename the file (or fix the text)",
                err=True,
            )
            sys.exit(2)
    try:
        code = cli.main(prog_name="ledger", standalone_mode=False)
    except _NO_ARGS_IS_HELP as exc:  # `ledger` or `ledger statements` alone: the help
        click.echo(exc.format_message(), err=True)
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        click.echo(f"Error: {exc.format_message()}{where}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # Ctrl-C; click printed a newline
            click.echo(INTERRUPTED, err=True)
            sys.exit(130)  # 128 + SIGINT, as a shell reports it
        click.echo("Aborted!", err=True)
        sys.exit(1)
    except KeyboardInterrupt:  # while the arguments were read, before click had started
        click.echo(INTERRUPTED, err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
