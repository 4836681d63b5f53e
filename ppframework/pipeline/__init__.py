"""The Pipeline package: online dynamic structured pruning of one model with one method.

:class:`Pipeline` (:mod:`.attach`) is built from one part per concept; see that module's docstring
for the map. The names other modules import from ``ppframework.pipeline`` are re-exported here.
"""

from ppframework.pipeline.attach import Pipeline, _pipeline_forward
from ppframework.pipeline.batch import LayerCall, _Batch
from ppframework.pipeline.record import BlockEvent, PruningRecord
from ppframework.pipeline.stages import StageHooks
from ppframework.pipeline.state import inflated_ratio

__all__ = [
    "BlockEvent",
    "LayerCall",
    "Pipeline",
    "PruningRecord",
    "StageHooks",
    "_Batch",
    "_pipeline_forward",
    "inflated_ratio",
]
