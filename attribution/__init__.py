"""Attribution core: LoGra-projected gradients, curvature, a streaming gradient index and scores.

Knows nothing of SQL or the command line. Positive scores mean "this training example made the
output more likely".
"""

from attribution.config import IndexConfig, ProjectionConfig, ScoreConfig
from attribution.index import IndexMismatchError, build_index
from attribution.language import attribute_queries, index_language_model
from attribution.scoring import ScoreResult, query_gradients, score, score_queries, top_examples
from attribution.store import GradientIndex
from attribution.types import Batch, InputError, LossFn

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
