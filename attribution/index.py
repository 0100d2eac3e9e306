"""The logging phase: build the on-disk gradient index, resumable after a kill.

A first pass over a sample of the data (at most about `factor_examples` examples, whole batches
spread over it; see benchmarks/index_cost.py for why) estimates each layer's KFAC factors (and,
for PCA, the projections); both are saved before any gradient is logged. Then one forward and
backward pass per batch with parameters frozen (no weight gradient is computed); the hooks keep only projected activations
and output gradients. Rows are written in blocks, each atomically; a resumed build skips the
rows of complete blocks and never writes a row twice. Once all blocks exist, the curvature (the
EKFAC basis from the factors, its eigenvalues from the stored rows, or with
`curvature_labels="sampled"` from a further pass of gradients of labels drawn from the model,
over at most about `curvature_examples` examples spread over the data)
and the self-influence of every row are computed. Under PCA the output head's vocabulary side
is projected randomly, already during the first pass (`fixed_output_projections`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn

from attribution.config import LANGUAGE_MODEL_INDEX, IndexConfig, ProjectionConfig
from attribution.curvature import (
    Curvature,
    check_damping_factor,
    ekfac_layers,
    fit_curvature,
    kfac_bases,
    second_moments,
    shrink_to_kfac,
    with_second_moments,
)
from attribution.device import DEFAULT_DEVICE, DeviceSpec, place_model, resolve_device
from attribution.distributed import BlockPlan, barrier, blocks_of, gather_to_main, ranks
from attribution.fingerprint import FingerprintedData, weights_sha256
from attribution.manifest import code_version, package_versions, seal, write_json
from attribution.progress import progress
from attribution.projection import (
    KfacFactors,
    LayerProjector,
    LayerSpec,
    Tracked,
    check_tracked_share,
    checkpoint_prefix,
    eval_mode,
    find_layers,
    identity_projectors,
    kfac_factors,
    layer_specs,
    members_eval_mode,
    output_head,
    output_head_name,
    pca_projectors,
    random_projectors,
    split_members,
    tracked_gradients,
    untracked_tied_head,
)
from attribution.store import (
    BUILD_FILE,
    CURVATURE_FILE,
    FACTORS_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    PROJECTIONS_FILE,
    GradientIndex,
    block_paths,
    completed_blocks,
    layer_slices,
    load_factors,
    load_projectors,
    save_factors,
    save_projectors,
)
from attribution.types import Batch, IndexMismatchError, LossFn
from attribution.writer import BlockWriter

log = logging.getLogger(__name__)


@contextmanager
def _timed(name: str) -> Iterator[None]:
    """Log the wall time of one pass of a build as it ends ("logging took 12.3 s", at INFO:
    `ledger -v index`); a resumed build times what it runs."""
    start = time.perf_counter()
    try:
        yield
    finally:
        log.info("%s took %.1f s", name, time.perf_counter() - start)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _reiterable(data: Iterable[Batch]) -> Iterable[Batch]:
    if iter(data) is data:
        raise TypeError(
            "training data must be re-iterable (a list, or an object whose __iter__ starts "
            "afresh): PCA projections and resumed builds pass over it more than once"
        )
    return data


def _layout(projectors: list[LayerProjector]) -> list[dict]:
    layers, start = [], 0
    for p in projectors:
        k_out, k_in = p.p_out.shape[0], p.p_in.shape[0]
        layers.append(
            {
                "name": p.name,
                "n_in": p.p_in.shape[1],
                "n_out": p.p_out.shape[1],
                "k_in": k_in,
                "k_out": k_out,
                "start": start,
                "stop": start + k_in * k_out,
            }
        )
        start += k_in * k_out
    return layers


def make_projectors(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    config: IndexConfig,
    *,
    fisher_loss: LossFn | None = None,
    show_progress: bool = True,
    plan: BlockPlan | None = None,
    total: int | None = None,
) -> tuple[dict[str, nn.Module], list[LayerProjector] | None, list[KfacFactors] | None]:
    """The tracked layers, their projectors and their projected KFAC factors.

    One pass over `data` estimates the factors, with `fisher_loss` (labels drawn from the
    model) when `config.fisher_labels` is "sampled", else with `loss_fn`, on the batches a
    `CurvatureSample` of at most about `config.factor_examples` of the `total` examples in
    `data` picks (counted first when None), or every batch. PCA projectors are
    the factors' top eigenvectors; random and identity projectors need no data, and their
    factors are accumulated already projected. With `plan`, a rank's share of a data-parallel
    pass (`attribution.distributed`): projectors and factors on the main rank, None on others.
    """
    layers = find_layers(model, config.projection)
    check_tracked_share(model, layers, config.projection)
    head = untracked_tied_head(model, config.projection)
    if head is not None:
        log.warning(
            "the output head '%s' (tied to the input embedding) matches none of the module "
            "patterns %s and is not tracked although tied_head is set; add '%s' to the "
            "patterns to track it, or set tied_head=False to leave it out without this warning",
            head, list(config.projection.modules), head,
        )  # fmt: skip
    kind = config.projection.kind  # a valid one: `ProjectionConfig` refuses any other
    first_pass_loss = _first_pass_loss(loss_fn, fisher_loss, config)
    specs = layer_specs(layers, output_head_name(model, layers))
    fixed_out = fixed_output_projections(specs, config.projection)
    if kind in ("pca", "identity"):
        _check_raw_factor_memory(specs, kind, set(fixed_out))
    projectors = random_projectors(specs, config.projection) if kind == "random" else None
    bar = lambda b: progress(b, desc="kfac factors", enabled=show_progress, unit="batch")  # noqa: E731
    take = None
    if config.factor_examples is not None:
        if total is None:
            total = sum(len(b) for b in data)
        take = CurvatureSample(total, config.factor_examples).take
    with eval_mode(model), _timed("first pass (KFAC factors)"):
        factors = kfac_factors(
            model, first_pass_loss, data, layers, projectors, bar, seed=config.projection.seed,
            fixed_out=fixed_out, plan=plan, take=take,
        )  # fmt: skip
    if factors is None:  # another rank's: the main rank makes the projectors
        return layers, None, None
    if kind == "pca":
        with _timed("eigendecompositions (PCA)"):
            projectors = pca_projectors(factors, specs, config.projection, fixed_out)
        factors = [
            f.projected(p, s_projected=f.name in fixed_out)
            for f, p in zip(factors, projectors, strict=True)
        ]
    elif kind == "identity":
        projectors = identity_projectors(specs)
    # What is saved lives on the host; members take device copies (`Tracked.on_model_device`).
    projectors = [LayerProjector(p.name, p.p_in.cpu(), p.p_out.cpu()) for p in projectors]
    factors = [KfacFactors(f.name, f.a.cpu(), f.s.cpu(), f.examples) for f in factors]
    return layers, projectors, factors


def fixed_output_projections(
    specs: list[LayerSpec], config: ProjectionConfig
) -> dict[str, torch.Tensor]:
    """P_out fixed before the first pass: under PCA with `head_projection="random"`, the
    output head's vocabulary side (`head_k_out` seeded random rows). The first pass then
    accumulates that side's factor already projected, never vocabulary × vocabulary."""
    if config.kind != "pca" or config.head_projection != "random":
        return {}
    heads = [s for s in specs if s.head]
    return {p.name: p.p_out for p in random_projectors(heads, config)}


