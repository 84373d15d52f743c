"""What a model carries besides its parameters: its architecture, weights record, preset and class names."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..processing.labels import ClassList, imagenet_classes
from ..processing.presets import ImageClassification, as_preset
from .weights import Weights


@dataclass(frozen=True)
class ModelMeta:
    """One record per model, kept by every copy of it (optimized, compiled).

    ``weights``: the manifest record its parameters came from (None: random, or a local file).
    ``preprocessing``: the preset its weights expect. ``classes``: the names of its outputs.
    """

    architecture: str | None
    preprocessing: ImageClassification
    classes: ClassList
    weights: Weights | None = None

    @classmethod
    def default(cls, num_classes: int = 1000) -> ModelMeta:
        """For a bare model: NVIDIA's preset; ImageNet's names for 1000 classes, else ``"0"``, ``"1"``, ..."""
        return cls(None, as_preset(None), default_classes(num_classes))

    def with_classes(self, classes: ClassList) -> ModelMeta:
        return replace(self, classes=classes)


def default_classes(num_classes: int) -> ClassList:
    """ImageNet-1k's names for a 1000-class head; the indices as names for any other."""
    return imagenet_classes() if num_classes == 1000 else ClassList.of(str(i) for i in range(num_classes))


class Described:
    """Read access to a module's :class:`ModelMeta` (``self.meta``), shared by every model class here."""

    meta: ModelMeta

    @property
    def architecture(self) -> str | None:
        return self.meta.architecture

    @property
    def weights_record(self) -> Weights | None:
        return self.meta.weights

    @property
    def preprocessing(self) -> ImageClassification:
        return self.meta.preprocessing

    @property
    def classes(self) -> ClassList:
        return self.meta.classes

    @property
    def num_classes(self) -> int:
        return len(self.meta.classes)
