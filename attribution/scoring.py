"""Streaming scores: one pass over the index serves a whole batch of queries.

influence(q, i) = Σ_l q_lᵀ (F_l + λ_l I)⁻¹ g_{i,l}: queries are preconditioned once, then each
block of training rows costs one matrix product. RelatIF divides by sqrt(self-influence);
provider sums keep the positive part. Memory is bounded by the block size (from a budget), not
by the number of training rows. Rows are multiplied straight from the memory-mapped block files
(float16 rows through a small conversion buffer); the kernel is asked to read the next chunk's
files ahead while the current one is scored.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import polars as pl
import torch
from torch import nn

from attribution.config import QueryLoss, ScoreConfig
from attribution.device import (
    DEFAULT_DEVICE,
    DeviceSpec,
    exact_float32,
    place_model,
    resolve_device,
)
from attribution.projection import members_eval_mode, split_members, tracked_gradients
from attribution.store import GradientIndex
from attribution.types import Batch, LossFn

MAX_QUERIES_PER_PASS = 1024


def scored_tokens(batch: Batch) -> torch.Tensor:
    """Each query's number of scored tokens, (B,): under the language-model convention
    (`inputs` holding `labels`, -100 where not scored, position t predicting labels[t + 1])
    the labels other than -100 after the first position; else `batch.token_counts`."""
    inputs = batch.inputs
    if isinstance(inputs, Mapping) and isinstance(inputs.get("labels"), torch.Tensor):
        return (inputs["labels"][:, 1:] != -100).sum(dim=1)
    if len(batch.token_counts) == len(batch):
        return torch.as_tensor([int(n) for n in batch.token_counts])
    raise ValueError(
        "query_loss='mean' needs each query's number of scored tokens: inputs with 'labels' "
        "(-100 where not scored) or Batch.token_counts"
    )


def mean_query_loss(loss_fn: LossFn) -> LossFn:
    """`loss_fn` divided by each query's number of scored tokens (`scored_tokens`)."""

    def mean_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        counts = scored_tokens(batch)
        if (counts < 1).any():
            bad = batch.example_ids[int((counts < 1).nonzero()[0])]
            raise ValueError(f"query '{bad}' has no scored token: query_loss='mean' cannot use it")
        losses = loss_fn(model, batch)
        return losses / counts.to(device=losses.device, dtype=losses.dtype)

    return mean_loss


def query_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    index: GradientIndex,
    checkpoints: Sequence[nn.Module] = (),
    query_loss: QueryLoss = "sum",
    device: DeviceSpec = DEFAULT_DEVICE,
) -> tuple[list[str], np.ndarray]:
    """Projected gradients of the queries' losses with the index's projectors: (ids, (n, D)).

    The query loss is the negative utility (for language models the completion's summed
    negative log-likelihood; with `query_loss="mean"` divided by its number of scored tokens,
    see `ScoreConfig.query_loss`), so a positive score means the training example made the
    output more likely. An index built over further checkpoints needs the same ones, in the
    same order (`checkpoints`). `device`: where the model runs (see `build_index`; the model
    and checkpoints are moved there).
    """
    target = resolve_device(device)
    if query_loss not in ("sum", "mean"):
        raise ValueError(f"unknown query_loss '{query_loss}' (sum or mean)")
    if query_loss == "mean":
        loss_fn = mean_query_loss(loss_fn)
    if len(checkpoints) != index.checkpoints:
        raise ValueError(
            f"the index {index.root} was built over {index.checkpoints} further checkpoint(s) "
            f"besides the model; {len(checkpoints)} given"
        )
    for m in (model, *checkpoints):
        place_model(m, target)
    members = split_members(
        [model, *checkpoints], index.config.projection, index.projectors(), str(index.root)
    )
    ids: list[str] = []
    grads: list[np.ndarray] = []
    with members_eval_mode(members):
        for batch in batches:
            g = tracked_gradients(members, loss_fn, batch)
            grads.append(g.detach().double().cpu().numpy())
            ids.extend(batch.example_ids)
    if not grads:
        return ids, np.zeros((0, index.dim))
    return ids, np.concatenate(grads)


def precondition(index: GradientIndex, query_grads: np.ndarray) -> np.ndarray:
    """(n, D) raw query gradients → (F + λI)⁻¹ q per layer (float64)."""
    return index.curvature.precondition(query_grads)