# PCA and identity projections sum every layer's raw n × n factors in float64 at once.
RAW_FACTOR_BYTES_LIMIT = 16 << 30


def _check_raw_factor_memory(specs: list, kind: str, projected_out: set[str] = frozenset()) -> None:
    """Refuse, before any work, a first pass whose raw factors would not fit in memory
    (layers in `projected_out` keep only their raw input factor)."""

    def raw_out(s) -> int:
        return 0 if s.name in projected_out else s.n_out

    need = sum((s.n_in**2 + raw_out(s) ** 2) * 8 for s in specs)
    if need > RAW_FACTOR_BYTES_LIMIT:
        widest = max(specs, key=lambda s: max(s.n_in, raw_out(s)))
        hint = " (for the output head: head_projection='random')" if widest.head else ""
        raise ValueError(
            f"{kind} projections need the raw KFAC factors of every tracked layer, "
            f"{need / 2**30:.1f} GiB in float64 (limit {RAW_FACTOR_BYTES_LIMIT / 2**30:.0f} GiB); "
            f"the widest layer is '{widest.name}' ({widest.n_in} → {widest.n_out}): leave it out "
            f"with the projection's module patterns, or use random projections{hint}"
        )


def _first_pass_loss(loss_fn: LossFn, fisher_loss: LossFn | None, config: IndexConfig) -> LossFn:
    if config.fisher_labels == "data":
        return loss_fn
    if config.fisher_labels != "sampled":
        raise ValueError(f"unknown fisher_labels '{config.fisher_labels}' (sampled or data)")
    if fisher_loss is None:
        raise ValueError(
            "fisher_labels='sampled' (the default) needs fisher_loss: a loss whose labels are "
            "drawn from the model, e.g. attribution.fisher.sampled_cross_entropy(model(x)) or "
            "attribution.lm.lm_fisher_loss; or set IndexConfig(fisher_labels='data')"
        )
    return fisher_loss


