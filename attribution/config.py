"""Typed settings of the attribution core. Every field is recorded in the index manifest."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from numbers import Integral
from typing import Literal

ProjectionKind = Literal["random", "pca", "identity"]
StorageDType = Literal["float32", "float16"]
CurvatureKind = Literal["ekfac", "full"]
FisherLabels = Literal["sampled", "data"]
HeadProjection = Literal["random", "pca"]
QueryLoss = Literal["sum", "mean"]

DEFAULT_MAX_LENGTH = 128
"""Tokens per training chunk when none is given (capped at the model's position limit)."""

# Defaults chosen from the counterfactual accuracy measurements (benchmarks/results/accuracy.md).
DEFAULT_K = 32
DEFAULT_CURVATURE = "ekfac"
DEFAULT_DAMPING_FACTOR = 0.01
DEFAULT_FISHER_LABELS = "sampled"
DEFAULT_HEAD_PROJECTION = "random"
DEFAULT_HEAD_K_OUT = 1024
DEFAULT_CURVATURE_LABELS = "data"
DEFAULT_LM_CURVATURE_LABELS = "sampled"
"""Language models (`attribution.language`, `ledger index`) fit the curvature's eigenvalues on
sampled-label gradients by default; see benchmarks/accuracy/rationale.md."""
DEFAULT_CURVATURE_EXAMPLES = 1024
DEFAULT_FACTOR_EXAMPLES = 1024
"""The first pass (KFAC factors: PCA directions and the EKFAC eigenbasis) runs on at most about
this many examples spread over the data; see `IndexConfig.factor_examples`."""
DEFAULT_CURVATURE_PRIOR_EXAMPLES = 0
DEFAULT_LM_CURVATURE_PRIOR_EXAMPLES = 64
"""Language models shrink EKFAC eigenvalues fitted on a sample smaller than the data toward
KFAC as if seen in 64 more examples; other models fit them on the stored rows, all of them,
and do not (see benchmarks/accuracy/rationale.md)."""


@dataclass(frozen=True)
class ProjectionConfig:
    """How each tracked layer's gradient is projected (LoGra, Kronecker-structured)."""

    kind: ProjectionKind = "pca"
    """`random`: seeded random orthonormal rows for P_in, P_out. `pca`: top eigenvectors of the
    layer's KFAC factors (input and output-gradient covariances), from a first pass over the
    data.
    `identity`: no projection (full gradients; exact, only for tiny models)."""
    k_in: int = DEFAULT_K
    """Rows of P_in (projected input dimension); capped at the layer's input width."""
    k_out: int = DEFAULT_K
    """Rows of P_out (projected output-gradient dimension); capped at the layer's output width."""
    seed: int = 0
    """Seed of random projections; combined with the module name, never with a rank."""
    modules: tuple[str, ...] = ()
    """Glob patterns of module names to track (`transformer.h.*.mlp.*`); empty tracks every
    Linear / Conv1D / Conv2d layer (the output head whose weight is tied to the input embedding only
    with `tied_head`)."""
    tied_head: bool = True
    """Without module patterns, also track an output head whose weight is tied to the input
    embedding (GPT-2): its part of the shared weight's gradient, as a layer of its own. With
    module patterns, the head is tracked only when a pattern matches its name (`lm_head`);
    building an index says so in a one-line warning when this is set and none does."""
    head_projection: HeadProjection = DEFAULT_HEAD_PROJECTION
    """How `pca` projects the output head's vocabulary side (P_out of the layer that gives the
    logits, `model.get_output_embeddings()`): `random` (seeded random rows; PCA would keep only
    the most frequent tokens' directions and needs a vocabulary × vocabulary factor) or `pca`.
    Its input side is PCA either way."""
    head_k_out: int | None = DEFAULT_HEAD_K_OUT
    """Rows of the output head's P_out (its vocabulary side; capped at the vocabulary), under
    either kind; None: `k_out` like every other layer. A `per_layer` entry for the head wins."""
    per_layer: tuple[tuple[str, int, int], ...] = ()
    """Overrides `(glob, k_in, k_out)`, first match wins."""

    def __post_init__(self) -> None:
        if self.kind not in ("random", "pca", "identity"):
            raise ValueError(f"unknown projection kind '{self.kind}' (random, pca or identity)")
        if self.head_projection not in ("random", "pca"):
            raise ValueError(f"unknown head_projection '{self.head_projection}' (random or pca)")
        sizes = [("k_in", self.k_in), ("k_out", self.k_out)]
        if self.head_k_out is not None:
            sizes.append(("head_k_out", self.head_k_out))
        for pattern, k_in, k_out in self.per_layer:
            sizes += [
                (f"per_layer '{pattern}' k_in", k_in),
                (f"per_layer '{pattern}' k_out", k_out),
            ]
        for name, value in sizes:
            if self.kind != "identity" and (not isinstance(value, Integral) or value < 1):
                raise ValueError(f"projection {name} must be a positive integer, got {value!r}")

    def dims_for(self, name: str, n_in: int, n_out: int, head: bool = False) -> tuple[int, int]:
        """Projected (k_in, k_out) of the layer `name` with input width n_in, output n_out;
        `head`: the layer is the model's output head (`head_k_out`)."""
        k_in, k_out = self.k_in, self.k_out
        if head and self.head_k_out is not None:
            k_out = self.head_k_out
        for pattern, pk_in, pk_out in self.per_layer:
            if fnmatch.fnmatchcase(name, pattern):
                k_in, k_out = pk_in, pk_out
                break
        return min(k_in, n_in), min(k_out, n_out)

    def tracks(self, name: str) -> bool:
        return not self.modules or any(fnmatch.fnmatchcase(name, p) for p in self.modules)


@dataclass(frozen=True)
class IndexConfig:
    """How the gradient index is built and stored."""

    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    dtype: StorageDType = "float32"
    """Storage precision of the projected gradients; curvature is always float64 when built."""
    curvature: CurvatureKind = DEFAULT_CURVATURE
    """`ekfac`: the eigenbasis of the layer's projected KFAC factors with eigenvalues corrected
    to the stored gradients; `full`: the dense projected empirical Fisher (see
    attribution/curvature.py)."""
    fisher_labels: FisherLabels = DEFAULT_FISHER_LABELS
    """Labels of the first pass that estimates the KFAC factors (PCA directions and the EKFAC
    eigenbasis): `sampled` draws each target from the model's own predictive distribution (the
    true Fisher; needs a `fisher_loss`), `data` uses the training labels (empirical Fisher).
    The stored gradients, and so the EKFAC eigenvalues, always use the training labels."""
    curvature_labels: FisherLabels = DEFAULT_CURVATURE_LABELS
    """Labels of the gradients the curvature is fitted on (the EKFAC eigenvalues, or the full
    Fisher): `data`, the stored training-label gradients; `sampled`, a further pass of
    gradients of labels drawn from the model (`curvature_draws` draws per example; needs a
    `fisher_loss`). The stored and scored gradients use the training labels either way."""
    factor_examples: int | None = DEFAULT_FACTOR_EXAMPLES
    """At most about this many training examples (whole batches, spread evenly over the data
    in its order, as for `curvature_examples`) go through the first pass that estimates the
    KFAC factors (the PCA directions and the EKFAC eigenbasis); None: every example. The
    factors are token-level covariances: 1,024 examples of 128 tokens are 131,072 tokens per
    factor, many times any layer's width, and the pass costs about two training steps per
    example, so on a large corpus a pass over all of it would cost more than the rest of the
    build (benchmarks/index_cost.py). The EKFAC eigenvalues still come from their own rows."""
    curvature_draws: int = 1
    """Independent label draws per example when `curvature_labels` is `sampled`."""
    curvature_examples: int | None = DEFAULT_CURVATURE_EXAMPLES
    """At most about this many training examples (whole batches, spread evenly over the data
    in its order) go through the pass of `curvature_labels="sampled"`; None: every example.
    Bounds that pass's cost on a large corpus: each of the d eigenvalues per layer is a mean
    over the examples, and the sample's are shrunk toward KFAC (`curvature_prior_examples`);
    on the accuracy harness's language models a quarter of the examples cost 0.006 to 0.007
    LDS (benchmarks/accuracy/sample_sizes.py). 1,024 rather than more keeps the whole build
    under one epoch of training (benchmarks/index_cost.py)."""
    curvature_prior_examples: int = DEFAULT_CURVATURE_PRIOR_EXAMPLES
    """When the EKFAC eigenvalues come from fewer examples than the index holds (the
    `curvature_examples` sample), each is shrunk toward the layer's KFAC eigenvalue (the
    product of its factors' eigenvalues, rescaled to the sample's trace) as if that had been
    seen in this many further examples: (m·ê + m0·c·κ) / (m + m0). A direction that no example
    of the sample touched then keeps curvature from the whole data's factors instead of
    resting on the damping alone. 0: no shrinkage. The damping is unchanged (the traces are
    equal)."""
    damping_factor: float = DEFAULT_DAMPING_FACTOR
    """λ_l = damping_factor × mean eigenvalue of the layer's projected Fisher."""
    rows_per_block: int = 1024
    """Rows per on-disk block; a killed build resumes from the last completed block."""

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> IndexConfig:
        p = dict(d["projection"])
        p["modules"] = tuple(p.get("modules", ()))
        p["per_layer"] = tuple(tuple(x) for x in p.get("per_layer", ()))
        # Indexes written before these settings existed skipped a tied head and used PCA on
        # every side.
        p.setdefault("tied_head", False)
        p.setdefault("head_projection", "pca")
        p.setdefault("head_k_out", None)
        return IndexConfig(
            projection=ProjectionConfig(**p),
            dtype=d["dtype"],
            curvature=d.get("curvature", "full"),
            fisher_labels=d.get("fisher_labels", "data"),
            curvature_labels=d.get("curvature_labels", "data"),
            curvature_draws=d.get("curvature_draws", 1),
            # Indexes written before the setting existed ran the first pass over every example.
            factor_examples=d.get("factor_examples"),
            # Indexes written before the setting existed ran the pass over every example.
            curvature_examples=d.get("curvature_examples"),
            curvature_prior_examples=d.get("curvature_prior_examples", 0),
            damping_factor=d["damping_factor"],
            rows_per_block=d["rows_per_block"],
        )


@dataclass(frozen=True)
class ScoreConfig:
    """How queries are scored against an index."""

    relatif: bool = True
    """Divide each influence by sqrt(self-influence) of the training example (RelatIF)."""
    top_k: int = 10
    """Training examples kept per query for audit (highest score first)."""
    memory_budget_mb: int = 256
    """Upper bound on the score block held in memory (queries × rows × 4 bytes)."""
    dense: bool = False
    """Also return every score, for small cases: `ScoreResult.dense` (queries × training rows),
    the scores as ranked and summed per provider (RelatIF-scaled influence, influence /
    sqrt(self-influence), when `relatif` is true, the default; raw influence otherwise), and
    `ScoreResult.influence`, the raw influence Σ_l q_lᵀ (F_l + λ_l I)⁻¹ g_{i,l} either way."""
    query_loss: QueryLoss = "sum"
    """The query's loss (its negative utility) whose gradient is scored: `sum`, the loss
    function's value as it is (for a language model the completion's summed negative
    log-likelihood); `mean`, that divided by the query's number of scored tokens (the mean per
    completion token: the labels other than -100 after the first position when the batch's
    inputs hold `labels`, else `Batch.token_counts`). Under `sum` a long output has a larger
    gradient, and so larger scores, than a short one; under `mean` outputs of any length
    weigh alike. One query's scores are all scaled by the same factor, so its provider shares
    and the order of its top examples are the same under both; its raw scores (`signed`,
    `positive`, `top_scores`, `dense`) are not. Recorded in an attribution run's manifest
    (`score.query_loss`)."""

    def __post_init__(self) -> None:
        if self.query_loss not in ("sum", "mean"):
            raise ValueError(f"unknown query_loss '{self.query_loss}' (sum or mean)")


LANGUAGE_MODEL_INDEX = IndexConfig(
    curvature_labels=DEFAULT_LM_CURVATURE_LABELS,
    curvature_prior_examples=DEFAULT_LM_CURVATURE_PRIOR_EXAMPLES,
)
"""The defaults of a causal language model's index (`attribution.language`, `ledger index`):
`IndexConfig`'s, with the curvature's eigenvalues fitted on sampled-label gradients of at most
`DEFAULT_CURVATURE_EXAMPLES` examples, shrunk toward KFAC when that is fewer than the data
(`DEFAULT_LM_CURVATURE_PRIOR_EXAMPLES`)."""