def _inverse_sqrt(self_influence: np.ndarray) -> np.ndarray:
    """RelatIF's column scale 1 / sqrt(self-influence); 0 where the self-influence is 0."""
    s = np.asarray(self_influence, dtype=np.float64)
    out = np.zeros_like(s)
    np.divide(1.0, np.sqrt(s, where=s > 0, out=np.zeros_like(s)), where=s > 0, out=out)
    return out


@dataclass
class ScoreResult:
    """Scores of a batch of queries against every training row of an index."""

    query_ids: list[str]
    providers: list[str]
    positive: np.ndarray
    """(n_queries, n_providers): Σ_{i∈p} max(r_qi, 0), r the (RelatIF) score."""
    signed: np.ndarray
    """(n_queries, n_providers): Σ_{i∈p} r_qi (all scores, for comparison)."""
    top_rows: np.ndarray
    """(n_queries, k): index rows of the highest scores, best first (-1 where fewer rows)."""
    top_scores: np.ndarray
    """(n_queries, k): those scores."""
    dense: np.ndarray | None = None
    """(n_queries, n_rows) every score as ranked and summed (RelatIF-scaled influence under
    `ScoreConfig(relatif=True)`, the default), with `ScoreConfig(dense=True)`; else None."""
    influence: np.ndarray | None = None
    """(n_queries, n_rows) the raw influence of every training row on every query (not
    divided by sqrt(self-influence)), with `ScoreConfig(dense=True)`; else None."""

    def shares(self) -> np.ndarray:
        """Per-query provider shares of the positive part; rows of zeros when unattributed."""
        total = self.positive.sum(axis=1, keepdims=True)
        out = np.zeros_like(self.positive)
        np.divide(self.positive, total, where=total > 0, out=out)
        return out

    def unattributed(self) -> np.ndarray:
        """True for queries whose scores are all non-positive (no credit to give)."""
        return ~(self.positive.sum(axis=1) > 0)


