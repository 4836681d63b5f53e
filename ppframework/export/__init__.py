"""Export and reuse: a static method's decision as a smaller model anyone can load, and a dynamic
method's calibrated state saved once (docs/export.md).

- :mod:`.layout`: per-layer widths and key/value slots; :mod:`.families`: each family's modules;
- :mod:`.slicing`: the decision as weights; :mod:`.build`: a model from a config, widths and weights;
- :mod:`.folder`: staged writes, the manifest and its checks; :mod:`.errors`: :class:`ExportError`;
- :mod:`.model_export`: :func:`export_pruned` / :func:`load_pruned`;
- :mod:`.pipeline_state`: what ``Pipeline.save`` writes; :mod:`.restore`: :func:`load_pipeline`.
"""

from ppframework.export.errors import ExportError
from ppframework.export.model_export import ExportResult, export_pruned, load_pruned
from ppframework.export.pipeline_state import save_pipeline_state
from ppframework.export.restore import load_pipeline

__all__ = [
    "ExportError",
    "ExportResult",
    "export_pruned",
    "load_pipeline",
    "load_pruned",
    "save_pipeline_state",
]