def _check_config(fisher_loss: LossFn | None, config: IndexConfig) -> None:
    """Refuse, before any work, settings that cannot build an index (one line each)."""
    if config.dtype not in ("float32", "float16"):
        raise ValueError(f"unknown storage dtype '{config.dtype}' (float32 or float16)")
    if config.curvature not in ("ekfac", "full"):
        raise ValueError(f"unknown curvature kind '{config.curvature}' (ekfac or full)")
    if config.curvature == "full" and ranks().world > 1:
        raise ValueError(
            "the 'full' curvature is fitted in one process: build it without torchrun, or use "
            "the 'ekfac' curvature"
        )
    if config.fisher_labels not in ("sampled", "data"):
        raise ValueError(f"unknown fisher_labels '{config.fisher_labels}' (sampled or data)")
    check_damping_factor(config.damping_factor)
    if not isinstance(config.rows_per_block, int) or config.rows_per_block < 1:
        raise ValueError(f"rows_per_block must be a positive integer, got {config.rows_per_block}")
    if config.curvature_prior_examples < 0:
        raise ValueError(
            f"curvature_prior_examples must be 0 or positive, got {config.curvature_prior_examples}"
        )
    if config.curvature_labels not in ("data", "sampled"):
        raise ValueError(f"unknown curvature_labels '{config.curvature_labels}' (data or sampled)")
    if config.curvature_labels == "sampled":
        if fisher_loss is None:
            raise ValueError(
                "curvature_labels='sampled' needs fisher_loss: a loss whose labels are drawn "
                "from the model (attribution.fisher, attribution.lm.lm_fisher_loss)"
            )
        if config.curvature_draws < 1:
            raise ValueError(f"curvature_draws must be positive, got {config.curvature_draws}")
        if config.curvature_examples is not None and config.curvature_examples < 1:
            raise ValueError(
                f"curvature_examples must be positive or None, got {config.curvature_examples}"
            )
    if config.factor_examples is not None and (
        not isinstance(config.factor_examples, int) or config.factor_examples < 1
    ):
        raise ValueError(f"factor_examples must be positive or None, got {config.factor_examples}")


