"""Zero-shot multiple-choice evaluation of the paper's seven tasks (docs/evaluation.md).

:mod:`ppframework.zeroshot.tasks` loads BoolQ, PIQA, HellaSwag, WinoGrande, ARC-easy, ARC-challenge and
OpenBookQA as :class:`MultipleChoiceItem` objects in lm-eval-harness prompt form;
:mod:`ppframework.zeroshot.scoring` scores them by summed continuation log-probability and reports
``acc`` and ``acc_norm``. The package offers both modules' public names (their ``__all__``).
"""

from __future__ import annotations

from ppframework.zeroshot import scoring, tasks
from ppframework.zeroshot.scoring import *  # noqa: F403
from ppframework.zeroshot.tasks import *  # noqa: F403

__all__ = sorted({*scoring.__all__, *tasks.__all__})
