"""Attribution core: LoGra-projected gradients, curvature, a streaming gradient index and scores.

Knows nothing of SQL or the command line. Positive scores mean "this training example made the
output more likely".
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Public names and the modules that hold them; imported on first use, so that a command line
# or a config read does not pay for importing torch and transformers.
_EXPORTS = {
    "Batch": "attribution.types",
    "InputError": "attribution.types",
    "LossFn": "attribution.types",
    "IndexConfig": "attribution.config",
    "ProjectionConfig": "attribution.config",
    "ScoreConfig": "attribution.config",
    "LANGUAGE_MODEL_INDEX": "attribution.config",
    "default_index_config": "attribution.index",
    "batch_from_token_ids": "attribution.lm",
    "token_batches": "attribution.lm",
    "lm_loss": "attribution.lm",
    "lm_fisher_loss": "attribution.lm",
    "GradientIndex": "attribution.store",
    "IndexMismatchError": "attribution.types",
    "build_index": "attribution.index",
    "attribute_queries": "attribution.language",
    "index_language_model": "attribution.language",
    "ScoreResult": "attribution.scoring",
    "query_gradients": "attribution.scoring",
    "score": "attribution.scoring",
    "score_queries": "attribution.scoring",
    "top_examples": "attribution.scoring",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'attribution' has no attribute {name!r}")


if TYPE_CHECKING:
    from attribution.config import LANGUAGE_MODEL_INDEX, IndexConfig, ProjectionConfig, ScoreConfig
    from attribution.index import build_index, default_index_config
    from attribution.language import attribute_queries, index_language_model
    from attribution.lm import batch_from_token_ids, lm_fisher_loss, lm_loss, token_batches
    from attribution.scoring import ScoreResult, query_gradients, score, score_queries, top_examples
    from attribution.store import GradientIndex
    from attribution.types import Batch, IndexMismatchError, InputError, LossFn

__all__ = [
    "LANGUAGE_MODEL_INDEX",
    "Batch",
    "GradientIndex",
    "IndexConfig",
    "IndexMismatchError",
    "InputError",
    "LossFn",
    "ProjectionConfig",
    "ScoreConfig",
    "ScoreResult",
    "attribute_queries",
    "batch_from_token_ids",
    "build_index",
    "default_index_config",
    "index_language_model",
    "lm_fisher_loss",
    "lm_loss",
    "query_gradients",
    "score",
    "score_queries",
    "token_batches",
    "top_examples",
]
