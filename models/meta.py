"""What a model carries besides its parameters: its architecture, weights record, preset and class names."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..processing.labels import ClassList, imagenet_classes
from ..processing.presets import ImageClassification, as_preset
from .pretrained_cfg import pretrained_cfg
from .weights import Weights


@dataclass(frozen=True)
class ModelMeta:
    """One record per model, kept by every copy of it (optimized, compiled).

    ``weights``: the manifest record its parameters came from (None: random, or a local file).
    ``preprocessing``: the preset its weights expect. ``classes``: the names of its outputs.
    ``record``: the manifest record the model was built for (its preset and classes come from it),
    loaded or not (``pretrained=False``); None for a fine-tuned checkpoint's model or a bare one.
    ``thresholds``: a multi-label head's per-class decision thresholds on its sigmoid probabilities
    (``finetune --multi-label`` chooses them on validation); None for a single-label (softmax) head.
    """

    architecture: str | None
    preprocessing: ImageClassification
    classes: ClassList
    weights: Weights | None = None
    record: Weights | None = None
    thresholds: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.thresholds is not None and len(self.thresholds) != len(self.classes):
            raise ValueError(f"{len(self.thresholds)} thresholds for {len(self.classes)} classes: one per class")

    @property
    def multi_label(self) -> bool:
        """Whether the head is multi-label: one sigmoid per class, each class present above its threshold."""
        return self.thresholds is not None

    @classmethod
    def default(cls, num_classes: int = 1000) -> ModelMeta:
        """For a bare model: NVIDIA's preset; ImageNet's names for 1000 classes, else ``"0"``, ``"1"``, ..."""
        return cls(None, as_preset(None), default_classes(num_classes))

    def with_classes(self, classes: ClassList) -> ModelMeta:
        """The same record for ``classes``; a multi-label head's thresholds are kept for the same names only
        (another head's would not fit it)."""
        same = classes.names == self.classes.names
        return replace(self, classes=classes, thresholds=self.thresholds if same else None)


def default_classes(num_classes: int) -> ClassList:
    """ImageNet-1k's names for a 1000-class head; the indices as names for any other."""
    return imagenet_classes() if num_classes == 1000 else ClassList.of(str(i) for i in range(num_classes))


class Described:
    """Read access to a module's :class:`ModelMeta` (``self.meta``), shared by every model class here.

    ``pretrained_cfg`` (and its older name ``default_cfg``) is timm's form of it, which timm's data
    pipeline reads. ``first_conv``: the name of the model's first convolution in its weights' layout.
    """

    meta: ModelMeta
    first_conv: str = "conv1"

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

    @property
    def multi_label(self) -> bool:
        """Whether the model is multi-label (sigmoid per class, see ``thresholds``); False: softmax over classes."""
        return self.meta.multi_label

    @property
    def thresholds(self) -> tuple[float, ...] | None:
        """A multi-label model's per-class thresholds on its sigmoid probabilities; None for a single-label one."""
        return self.meta.thresholds

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg``, generated from the weights record and preset (a new dict on each access).

        ``timm.data.resolve_model_data_config(model)`` then gives the transform these weights expect;
        see :func:`~.pretrained_cfg.pretrained_cfg` for the keys.
        """
        meta = self.meta
        count = meta.record.num_classes if meta.record is not None else len(meta.classes)
        return pretrained_cfg(
            meta.preprocessing,
            architecture=meta.architecture,
            num_classes=count,
            first_conv=self.first_conv,
            record=meta.record,
        )

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of :attr:`pretrained_cfg`."""
        return self.pretrained_cfg
