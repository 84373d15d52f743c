"""Fine-tuning on your own classes: :func:`finetune` and its pieces.

- :mod:`.loop`: the recipe and the run's setup, the checks before training (:func:`finetune`);
- :mod:`.trainer`: one run's training on this rank: epochs, validation, saving and resuming (``Trainer``);
- :mod:`.data`: the ``DATA/train/<class>/``, ``DATA/val/<class>/`` folder, transforms, per-epoch batches;
- :mod:`.state`: the run's settings and what it leaves in its output folder (checkpoints, metrics, curves).
"""

from .loop import finetune
from .state import FIELDS, MIN_IMAGE_SIZE, PRECISIONS, FinetuneSettings

__all__ = ["FIELDS", "MIN_IMAGE_SIZE", "PRECISIONS", "FinetuneSettings", "finetune"]
