"""Procedural data for tests, the demo and benchmarks: a multi-provider corpus, a word-level
tokenizer, a tiny GPT-2 trained in-process, shards and queries. Nothing is downloaded.

Each provider writes about its own topic (its own nouns, verbs and adjectives) in its own style
(its own sentence templates), sharing only function words with the others. With `overlap`, pairs
of providers borrow each other's vocabulary and style, so the corpus holds providers that overlap
as well as ones that are distinct.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import torch

from attribution.data import ShardSpec, sha256_file
from attribution.lm import batch_from_token_ids, chunk_token_ids, lm_loss
from attribution.types import Batch


@dataclass(frozen=True)
class TopicSpec:
    """One provider's vocabulary and style."""

    nouns: tuple[str, ...]
    verbs: tuple[str, ...]
    adjectives: tuple[str, ...]
    templates: tuple[str, ...]
    """Sentence templates with `{N}` (noun), `{V}` (verb) and `{A}` (adjective) slots."""


# Sentence shapes; each provider takes a disjoint pair when there are enough, so styles differ.
TEMPLATES: tuple[str, ...] = (
    "the {A} {N} {V} the {N} .",
    "a {N} of {N} is {A} .",
    "{N} and {N} {V} with {A} {N} .",
    "in the {N} , the {N} was {A} .",
    "we {V} {A} {N} before the {N} {V} .",
    "every {N} {V} a {A} {N} and the {N} .",
    "why does the {N} {V} ? because it is {A} .",
    "{A} {N} , {A} {N} : they {V} .",
    "to {V} a {N} , first {V} the {A} {N} .",
    "our {N} will {V} when {N} is {A} .",
    "it is said that {N} {V} {N} .",
    "note : {A} {N} must {V} {N} .",
)

TOPICS: dict[str, TopicSpec] = {
    "astronomy": TopicSpec(
        (
            "star",
            "planet",
            "comet",
            "galaxy",
            "orbit",
            "nebula",
            "telescope",
            "moon",
            "meteor",
            "eclipse",
            "quasar",
            "asteroid",
        ),
        ("orbits", "shines", "collapses", "rotates", "observes", "eclipses", "drifts", "glows"),
        ("distant", "bright", "stellar", "cosmic", "faint", "lunar", "celestial", "red"),
        (),
    ),
    "cooking": TopicSpec(
        (
            "onion",
            "butter",
            "sauce",
            "oven",
            "garlic",
            "flour",
            "pan",
            "recipe",
            "broth",
            "pepper",
            "dough",
            "skillet",
        ),
        ("simmers", "bakes", "stirs", "roasts", "chops", "seasons", "whisks", "melts"),
        ("crispy", "savory", "golden", "tender", "spicy", "fresh", "salty", "creamy"),
        (),
    ),
    "law": TopicSpec(
        (
            "court",
            "contract",
            "plaintiff",
            "statute",
            "judge",
            "clause",
            "appeal",
            "verdict",
            "tenant",
            "witness",
            "defendant",
            "license",
        ),
        ("rules", "appeals", "binds", "waives", "testifies", "overturns", "litigates", "enforces"),
        ("binding", "void", "lawful", "liable", "federal", "civil", "statutory", "material"),
        (),
    ),
    "medicine": TopicSpec(
        (
            "patient",
            "dose",
            "fever",
            "clinic",
            "vaccine",
            "symptom",
            "surgeon",
            "tablet",
            "infection",
            "nurse",
            "diagnosis",
            "artery",
        ),
        (
            "treats",
            "heals",
            "prescribes",
            "diagnoses",
            "infects",
            "recovers",
            "injects",
            "relieves",
        ),
        ("acute", "chronic", "clinical", "sterile", "viral", "mild", "cardiac", "oral"),
        (),
    ),
    "sailing": TopicSpec(
        (
            "boat",
            "sail",
            "harbor",
            "mast",
            "anchor",
            "tide",
            "keel",
            "rudder",
            "wind",
            "deck",
            "captain",
            "buoy",
        ),
        ("sails", "tacks", "moors", "jibes", "hoists", "steers", "capsizes", "anchors"),
        ("windward", "briny", "nautical", "calm", "stormy", "leeward", "tidal", "coastal"),
        (),
    ),
    "gardening": TopicSpec(
        (
            "rose",
            "soil",
            "seed",
            "tulip",
            "compost",
            "hedge",
            "shovel",
            "orchard",
            "weed",
            "sapling",
            "mulch",
            "greenhouse",
        ),
        ("blooms", "sprouts", "prunes", "waters", "grows", "plants", "wilts", "digs"),
        ("leafy", "fertile", "green", "perennial", "shady", "muddy", "ripe", "thorny"),
        (),
    ),
}

_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ru",
    "te",
    "zan",
    "po",
    "vi",
    "sha",
    "dre",
    "qu",
    "nol",
    "fi",
    "gar",
    "tha",
    "bek",
    "wy",
    "ost",
    "hel",
    "jun",
)