def _chunks(index: GradientIndex, rows_per_chunk: int) -> Iterator[tuple[int, list[np.ndarray]]]:
    """Consecutive (first row, parts) chunks of `rows_per_chunk` rows (fewer in the last one).

    `parts` are row ranges of the block files, memory-mapped copy-on-write (never written), in
    their stored dtype; nothing is copied here. A mapping is released once the chunks using it
    are dropped, so resident pages never accumulate. Before a chunk is yielded, the kernel is
    told to read ahead the files of the following chunk (the IO overlaps the scoring).
    """
    files = index.block_files()
    rows_per_block = max(int(index.build["config"].get("rows_per_block", 1)), 1)
    ahead = -(-rows_per_chunk // rows_per_block) + 1  # files spanned by one chunk, plus one
    advised = 0
    parts: list[np.ndarray] = []
    filled, start = 0, 0
    for number, path in enumerate(files):
        while advised < min(len(files), number + 1 + ahead):
            _read_ahead(files[advised])
            advised += 1
        mm = np.load(path, mmap_mode="c")
        offset = 0
        while offset < mm.shape[0]:
            take = min(rows_per_chunk - filled, mm.shape[0] - offset)
            parts.append(mm[offset : offset + take])
            filled += take
            offset += take
            if filled == rows_per_chunk:
                yield start, parts
                start += filled
                parts, filled = [], 0
        del mm
    if parts:
        yield start, parts


def _read_ahead(path: os.PathLike) -> None:
    """Ask the kernel to start reading a file into the page cache (no-op where unsupported)."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def rows_per_chunk(n_queries: int, dim: int, budget_mb: int) -> int:
    """Rows of one block so that its scores and gradients fit the memory budget."""
    # scores, their positive part (or provider-sorted copy), the chunk's mapped gradient rows
    # and headroom for the next chunk's read-ahead
    per_row = 4 * (2 * n_queries + 2 * dim)
    return max(1, (budget_mb << 20) // per_row)


def score(
    index: GradientIndex,
    query_grads: np.ndarray,
    config: ScoreConfig | None = None,
    query_ids: list[str] | None = None,
    device: DeviceSpec = DEFAULT_DEVICE,
) -> ScoreResult:
    """Score raw (un-preconditioned) query gradients (n, D) against every row of `index`.

    `device`: where the rows are multiplied (`auto`: the first GPU when torch sees one). On a
    GPU the blocks stream from disk through pinned host buffers, and the provider sums and
    top-k are taken there too (`_score_pass_torch`); on the CPU the rows are multiplied
    straight from the memory-mapped files."""
    config = config or ScoreConfig()
    target = resolve_device(device)
    score_pass = _score_pass if target.type == "cpu" else partial(_score_pass_torch, device=target)
    if not isinstance(config.top_k, int) or config.top_k < 0:
        raise ValueError(f"top_k must be 0 or a positive integer, got {config.top_k!r}")
    if not config.memory_budget_mb >= 0:  # 0: the smallest chunks (one row at a time)
        raise ValueError(f"memory_budget_mb must be 0 or positive, got {config.memory_budget_mb!r}")
    n_q = query_grads.shape[0]
    if query_grads.ndim != 2 or query_grads.shape[1] != index.dim:
        raise ValueError(f"query gradients must be (n, {index.dim}), got {query_grads.shape}")
    query_ids = query_ids if query_ids is not None else [str(i) for i in range(n_q)]
    if not np.isfinite(query_grads).all():
        bad = query_ids[int((~np.isfinite(query_grads)).any(axis=1).nonzero()[0][0])]
        raise ValueError(f"gradient of query '{bad}' is not finite")
    providers, codes = index.provider_codes()
    inv_sqrt = _inverse_sqrt(index.self_influence) if config.relatif else np.ones(index.rows)
    parts = [
        score_pass(
            index,
            query_grads[a : a + MAX_QUERIES_PER_PASS],
            config,
            codes,
            inv_sqrt,
            len(providers),
        )
        for a in range(0, max(n_q, 1), MAX_QUERIES_PER_PASS)
    ]
    positive = np.concatenate([p[0] for p in parts])
    signed = np.concatenate([p[1] for p in parts])
    broken = ~(np.isfinite(positive) & np.isfinite(signed)).all(axis=1)
    if broken.any():
        bad = query_ids[int(broken.nonzero()[0][0])]
        raise ValueError(
            f"scores of query '{bad}' are not finite: they leave float32's range (a gradient "
            "or curvature of extreme scale); nothing was recorded"
        )
    return ScoreResult(
        query_ids=query_ids,
        providers=providers,
        positive=positive,
        signed=signed,
        top_rows=np.concatenate([p[2] for p in parts]),
        top_scores=np.concatenate([p[3] for p in parts]),
        dense=np.concatenate([p[4] for p in parts], axis=0) if config.dense else None,
        influence=np.concatenate([p[5] for p in parts], axis=0) if config.dense else None,
    )


def _add_provider_sums(
    st: np.ndarray,
    codes: np.ndarray,
    signed: np.ndarray,
    positive: np.ndarray,
    buffer: np.ndarray | None = None,
) -> None:
    """Add Σ_{rows i of provider p} st[i] (and of max(st[i], 0)) to signed[:, p] (positive).

    `st` is a (rows, queries) float32 score chunk (left unchanged), `codes` the rows' provider
    numbers. Rows that come in runs, as rows of one shard do, are summed run by run (numpy's
    pairwise sums over contiguous rows). Rows of many short runs are added into their
    provider's row with one `index_add_` each for the signed scores and the positive part, so
    no sorted copy of the scores is made. Either way the work is a few passes over the chunk.
    The positive part is written into `buffer` (same shape as `st`) when given: one buffer
    reused for every chunk keeps the process from collecting freed chunk-sized blocks.
    """
    pos = np.maximum(st, 0, out=buffer)
    change = np.flatnonzero(codes[1:] != codes[:-1]) + 1
    if change.size + 1 <= max(64, codes.size // 64):
        bounds = np.concatenate(([0], change, [codes.size]))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            p = int(codes[a])
            signed[:, p] += st[a:b].sum(axis=0)
            positive[:, p] += pos[a:b].sum(axis=0)
        return
    rows = torch.from_numpy(st)
    index = torch.from_numpy(np.asarray(codes, dtype=np.int64))
    shape = (signed.shape[1], st.shape[1])
    signed += torch.zeros(shape).index_add_(0, index, rows).numpy().T
    positive += torch.zeros(shape).index_add_(0, index, torch.from_numpy(pos)).numpy().T


def _score_pass(
    index: GradientIndex,
    query_grads: np.ndarray,
    config: ScoreConfig,
    codes: np.ndarray,
    inv_sqrt: np.ndarray,
    n_providers: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    n_q, k = query_grads.shape[0], config.top_k
    q = torch.from_numpy(np.ascontiguousarray(precondition(index, query_grads), np.float32))
    positive = np.zeros((n_q, n_providers))
    signed = np.zeros((n_q, n_providers))
    top_scores = torch.full((n_q, k), -torch.inf, dtype=torch.float32)
    top_rows = torch.full((n_q, k), -1, dtype=torch.int64)
    dense = np.empty((n_q, index.rows), np.float32) if config.dense else None
    influence = np.empty((n_q, index.rows), np.float32) if config.dense else None
    chunk = min(rows_per_chunk(n_q, index.dim, config.memory_budget_mb), max(index.rows, 1))
    # Scores are computed transposed, (rows, queries): block @ qᵀ writes each block's scores
    # into contiguous rows of one reused buffer, and per-provider sums become sums of row runs.
    qt = q.T.contiguous()  # (D, n_q)
    scores = torch.empty(chunk, n_q, dtype=torch.float32)
    positive_part = np.empty((chunk, n_q), np.float32)
    convert: np.ndarray | None = None  # float32 rows of a lower-precision part
    for start, parts in _chunks(index, chunk):
        r = 0
        for part in parts:
            n = part.shape[0]
            if part.dtype != np.float32:
                if convert is None or convert.shape[0] < n:
                    convert = np.empty((n, index.dim), np.float32)
                np.copyto(convert[:n], part)
                part = convert[:n]
            torch.mm(torch.from_numpy(part), qt, out=scores[r : r + n])
            r += n
        del parts, part  # drop the mappings before the next chunk is mapped
        st = scores[:r]  # (r, n_q)
        if influence is not None:
            influence[:, start : start + r] = st.T.numpy()
        st *= torch.from_numpy(inv_sqrt[start : start + r].astype(np.float32))[:, None]
        _add_provider_sums(
            st.numpy(), codes[start : start + r], signed, positive, positive_part[:r]
        )
        if dense is not None:
            dense[:, start : start + r] = st.T.numpy()
        kk = min(k, r)
        bs, bi = torch.topk(st, kk, dim=0)  # (kk, n_q)
        merged_s = torch.cat([top_scores, bs.T], dim=1)
        merged_r = torch.cat([top_rows, bi.T + start], dim=1)
        order = torch.argsort(merged_s, dim=1, descending=True, stable=True)[:, :k]
        top_scores = torch.gather(merged_s, 1, order)
        top_rows = torch.gather(merged_r, 1, order)
    top_rows[torch.isinf(top_scores)] = -1
    return positive, signed, top_rows.numpy(), top_scores.double().numpy(), dense, influence


def _score_pass_torch(
    index: GradientIndex,
    query_grads: np.ndarray,
    config: ScoreConfig,
    codes: np.ndarray,
    inv_sqrt: np.ndarray,
    n_providers: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """`_score_pass` with the products, provider sums and top-k on `device` (a GPU; the CPU
    only in tests). Each chunk of rows is copied from the memory-mapped blocks into one of two
    host staging buffers (pinned on a GPU) and sent to the device without blocking, so the
    copy of chunk n + 1 overlaps the scoring of chunk n; a buffer is refilled only once its
    last copy is complete. Provider sums are a one-hot (providers × rows) matrix times the
    chunk's scores, in float32 per chunk and float64 across chunks: the same order of sums on
    every run (no atomic scatter-add), so credits do not change from run to run."""
    n_q, k = query_grads.shape[0], config.top_k
    pre = np.ascontiguousarray(precondition(index, query_grads).T, np.float32)
    qt = torch.from_numpy(pre).to(device)  # (D, n_q)
    codes_t = torch.from_numpy(np.asarray(codes, dtype=np.int64)).to(device)
    scale = torch.from_numpy(np.asarray(inv_sqrt, dtype=np.float32)).to(device)
    providers = torch.arange(n_providers, device=device)[:, None]
    positive = torch.zeros(n_providers, n_q, dtype=torch.float64, device=device)
    signed = torch.zeros(n_providers, n_q, dtype=torch.float64, device=device)
    top_scores = torch.full((n_q, k), -torch.inf, dtype=torch.float32, device=device)
    top_rows = torch.full((n_q, k), -1, dtype=torch.int64, device=device)
    dense = np.empty((n_q, index.rows), np.float32) if config.dense else None
    influence = np.empty((n_q, index.rows), np.float32) if config.dense else None
    # The one-hot provider matrix adds 4 bytes per row and provider to the chunk's footprint.
    per_row_mb = n_providers / max(2 * n_q + 2 * index.dim, 1)
    budget = max(int(config.memory_budget_mb / (1 + per_row_mb)), 0)
    chunk = min(rows_per_chunk(n_q, index.dim, budget), max(index.rows, 1))
    pinned = device.type == "cuda"
    staging: list[torch.Tensor | None] = [None, None]
    copied: list[torch.cuda.Event | None] = [None, None]
    with exact_float32():
        for number, (start, parts) in enumerate(_chunks(index, chunk)):
            slot = number % 2
            if copied[slot] is not None:
                copied[slot].synchronize()
            dtype = torch.from_numpy(parts[0][:0]).dtype
            host = staging[slot]
            if host is None or host.dtype != dtype:
                host = torch.empty((chunk, index.dim), dtype=dtype, pin_memory=pinned)
                staging[slot] = host
            view, r = host.numpy(), 0
            for part in parts:
                np.copyto(view[r : r + part.shape[0]], part)
                r += part.shape[0]
            del parts, part, view  # drop the mappings before the next chunk is mapped
            rows = host[:r].to(device, non_blocking=True)
            if pinned:
                copied[slot] = torch.cuda.Event()
                copied[slot].record(torch.cuda.current_stream(device))
            st = rows.float() @ qt  # (r, n_q)
            if influence is not None:
                influence[:, start : start + r] = st.T.cpu().numpy()
            st *= scale[start : start + r, None]
            onehot = (codes_t[None, start : start + r] == providers).float()  # (P, r)
            signed += (onehot @ st).double()
            positive += (onehot @ st.clamp(min=0)).double()
            if dense is not None:
                dense[:, start : start + r] = st.T.cpu().numpy()
            bs, bi = torch.topk(st, min(k, r), dim=0)  # (kk, n_q)
            merged_s = torch.cat([top_scores, bs.T], dim=1)
            merged_r = torch.cat([top_rows, bi.T + start], dim=1)
            order = torch.argsort(merged_s, dim=1, descending=True, stable=True)[:, :k]
            top_scores = torch.gather(merged_s, 1, order)
            top_rows = torch.gather(merged_r, 1, order)
    top_rows[torch.isinf(top_scores)] = -1
    return (
        positive.T.cpu().numpy(),
        signed.T.cpu().numpy(),
        top_rows.cpu().numpy(),
        top_scores.double().cpu().numpy(),
        dense,
        influence,
    )


def top_examples(index: GradientIndex, result: ScoreResult, query: int) -> pl.DataFrame:
    """The audit table of one query: rank, row, score, example id, shard, provider."""
    rows = result.top_rows[query]
    keep = rows >= 0
    picked = pl.DataFrame(
        {
            "rank": np.arange(1, keep.sum() + 1),
            "row": rows[keep].astype(np.uint32),
            "score": result.top_scores[query][keep],
        }
    )
    meta = index.rows_metadata(rows[keep]).select("row", "example_id", "shard", "provider")
    return picked.join(meta, on="row", how="left")


def score_queries(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    index: GradientIndex,
    config: ScoreConfig | None = None,
    checkpoints: Sequence[nn.Module] = (),
    device: DeviceSpec = DEFAULT_DEVICE,
) -> ScoreResult:
    """Query gradients, then one streaming pass over the index: provider sums and top-k
    (`checkpoints`: those the index was built over, see `build_index`). `loss_fn` is the
    query's per-example loss (for a language model `attribution.lm.lm_loss`, on batches whose
    labels are -100 on the prompt); `config.query_loss` says whether it is summed over the
    completion's tokens (the default) or averaged. `device`: where the model runs and the rows
    are multiplied (see `score`)."""
    config = config or ScoreConfig()
    ids, grads = query_gradients(
        model, loss_fn, batches, index, checkpoints, config.query_loss, device
    )
    return score(index, grads, config, ids, device)