def _curvature_seed(seed: int, draw: int, batch: int) -> int:
    """Seed of the labels drawn for the curvature pass: apart from the first pass's."""
    digest = hashlib.sha256(f"curvature:{seed}:{draw}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class CurvatureSample:
    """Which batches go through the sampled-label curvature pass: all of them when `cap` is
    None or at least `total` (training examples); else whole batches spread evenly over the
    data, about `cap` examples in all, never none.

    A batch is taken when the examples taken so far would otherwise fall half a batch behind
    the even share `cap / total` of the examples seen, so a corpus ordered by provider or shard
    is sampled throughout, not only at its start."""

    def __init__(self, total: int, cap: int | None) -> None:
        self.total = total
        self.share = 1.0 if cap is None or cap >= total else cap / total
        self.seen = self.taken = 0

    def take(self, n: int) -> bool:
        """Whether the next batch, of `n` examples, is taken."""
        self.seen += n
        take = self.taken + n / 2 <= self.share * self.seen or (
            self.taken == 0 and self.seen >= self.total
        )
        self.taken += n if take else 0
        return take


def sampled_curvature_rows(
    members: list[Tracked],
    fisher_loss: LossFn,
    data: Iterable[Batch],
    config: IndexConfig,
    total: int,
    show_progress: bool = False,
    used: dict | None = None,
    plan: BlockPlan | None = None,
) -> Iterator[tuple[int | None, np.ndarray]]:
    """Projected gradients of labels drawn from the models, batch by batch, for every draw:
    the rows the curvature is fitted on when `config.curvature_labels` is "sampled". Only the
    batches `CurvatureSample` picks (of `total` training examples, at most about
    `config.curvature_examples`) are used. Each (draw, batch) has its own seed, so every pass
    yields the same rows; each member's labels are drawn under that seed, as in an index of
    that member alone. `used["examples"]`: examples of one draw, once a pass completes.

    Yields (unit, rows): with `plan` (repeats = draws) only this rank's batches, each with its
    unit (`BlockPlan.unit`); without, every batch, with unit None."""
    with members_eval_mode(members):
        for draw in range(config.curvature_draws):
            batches = progress(
                data, desc=f"curvature labels (draw {draw + 1})", enabled=show_progress,
                unit="batch",
            )  # fmt: skip
            sample = CurvatureSample(total, config.curvature_examples)
            position = 0
            for number, batch in enumerate(batches):
                unit = plan.unit(position, draw) if plan is not None else None
                position += len(batch)
                if not sample.take(len(batch)) or (plan is not None and unit is None):
                    continue
                seed = _curvature_seed(config.projection.seed, draw, number)
                g = tracked_gradients(members, fisher_loss, batch, seed=seed)
                yield unit, g.detach().cpu().numpy().astype(np.float64)
            if used is not None:
                used["examples"] = sample.taken


def build_index(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    out_dir: str | Path,
    config: IndexConfig | None = None,
    *,
    fisher_loss: LossFn | None = None,
    model_info: dict | None = None,
    data_info: dict | None = None,
    show_progress: bool = True,
    checkpoints: Sequence[nn.Module] = (),
    device: DeviceSpec = DEFAULT_DEVICE,
) -> GradientIndex:
    """Build (or resume, or reopen) the gradient index of `data` in `out_dir`.

    `data` yields `Batch`es in a fixed order and must be re-iterable; every example needs its
    own id (a repeated id is refused, naming it and both positions). `config` None: the
    defaults of the model's kind (`default_index_config`: `LANGUAGE_MODEL_INDEX`, what
    `ledger index` uses, for a model with an output head such as a Hugging Face causal LM;
    `IndexConfig()` for any other). `fisher_loss` is the loss with labels drawn from the model
    (see `attribution.fisher`), used by the first pass when `config.fisher_labels` is
    "sampled" (the default).

    What is indexed is fingerprinted by the library as it streams (`attribution.fingerprint`):
    the sha256 of each model's parameters and buffers, and a running sha256 of the examples'
    ids, providers and content. Both go into the manifest (`contents`) with the settings and
    `model_info` / `data_info` (optional further descriptions, such as the hashes of weight,
    tokenizer and shard files, also recorded). A directory that already holds an index,
    complete or not, is reused (reopened, or resumed) only when all of them are the same; any
    difference raises `IndexMismatchError` naming what differs, and nothing is changed: build
    into a new directory. Checking a complete index costs a pass over the data, without the
    model.

    `checkpoints`: further models of the same architecture, usually earlier checkpoints of the
    run that trained `model`. Each row then holds every model's projected gradient one after
    the other (layers of checkpoint j named `checkpoint{j}/...`), each layer with its own
    projection and curvature, so a score is the sum over the models of each one's influence;
    the positive part, RelatIF and top examples are taken of that sum. Queries are then scored
    with the same models (`query_gradients(..., checkpoints=...)`).

    `device`: where the passes run (`auto`: the first GPU when torch sees one, else the CPU;
    `cpu`; `cuda`; `cuda:N`; see `attribution.device.resolve_device`). The model and
    checkpoints are moved there (`model.to(device)`) and stay; batches are moved batch by
    batch. Their dtype is the model's own: a bfloat16 model runs its forward and backward in
    bfloat16, while the projections, per-example products and factors are float32 or wider.

    Data-parallel: in a job started by `torchrun` whose process group is initialised
    (`attribution.distributed.process_group()`), every rank calls this with the same
    arguments and `out_dir` (a file system all ranks share); each takes a contiguous share of
    the index blocks, and the index is the same, bit for bit, for any number of ranks (see
    `attribution.distributed` and docs/scaling.md). The `full` curvature is refused there.
    """
    config = config if config is not None else default_index_config(model)
    _check_config(fisher_loss, config)
    target = resolve_device(device)
    for m in (model, *checkpoints):
        place_model(m, target)
    root = Path(out_dir)
    data = FingerprintedData(_reiterable(data))
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    model_info, data_info = model_info or {}, data_info or {}
    models = [model, *checkpoints]
    contents = {"weights_sha256": [weights_sha256(m) for m in models]}

    def fingerprint_of(contents: dict) -> dict:
        fingerprint = {
            "config": config.to_dict(),
            "model": model_info,
            "data": data_info,
            "contents": contents,
        }
        if checkpoints:
            fingerprint["checkpoints"] = len(checkpoints)
        return json.loads(json.dumps(fingerprint))

    build_path = root / BUILD_FILE
    if build_path.exists():
        build = json.loads(build_path.read_text())
        recorded = build["fingerprint"]
        if "contents" in recorded:  # indexes built before the library hashed what it indexes
            contents.update(data.fingerprint())
        fingerprint = fingerprint_of(contents)
        if "contents" not in recorded:
            fingerprint.pop("contents")
        _check_same_build(root, recorded, fingerprint)
        if (root / MANIFEST_FILE).exists():
            return GradientIndex.open(root)
        named = load_projectors(root / PROJECTIONS_FILE, [b["name"] for b in build["layers"]])
        members = split_members(models, config.projection, named, str(root))
        log.info("resuming index build in %s", root)
    else:
        rank = ranks()
        show_progress = show_progress and rank.main
        # Ranks take shares of the index blocks, and a sampled first pass spreads its sample
        # over the data, so they count the examples first.
        members, factors = [], []
        try:
            counted = None
            if rank.world > 1 or config.factor_examples:
                with _timed("counting the examples"):
                    counted = data.fingerprint()["examples"]
            blocks = blocks_of(counted, config.rows_per_block) if rank.world > 1 else None
            for number, m in enumerate(models):
                layers, projectors, fs = make_projectors(
                    m, loss_fn, data, config, fisher_loss=fisher_loss, show_progress=show_progress,
                    plan=BlockPlan(config.rows_per_block, blocks), total=counted,
                )  # fmt: skip
                prefix = checkpoint_prefix(number)
                members.append(Tracked(m, layers, projectors, prefix))
                factors += [KfacFactors(prefix + f.name, f.a, f.s, f.examples) for f in fs or []]
        except BaseException:
            if rank.main and created and root.is_dir() and not any(root.iterdir()):
                root.rmdir()  # a first pass that fails leaves nothing behind
            raise
        contents.update(data.fingerprint())  # hashed during the first pass
        fingerprint = fingerprint_of(contents)
        if rank.main:  # the projections from the sums of all ranks, written once
            named = [p for m in members for p in m.named()]
            save_projectors(root / PROJECTIONS_FILE, named)
            members = [m.on_model_device() for m in members]
            save_factors(root / FACTORS_FILE, factors)
            layout = _layout(named)
            build = {
                "fingerprint": fingerprint,
                "layers": layout,
                "dim": layout[-1]["stop"],
                "config": config.to_dict(),
            }
            write_json(build_path, build)
        barrier()
        if not rank.main:
            build = json.loads(build_path.read_text())
            named = load_projectors(root / PROJECTIONS_FILE, [b["name"] for b in build["layers"]])
            members = split_members(models, config.projection, named, str(root))

    show_progress = show_progress and ranks().main
    with _timed("counting the examples"):  # no pass unless the build resumes
        total = data.fingerprint()["examples"]
    with _timed("logging"):
        _log_gradients(members, loss_fn, data, root, config, show_progress, total)
        barrier()  # every rank's blocks are written
    sampled, used = None, {}
    if config.curvature_labels == "sampled":
        sampled = lambda plan: sampled_curvature_rows(  # noqa: E731
            members, fisher_loss, data, config, total, show_progress, used, plan
        )
    return _finalise(root, build, config, fingerprint, sampled, used)


def default_index_config(model: nn.Module) -> IndexConfig:
    """The settings `build_index` uses when given none: `LANGUAGE_MODEL_INDEX` (what
    `ledger index` uses: the curvature's eigenvalues fitted on sampled-label gradients, shrunk
    toward KFAC) for a language model, a model whose `get_output_embeddings()` gives its
    output head (Hugging Face `...ForCausalLM` / `...LMHeadModel` objects); `IndexConfig()`
    for any other."""
    head, _ = output_head(model)
    return LANGUAGE_MODEL_INDEX if head is not None else IndexConfig()


_FINGERPRINT_PARTS = {
    "config": "the settings",
    "model": "model_info",
    "data": "data_info",
    "checkpoints": "the number of checkpoints",
}


def _check_same_build(root: Path, recorded: dict, found: dict) -> None:
    """Refuse a directory whose index was started from other settings, models or data."""
    if recorded == found:
        return
    differs = []
    for key in sorted(recorded.keys() | found.keys()):
        if key == "contents":
            was, now = recorded.get(key, {}), found.get(key, {})
            if was.get("weights_sha256") != now.get("weights_sha256"):
                differs.append("the model's weights (parameters' sha256)")
            if (was.get("data_sha256"), was.get("examples")) != (
                now.get("data_sha256"),
                now.get("examples"),
            ):
                differs.append(
                    f"the training data ({was.get('examples')} examples, sha256 "
                    f"{str(was.get('data_sha256'))[:12]} recorded; {now.get('examples')} "
                    f"examples, {str(now.get('data_sha256'))[:12]} given)"
                )
        elif recorded.get(key) != found.get(key):
            differs.append(_FINGERPRINT_PARTS.get(key, key))
    raise IndexMismatchError(
        f"{root}: this index directory was started with other settings, another model or "
        f"other data (differs in {', '.join(differs)}); build into a new directory"
    )


def _log_gradients(
    members: list[Tracked],
    loss_fn: LossFn,
    data: Iterable[Batch],
    root: Path,
    config: IndexConfig,
    show_progress: bool,
    total: int | None = None,
) -> None:
    """Projected gradients of this rank's share of the index blocks (every block in one
    process), written by a `BlockWriter` (from pinned host buffers on a GPU, overlapping the
    next batch's compute); complete blocks are skipped. A batch is run when one of its
    examples lies in a block still to write. `total`: examples in `data` (counted if None)."""
    if total is None:
        total = sum(len(b) for b in data)
    rpb = config.rows_per_block
    share = ranks().share(blocks_of(total, rpb))
    todo = {b for b in share if not block_paths(root, b)[1].exists()}
    if not todo:
        return
    first, last = min(todo) * rpb, min((max(todo) + 1) * rpb, total)
    position = 0  # examples seen so far, including skipped ones
    bar = progress(data, desc="logging gradients", enabled=show_progress, unit="batch")
    writer = BlockWriter(root, rpb, config.dtype, total)
    with members_eval_mode(members), writer:
        for batch in bar:
            start, n = position, len(batch)
            position += n
            if start + n <= first:
                continue
            if start >= last:
                break
            keep = [j for j in range(n) if (start + j) // rpb in todo]
            if not keep:
                continue
            g = tracked_gradients(members, loss_fn, batch)[keep]
            meta = [
                {
                    "example_id": batch.example_ids[j],
                    "shard": batch.shards[j] if batch.shards else "",
                    "provider": batch.providers[j] if batch.providers else "",
                    "token_count": int(batch.token_counts[j]) if batch.token_counts else 0,
                }
                for j in keep
            ]
            ids = [batch.example_ids[j] for j in keep]
            writer.add(g, meta, ids, [(start + j) // rpb for j in keep])


def _finalise(
    root: Path,
    build: dict,
    config: IndexConfig,
    fingerprint: dict,
    curvature_rows: Callable[[BlockPlan | None], Iterable[tuple[int | None, np.ndarray]]]
    | None = None,
    curvature_used: dict | None = None,
) -> GradientIndex:
    """Curvature (from `curvature_rows(plan)`, (unit, rows) pairs, when given, else from the
    stored rows) and self-influence of the stored rows, then the metadata and manifest.
    `curvature_used`: {"examples": n} once `curvature_rows` has run, recorded in the manifest.

    Under torchrun each rank sums its share (`attribution.distributed`); the main rank fits and
    saves the curvature, every rank computes its blocks' self-influence, and the main rank
    writes the metadata and manifest."""
    rank = ranks()
    blocks = completed_blocks(root)
    if not blocks:
        raise ValueError("the training data yielded no example: nothing to index")
    grad_files = [block_paths(root, i)[0] for i in blocks]
    slices = layer_slices(build["layers"])
    factors = load_factors(root / FACTORS_FILE, [s.name for s in slices])
    rows = sum(np.load(path, mmap_mode="r").shape[0] for path in grad_files)
    mine = rank.share(len(blocks))
    pass_name = "curvature (sampled-label pass)" if curvature_rows else "curvature (stored rows)"
    with _timed(pass_name):
        if config.curvature == "full":  # one process (`_check_config`)
            source = (
                (lambda: (r for _, r in curvature_rows(None)))
                if curvature_rows
                else (lambda: (np.load(path, mmap_mode="r") for path in grad_files))
            )
            curvature = fit_curvature(source, slices, config.damping_factor, "full")
        else:
            curvature = _fit_ekfac_shares(
                root, slices, factors, config, len(blocks), curvature_rows
            )
    sampled = (curvature_used or {}).get("examples", rows)
    with _timed("self-influence, hashes, manifest"):
        if rank.main:
            if config.curvature == "ekfac" and sampled < rows:
                curvature = shrink_to_kfac(
                    curvature, factors, sampled, config.curvature_prior_examples
                )
            curvature.save(root / CURVATURE_FILE)
        barrier()
        curvature = Curvature.load(root / CURVATURE_FILE, slices)
        done = gather_to_main(  # each rank's blocks: self-influence and sha256
            {
                b: (
                    curvature.self_influence(np.load(grad_files[b], mmap_mode="r")),
                    _sha256(grad_files[b]),
                )
                for b in mine
            }
        )
        if rank.main:
            _write_metadata(root, blocks, np.concatenate([done[b][0] for b in blocks]))
            digests = [done[b][1] for b in blocks]
            factor_examples = factors[0].examples if factors else rows
            _write_manifest(
                root, build, fingerprint, rows, sampled, grad_files, digests, factor_examples
            )
    barrier()
    return GradientIndex.open(root)


def _fit_ekfac_shares(
    root: Path,
    slices: list,
    factors: list[KfacFactors],
    config: IndexConfig,
    blocks: int,
    curvature_rows: Callable | None,
) -> Curvature | None:
    """The EKFAC curvature from the second moments of this rank's rows (its blocks' stored
    rows, or its units of `curvature_rows`), summed over every rank in the fixed tree of
    `attribution.distributed`: on the main rank; None on the others."""
    layers = ekfac_layers(slices, kfac_bases(factors))
    draws = config.curvature_draws if curvature_rows else 1
    plan = BlockPlan(config.rows_per_block, blocks, repeats=draws)

    def add(unit: int, g: np.ndarray) -> None:
        plan.add(unit, [*second_moments(layers, slices, g), np.array([float(g.shape[0])])])

    if curvature_rows:
        for unit, g in curvature_rows(plan):
            add(unit, g)
    else:
        for b in ranks().share(blocks):
            add(b, np.load(block_paths(root, b)[0], mmap_mode="r"))
    total = plan.finish(blocks * config.rows_per_block)
    if not ranks().main:
        return None
    if total is None:
        raise ValueError("curvature needs at least one training example")
    fitted = with_second_moments(layers, total[:-1], int(total[-1][0]))
    return Curvature(slices, fitted).with_damping(config.damping_factor)


def _write_metadata(root: Path, blocks: list[int], self_influence: np.ndarray) -> None:
    meta = pl.concat([pl.read_parquet(block_paths(root, i)[1]) for i in blocks])
    meta = meta.with_row_index("row").with_columns(
        pl.Series("self_influence", self_influence, dtype=pl.Float64)
    )
    tmp = root / (METADATA_FILE + ".tmp")
    meta.write_parquet(tmp)
    tmp.replace(root / METADATA_FILE)


def _write_manifest(
    root: Path,
    build: dict,
    fingerprint: dict,
    rows: int,
    sampled: int,
    grad_files: list[Path],
    digests: list[str],
    factor_examples: int,
) -> None:
    blocks = [block_paths(root, i)[1] for i in range(len(grad_files))]
    providers = pl.concat([pl.read_parquet(p, columns=["provider"]) for p in blocks])
    build = {**build, "blocks": len(grad_files)}
    write_json(root / BUILD_FILE, build)
    manifest = seal(
        {
            "kind": "gradient-index",
            "config": fingerprint["config"],
            "model": fingerprint["model"],
            "data": fingerprint["data"],
            **({"contents": fingerprint["contents"]} if "contents" in fingerprint else {}),
            **({"checkpoints": fingerprint["checkpoints"]} if "checkpoints" in fingerprint else {}),
            "layers": build["layers"],
            "rows": rows,
            "curvature_examples_used": sampled,
            "factor_examples_used": factor_examples,
            "dim": build["dim"],
            "blocks": [
                {"file": p.name, "sha256": d} for p, d in zip(grad_files, digests, strict=True)
            ],
            "projections_sha256": _sha256(root / PROJECTIONS_FILE),
            "factors_sha256": _sha256(root / FACTORS_FILE),
            "curvature_sha256": _sha256(root / CURVATURE_FILE),
            "providers": sorted(providers["provider"].unique().to_list()),
            "packages": package_versions(),
            "code_version": code_version(),
        }
    )
    write_json(root / MANIFEST_FILE, manifest)