def pseudo_words(
    rng: random.Random, n: int, ending: str, index: int, max_syllables: int = 3
) -> tuple[str, ...]:
    """`n` distinct pseudo-words of 2 to `max_syllables` syllables, each ending in
    `ending` and `index` (so that words of different indexes never coincide)."""
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, max_syllables)))
        word = f"{word}{ending}{index}"
        if word not in out:
            out.append(word)
    return tuple(out)


def _pseudo_topic(index: int, seed: int) -> TopicSpec:
    """A topic of seeded pseudo-words; the `index` suffix keeps them disjoint across topics."""
    rng = random.Random(f"topic:{seed}:{index}")
    return TopicSpec(
        pseudo_words(rng, 12, "o", index),
        pseudo_words(rng, 8, "es", index),
        pseudo_words(rng, 8, "ic", index),
        (),
    )


def resolve_topics(
    providers: int | list[str] | dict[str, TopicSpec], seed: int = 0
) -> dict[str, TopicSpec]:
    """Provider name -> topic with templates filled in.

    An int n gives the first n built-in topics (then pseudo-word topics `topic<i>`); a list of
    names picks built-in topics (unknown names get pseudo-word topics). Providers without
    templates get a distinct pair of `TEMPLATES` by position.
    """
    if isinstance(providers, int):
        if providers < 1:
            raise ValueError("need at least one provider")
        names = list(TOPICS)[:providers] + [f"topic{i}" for i in range(len(TOPICS), providers)]
        providers = list(names)
    if isinstance(providers, list):
        providers = {
            name: TOPICS.get(name) or _pseudo_topic(i, seed) for i, name in enumerate(providers)
        }
    resolved: dict[str, TopicSpec] = {}
    for i, (name, spec) in enumerate(providers.items()):
        if not spec.templates:
            pair = (2 * i % len(TEMPLATES), (2 * i + 1) % len(TEMPLATES))
            spec = TopicSpec(
                spec.nouns, spec.verbs, spec.adjectives, tuple(TEMPLATES[j] for j in pair)
            )
        resolved[name] = spec
    return resolved


def _sentence(spec: TopicSpec, rng: random.Random) -> str:
    template = rng.choice(spec.templates)
    words = []
    for token in template.split():
        if token == "{N}":
            token = rng.choice(spec.nouns)
        elif token == "{V}":
            token = rng.choice(spec.verbs)
        elif token == "{A}":
            token = rng.choice(spec.adjectives)
        words.append(token)
    return " ".join(words)


def make_corpus(
    providers: int | list[str] | dict[str, TopicSpec],
    docs_per_provider: int,
    seed: int = 0,
    overlap: float = 0.0,
    overlap_pairs: list[tuple[str, str]] | None = None,
    sentences_per_doc: tuple[int, int] = (2, 4),
) -> dict[str, list[str]]:
    """Provider name -> documents, deterministic for a seed.

    Each document is `sentences_per_doc` (inclusive range) sentences in its provider's style.
    With `overlap` > 0, each provider in an overlapping pair writes that fraction of its
    sentences with its partner's vocabulary and templates. `overlap_pairs` defaults to the first
    two providers (when there are at least two), leaving the others distinct.
    """
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    topics = resolve_topics(providers, seed)
    names = list(topics)
    if overlap_pairs is None:
        overlap_pairs = [(names[0], names[1])] if overlap > 0 and len(names) >= 2 else []
    partner: dict[str, str] = {}
    for a, b in overlap_pairs:
        if a not in topics or b not in topics:
            raise ValueError(f"unknown provider in overlap pair ({a!r}, {b!r})")
        partner[a], partner[b] = b, a
    corpus: dict[str, list[str]] = {}
    for name in names:
        rng = random.Random(f"corpus:{seed}:{name}")
        docs = []
        for _ in range(docs_per_provider):
            sentences = []
            for _ in range(rng.randint(*sentences_per_doc)):
                source = name
                if name in partner and rng.random() < overlap:
                    source = partner[name]
                sentences.append(_sentence(topics[source], rng))
            docs.append(" ".join(sentences))
        corpus[name] = docs
    return corpus


