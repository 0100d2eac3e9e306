"""The two benchmark settings: a digits MLP and a tiny GPT-2 on a multi-provider corpus.

A `Setting` holds everything the harness needs: training data in the fixed order the index sees
it, queries, a deterministic `train(rows, seed)` recipe (the base model is `train(all, 0)`, and
every retrain uses the very same recipe on a subset), and `evaluate(model)` giving each query's
loss and predicted class. Sizes are small so that hundreds of retrains fit in minutes on 2 CPUs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attribution import Batch, LossFn
from attribution.data import Query
from attribution.fisher import sampled_cross_entropy
from attribution.lm import (
    batch_from_token_ids,
    iter_train_examples,
    lm_fisher_loss,
    lm_loss,
    query_batches,
    train_batches,
)


@dataclass
class Setting:
    """A model family, its data and its training recipe."""

    name: str
    task: str
    """"classification" (brittleness = prediction flips) or "lm" (brittleness = loss rise)."""
    providers: np.ndarray
    """(n_train,) provider name of every training example, in index row order."""
    train_data: list[Batch]
    """Training examples in index row order (re-iterable list)."""
    query_data: list[Batch]
    train_loss: LossFn
    query_loss: LossFn
    fisher_loss: LossFn
    """The training loss with labels drawn from the model (the true Fisher's first pass)."""
    train: Callable[[np.ndarray, int], nn.Module]
    """Deterministic recipe: (training rows, seed) → trained model in eval mode."""
    evaluate: Callable[[nn.Module], np.ndarray]
    """model → (2, n_queries): query losses, predicted classes (-1 for language models)."""
    recipe: dict
    """Everything that changes the ground truth; hashed into the cache keys."""
    peer_train: list = field(default_factory=list)
    """Training examples as single items for peer libraries' DataLoaders (row order)."""
    peer_queries: list = field(default_factory=list)
    collate: Callable | None = None
    base: nn.Module | None = None
    snapshots: Callable[[tuple[int, ...]], dict[int, nn.Module]] | None = None
    """epochs → the base model's training run (all rows, seed 0) as it was after each of those
    epochs; the last epoch's is the base model itself. Language models only."""
    initial: Callable[[], nn.Module] | None = None
    """The base model's run before its first step (seed 0's initialisation)."""

    @property
    def n_train(self) -> int:
        return len(self.providers)

    @property
    def n_queries(self) -> int:
        return sum(len(b) for b in self.query_data)

    @property
    def fingerprint(self) -> str:
        text = json.dumps({"name": self.name, **self.recipe}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def base_model(self) -> nn.Module:
        if self.base is None:
            self.base = self.train(np.arange(self.n_train), 0)
        return self.base


# ---------------------------------------------------------------- digits MLP


def mlp_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-example cross-entropy, shape (B,)."""
    x, y = batch.inputs
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def mlp_fisher_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy against classes drawn from the model's own softmax, shape (B,)."""
    x, _ = batch.inputs
    return sampled_cross_entropy(model(x))


def _mlp(seed: int, n_in: int, hidden: int, n_out: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


def full_batch_fit(
    model: nn.Module, opt: torch.optim.Optimizer, x, y, rows: np.ndarray, steps: int
) -> nn.Module:
    """`steps` full-batch steps of `opt` on the cross-entropy of `rows` (sorted) of x, y; the
    model in eval mode. Full batches make a retrain a function of its rows and seed."""
    xs, ys = x[np.sort(rows)], y[np.sort(rows)]
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(xs), ys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def classifier_outputs(model: nn.Module, xq, yq) -> np.ndarray:
    """(2, queries): each query's cross-entropy and the predicted class."""
    logits = model(xq)
    loss = nn.functional.cross_entropy(logits, yq, reduction="none")
    return np.stack([loss.numpy(), logits.argmax(1).numpy()]).astype(np.float64)


def mlp_setting(
    n_train: int = 400,
    n_queries: int = 100,
    hidden: int = 32,
    steps: int = 300,
    lr: float = 0.01,
    weight_decay: float = 1e-3,
    n_providers: int = 5,
    provider_purity: float = 0.75,
    seed: int = 0,
) -> Setting:
    """MLP 64→hidden→10 on scikit-learn's digits; full-batch Adam, so retrains are exact.

    Provider p holds mostly digits {2p, 2p+1} (`provider_purity` of its examples); the rest are
    assigned at random, so providers overlap.
    """
    from sklearn.datasets import load_digits

    x_all, y_all = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y_all))
    x_all = torch.tensor(x_all[order] / 16.0, dtype=torch.float32)
    y_all = torch.tensor(y_all[order], dtype=torch.long)
    x, y = x_all[:n_train], y_all[:n_train]
    xq, yq = x_all[n_train : n_train + n_queries], y_all[n_train : n_train + n_queries]
    rng = np.random.default_rng(seed + 1)
    own = (y.numpy() // 2) % n_providers
    rand = rng.integers(0, n_providers, n_train)
    codes = np.where(rng.random(n_train) < provider_purity, own, rand)
    providers = np.array([f"provider{c}" for c in codes])
    recipe = dict(
        n_train=n_train, n_queries=n_queries, hidden=hidden, steps=steps, lr=lr,
        weight_decay=weight_decay, n_providers=n_providers, purity=provider_purity, seed=seed,
    )  # fmt: skip

    def train(rows: np.ndarray, run_seed: int) -> nn.Module:
        model = _mlp(run_seed, x.shape[1], hidden, 10)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        return full_batch_fit(model, opt, x, y, rows, steps)

    def evaluate(model: nn.Module) -> np.ndarray:
        return classifier_outputs(model, xq, yq)

    def batches(xx, yy, prov, prefix, size=64) -> list[Batch]:
        out = []
        for i in range(0, len(yy), size):
            n = len(yy[i : i + size])
            out.append(
                Batch(
                    (xx[i : i + size], yy[i : i + size]),
                    [f"{prefix}{j}" for j in range(i, i + n)],
                    providers=list(prov[i : i + size]) if prov is not None else [],
                    shards=["digits"] * n,
                    token_counts=[1] * n,
                )
            )
        return out

    return Setting(
        name="mlp-digits",
        task="classification",
        providers=providers,
        train_data=batches(x, y, providers, "train"),
        query_data=batches(xq, yq, None, "query"),
        train_loss=mlp_loss,
        query_loss=mlp_loss,
        fisher_loss=mlp_fisher_loss,
        train=train,
        evaluate=evaluate,
        recipe=recipe,
        initial=lambda: _mlp(0, x.shape[1], hidden, 10),
        peer_train=[(x[i], y[i]) for i in range(n_train)],
        peer_queries=[(xq[i], yq[i]) for i in range(len(yq))],
        collate=None,
    )


# ---------------------------------------------------------------- tiny GPT-2

LM_PROVIDERS = ["astronomy", "cooking", "law", "medicine", "sailing", "gardening"]
LM_OVERLAP_PAIRS = [("astronomy", "cooking"), ("law", "medicine")]


def zipf_topics(names: list[str], nouns: int, verbs: int, adjectives: int, seed: int = 0) -> dict:
    """Pseudo-word topics with large vocabularies drawn with Zipf's law, for `make_corpus`.

    Provider i gets `nouns`, `verbs` and `adjectives` distinct words ending in its index; the
    word of rank r appears in the topic's tuples ceil(R / r) times (R = the slot's word count),
    so uniform choice from a tuple draws its words with frequency ∝ 1 / rank: a few frequent
    words and a long tail, as in natural text, with most of a large vocabulary rare.
    """
    from attribution.synthetic import TopicSpec, pseudo_words

    def words(rng: random.Random, n: int, ending: str, index: int) -> tuple[str, ...]:
        distinct = pseudo_words(rng, n, ending, index, max_syllables=4)
        return tuple(w for r, w in enumerate(distinct, 1) for _ in range(math.ceil(n / r)))

    out = {}
    for i, name in enumerate(names):
        rng = random.Random(f"zipf-topic:{seed}:{i}")
        out[name] = TopicSpec(
            words(rng, nouns, "o", i),
            words(rng, verbs, "es", i),
            words(rng, adjectives, "ic", i),
            (),
        )
    return out


def lm_setting(
    workdir: Path,
    name: str = "gpt2-corpus",
    docs_per_provider: int = 40,
    queries_per_provider: int = 16,
    overlap: float = 0.3,
    n_embd: int = 24,
    n_layer: int = 2,
    max_length: int = 48,
    epochs: int = 12,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    vocabulary: tuple[int, int, int] | None = None,
) -> Setting:
    """GPT-2 (n_embd 24, 2 layers) on six providers: two overlapping pairs, two distinct ones.

    `vocabulary`: (nouns, verbs, adjectives) per provider, drawn with Zipf's law
    (`zipf_topics`), instead of the built-in topics' 28 words each.

    `name` names the setting (and its ground-truth cache); `SETTINGS` holds the ones the
    harness runs. Recipe: `epochs` passes over the rows in a seeded shuffled order, minibatches of
    `batch_size`, AdamW on the mean token NLL. Queries are completions sampled from the base
    model for prompts in each provider's style (`sample_queries`).
    """
    from attribution.synthetic import (
        build_word_tokenizer,
        make_corpus,
        sample_queries,
        tiny_gpt2_config,
        write_shards,
    )

    topics = (
        LM_PROVIDERS if vocabulary is None else zipf_topics(LM_PROVIDERS, *vocabulary, seed=seed)
    )
    corpus = make_corpus(
        topics, docs_per_provider, seed=seed, overlap=overlap, overlap_pairs=LM_OVERLAP_PAIRS
    )
    texts = [t for docs in corpus.values() for t in docs]
    tokenizer = build_word_tokenizer(texts)
    shards = write_shards(corpus, Path(workdir) / "shards")
    examples = list(iter_train_examples(shards, tokenizer, max_length))
    tokens = [ids for _, _, ids in examples]
    providers = np.array([shard.provider for _, shard, _ in examples])
    config = tiny_gpt2_config(
        len(tokenizer), n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=max_length
    )
    pad = tokenizer.pad_token_id
    recipe = dict(
        docs=docs_per_provider, queries=queries_per_provider, overlap=overlap, n_embd=n_embd,
        n_layer=n_layer, max_length=max_length, epochs=epochs, batch_size=batch_size, lr=lr,
        seed=seed,
    )  # fmt: skip
    if vocabulary is not None:
        recipe["vocabulary"] = list(vocabulary)

    def fit(rows: np.ndarray, run_seed: int, keep: tuple[int, ...] = ()) -> dict[int, nn.Module]:
        """The recipe's run; a copy of the model after each epoch in `keep` and the last."""
        from transformers import GPT2LMHeadModel

        torch.manual_seed(run_seed)
        model = GPT2LMHeadModel(config)
        model.train()
        gen = torch.Generator().manual_seed(run_seed)
        rows = np.sort(rows)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        kept = {}
        for epoch in range(1, epochs + 1):
            perm = rows[torch.randperm(len(rows), generator=gen).numpy()]
            for i in range(0, len(perm), batch_size):
                part = [tokens[j] for j in perm[i : i + batch_size]]
                batch = batch_from_token_ids(part, pad)
                loss = lm_loss(model, batch).sum() / sum(len(p) - 1 for p in part)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if epoch in keep and epoch < epochs:
                kept[epoch] = copy.deepcopy(model).eval()
        kept[epochs] = model.eval()
        return kept

    def train(rows: np.ndarray, run_seed: int) -> nn.Module:
        return fit(rows, run_seed)[epochs]

    def snapshots(keep: tuple[int, ...]) -> dict[int, nn.Module]:
        bad = [e for e in keep if not 1 <= e <= epochs]
        if bad:
            raise ValueError(f"epochs {bad} outside the recipe's 1..{epochs}")
        return fit(np.arange(len(tokens)), 0, tuple(keep))

    holder: dict = {}

    def evaluate(model: nn.Module) -> np.ndarray:
        with torch.no_grad():
            loss = torch.cat([lm_loss(model, b) for b in holder["queries"]])
        return np.stack([loss.numpy(), -np.ones(len(loss))]).astype(np.float64)

    setting = Setting(
        name=name,
        task="lm",
        providers=providers,
        train_data=list(train_batches(shards, tokenizer, max_length, batch_size)),
        query_data=[],
        train_loss=lm_loss,
        query_loss=lm_loss,
        fisher_loss=lm_fisher_loss,
        train=train,
        evaluate=evaluate,
        recipe=recipe,
        snapshots=snapshots,
        initial=lambda: _initial_gpt2(config),
    )
    base = setting.base_model()
    rows = sample_queries(
        base, tokenizer, corpus, queries_per_provider, seed=seed + 1,
        start=datetime(2024, 7, 1, tzinfo=UTC), end=datetime(2024, 10, 1, tzinfo=UTC),
    )  # fmt: skip
    queries = [
        Query(id=r["id"], timestamp=datetime(2024, 7, 1, tzinfo=UTC), prompt=r["prompt"],
              completion=r["completion"])
        for r in rows
    ]  # fmt: skip
    setting.query_data = list(query_batches(queries, tokenizer, max_length, batch_size))
    holder["queries"] = setting.query_data
    setting.recipe["queries_sha"] = hashlib.sha256(
        json.dumps([(r["prompt"], r["completion"]) for r in rows]).encode()
    ).hexdigest()[:16]
    setting.query_hints = [r["provider_hint"] for r in rows]  # type: ignore[attr-defined]

    def single(ids: list[int], labels: list[int]) -> dict:
        return {"input_ids": ids, "labels": labels}

    from attribution.lm import encode_query

    setting.peer_train = [single(ids, ids) for ids in tokens]
    setting.peer_queries = [single(*encode_query(q, tokenizer, max_length)) for q in queries]

    def collate(items: list[dict]) -> dict:
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n] = torch.tensor(it["input_ids"])
            labels[i, :n] = torch.tensor(it["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    setting.collate = collate
    return setting


def _initial_gpt2(config) -> nn.Module:
    """A language model's weights before training, as `lm_setting`'s run for seed 0 starts."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


SETTINGS = {
    "mlp": lambda workdir: mlp_setting(),
    "lm": lambda workdir: lm_setting(workdir / "gpt2-data"),
    # A second corpus and model: other documents and queries (seed 1), more style overlap
    # between the paired providers (0.5), and a wider model (n_embd 32), so that a default
    # chosen on one toy language model is checked on another.
    "lm-b": lambda workdir: lm_setting(
        workdir / "gpt2-b-data", name="gpt2-corpus-b", seed=1, overlap=0.5, n_embd=32
    ),
    # A third corpus with a large, Zipf-distributed vocabulary (about 2,000 tokens, ten times
    # the others', most of them rare), so that choices about the output head's vocabulary side
    # are checked where a projection keeps a small share of it.
    "lm-c": lambda workdir: lm_setting(
        workdir / "gpt2-c-data", name="gpt2-corpus-c", seed=2, vocabulary=(200, 60, 60)
    ),
    # The first corpus and model trained a quarter as long (3 epochs against 12): whether a
    # language model far from convergence wants the larger damping that short-trained
    # classifiers want.
    "lm-short": lambda workdir: lm_setting(
        workdir / "gpt2-data", name="gpt2-corpus-short", epochs=3
    ),
    # Blocks four times wider (n_embd 96: attention 96→288, MLP 96→384→96), so that k = 32
    # keeps a third or less of every block layer's sides, as on real models, and not the
    # whole of most of them as at n_embd 24.
    "lm-wide": lambda workdir: lm_setting(
        workdir / "gpt2-wide-data", name="gpt2-corpus-wide", seed=3, n_embd=96
    ),
}
"""Settings of `python -m benchmarks.accuracy.run --settings`, by key: workdir → Setting."""


def _classifier(key: str) -> Callable[[Path], Setting]:
    def make(workdir: Path) -> Setting:
        from benchmarks.accuracy.tabular import CLASSIFIERS, classifier_setting

        return classifier_setting(*CLASSIFIERS[key])

    return make


# Classifiers on scikit-learn's bundled datasets (benchmarks/accuracy/tabular.py): other data,
# widths, depths and training recipes than mlp-digits, so that the damping and projection
# defaults are checked on models they were not chosen on.
for _key in (
    "cancer", "cancer-short", "wine", "wine-short", "digits-deep", "digits-deep-short",
    "digits-cnn", "digits-cnn-short",
):  # fmt: skip
    SETTINGS[_key] = _classifier(_key)
