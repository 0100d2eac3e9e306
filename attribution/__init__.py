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
    from attribution.config import IndexConfig, ProjectionConfig, ScoreConfig
    from attribution.index import build_index
    from attribution.language import attribute_queries, index_language_model
    from attribution.scoring import ScoreResult, query_gradients, score, score_queries, top_examples
    from attribution.store import GradientIndex
    from attribution.types import Batch, IndexMismatchError, InputError, LossFn

__all__ = [
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
    "build_index",
    "index_language_model",
    "query_gradients",
    "score",
    "score_queries",
    "top_examples",
]