def build_word_tokenizer(texts: Iterable[str]):
    """A word-level `PreTrainedTokenizerFast` over the words of `texts` (whitespace and
    punctuation split). Ids: `<unk>`=0, `<pad>`=1, `<eos>`=2, then words in sorted order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = {w for text in texts for w, _ in pre.pre_tokenize_str(text)}
    specials = ["<unk>", "<pad>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(words - set(specials)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )


def tiny_gpt2_config(
    vocab_size: int, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, n_positions: int = 64
):
    """A small GPT-2 configuration with dropout off and eager attention."""
    from transformers import GPT2Config

    config = GPT2Config(
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    config._attn_implementation = "eager"
    return config


def train_tiny_lm(
    texts: list[str],
    tokenizer,
    config,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
):
    """Train a `GPT2LMHeadModel` from scratch on `texts` (CPU, deterministic for a seed).

    Texts are chunked to `config.n_positions` tokens and sampled with replacement; the objective
    is the mean token NLL. Returns the model in eval mode.
    """
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.train()
    examples = [
        chunk
        for text in texts
        for chunk in chunk_token_ids(
            list(tokenizer(text, add_special_tokens=False)["input_ids"]), config.n_positions
        )
    ]
    if not examples:
        raise ValueError("no training examples of at least 2 tokens")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for _ in range(steps):
        picks = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        batch: Batch = batch_from_token_ids([examples[i] for i in picks], pad_id)
        loss = lm_loss(model, batch).sum() / sum(len(examples[i]) - 1 for i in picks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def write_workspace_model(model, tokenizer, out_dir: str | os.PathLike[str]) -> str:
    """Save model (safetensors) and tokenizer so `load_causal_lm(out_dir)` round-trips."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_shards(
    corpus: dict[str, list[str]],
    out_dir: str | os.PathLike[str],
    fmt: str = "jsonl",
    shards_per_provider: int = 1,
) -> list[ShardSpec]:
    """Write each provider's documents as `{provider}-{i:03d}.{fmt}` files of `{"text": ...}` rows.

    Documents are split into `shards_per_provider` contiguous parts. Returns the specs, hashed.
    """
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"fmt must be 'jsonl' or 'parquet', got {fmt!r}")
    if shards_per_provider < 1:
        raise ValueError("shards_per_provider must be positive")
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    specs = []
    for provider, docs in corpus.items():
        size = -(-len(docs) // shards_per_provider)
        for i in range(shards_per_provider):
            part = docs[i * size : (i + 1) * size]
            path = os.path.join(out_dir, f"{provider}-{i:03d}.{fmt}")
            if fmt == "jsonl":
                write_jsonl([{"text": text} for text in part], path)
            else:
                import polars as pl

                pl.DataFrame({"text": part}, schema={"text": pl.String}).write_parquet(path)
            specs.append(ShardSpec(path, provider, sha256=sha256_file(path)))
    return specs


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike[str]) -> None:
    """Write one JSON object per line (UTF-8, keys in the given order)."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


@torch.no_grad()
def _sample_tokens(model, prompt_ids: list[int], n: int, banned: list[int], generator) -> list[int]:
    ids = list(prompt_ids)
    config = model.config
    limit = getattr(config, "n_positions", None) or config.max_position_embeddings
    out: list[int] = []
    for _ in range(n):
        context = torch.tensor([ids[-limit:]], dtype=torch.long)
        logits = model(input_ids=context).logits[0, -1].double()
        logits[banned] = float("-inf")
        token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
        ids.append(token)
        out.append(token)
    return out


def sample_queries(
    model,
    tokenizer,
    corpus: dict[str, list[str]],
    n_per_provider: int,
    seed: int,
    start: datetime,
    end: datetime,
    prompt_words: tuple[int, int] = (3, 6),
    completion_tokens: tuple[int, int] = (3, 8),
) -> list[dict]:
    """queries.jsonl rows: prompts in each provider's style, completions sampled from `model`.

    A prompt is the first few words (`prompt_words`, inclusive) of a random document of the
    provider; the completion is `completion_tokens` tokens sampled (seeded) from the model,
    special tokens excluded. Rows are sorted by timestamp (uniform in [start, end), whole
    seconds, ISO 8601 with `Z`) and get ids `q000001`, ...; `provider_hint` names the provider
    whose texts the prompt was drawn from (with an overlapping corpus that text may be in the
    partner's style; pass `make_corpus(..., overlap=0.0)` for prompts of one style each).
    """
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    span = int((end - start).total_seconds())
    if span < 1:
        raise ValueError("end must be at least one second after start")
    rng = random.Random(f"queries:{seed}")
    generator = torch.Generator().manual_seed(seed)
    banned = sorted(set(tokenizer.all_special_ids))
    drafts = []
    for provider, docs in corpus.items():
        for _ in range(n_per_provider):
            words = rng.choice(docs).split()
            prompt = " ".join(words[: rng.randint(*prompt_words)])
            prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            bos = getattr(tokenizer, "bos_token_id", None)
            prompt_ids = ([bos] if bos is not None else []) + prompt_ids
            n = rng.randint(*completion_tokens)
            completion = tokenizer.decode(_sample_tokens(model, prompt_ids, n, banned, generator))
            if not completion[:1].isspace():
                completion = " " + completion
            stamp = start + timedelta(seconds=rng.randrange(span))
            drafts.append((stamp, provider, prompt, completion))
    drafts.sort(key=lambda d: d[0])
    return [
        {
            "id": f"q{i + 1:06d}",
            "timestamp": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "prompt": prompt,
            "completion": completion,
            "provider_hint": provider,
        }
        for i, (stamp, provider, prompt, completion) in enumerate(drafts)
    ]
