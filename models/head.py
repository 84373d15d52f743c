"""What a model's head (``fc``) gives: a class count and names, or pooled features; read from the head itself.

Code written for NVIDIA's hub entries often replaces the head by hand: ``model.fc = nn.Identity()``
(a backbone), ``nn.Linear(2048, n)`` or ``nn.Sequential(nn.Linear(2048, n), nn.Sigmoid())``.
``classes`` and ``num_classes`` follow the head the model has at the time of asking: the names in
its ``meta`` where their count matches, else the indices as names.
"""

from __future__ import annotations

from torch import nn

from ..processing.labels import ClassList
from .meta import Described, default_classes

# Layers that keep a head's output size: a Linear followed only by these gives the Linear's classes.
SIZE_KEEPING = (
    nn.Identity,
    nn.Dropout,
    nn.AlphaDropout,
    nn.Sigmoid,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Tanh,
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Hardsigmoid,
)


class HeadError(ValueError):
    """The head cannot give what was asked: class names of a features head, or the class count of an unknown one.

    Not an ``AttributeError``: raised from a property of an ``nn.Module``, that one would be
    replaced by torch's misleading "object has no attribute 'classes'".
    """


def head_size(head: nn.Module) -> int | None:
    """The head's output classes: ``out_features`` of its last Linear; 0 for pooled features; None: unknown.

    Understood: ``nn.Linear``, the layers of :data:`SIZE_KEEPING` (alone: features), an ``nn.Sequential``
    of these, and any module with an integer ``out_features`` attribute (how a custom head says its count).
    """
    if isinstance(head, nn.Linear):
        return head.out_features
    if isinstance(head, SIZE_KEEPING):
        return 0
    if isinstance(head, nn.Sequential):
        size = 0
        for layer in head:
            inner = head_size(layer)
            if inner is None:
                return None
            size = inner or size
        return size
    declared = getattr(head, "out_features", None)
    return declared if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0 else None


class Headed(Described):
    """``num_classes`` and ``classes`` of a model with a head ``fc`` on ``num_features`` pooled features."""

    fc: nn.Module
    num_features: int

    @property
    def num_classes(self) -> int:
        """The head's class count; 0 when it outputs the pooled features (``model.fc = nn.Identity()``)."""
        size = head_size(self.fc)
        if size is None:
            raise HeadError(
                f"model.fc is {type(self.fc).__name__}: its class count cannot be read from it. Expected an "
                f"nn.Linear({self.num_features}, n), nn.Identity() (pooled features), or an nn.Sequential ending "
                "in a Linear followed only by activations or dropout; a custom head can give its class count "
                "as an integer attribute out_features"
            )
        return size

    @property
    def classes(self) -> ClassList:
        """The head's class names: the model's own where their count matches the head's, else ``"0"``, ``"1"``, ..."""
        size = self.num_classes
        if size == 0:
            raise HeadError(
                f"model.fc is {type(self.fc).__name__}: the model outputs pooled features ({self.num_features} "
                f"values), not classes, so it has no class names; to classify, give it a classifier head: "
                f"model.reset_classifier(n) or model.fc = nn.Linear({self.num_features}, n)"
            )
        names = self.meta.classes
        return names if len(names) == size else default_classes(size)

    @property
    def thresholds(self) -> tuple[float, ...] | None:
        """A multi-label head's per-class thresholds; None for a single-label head, or a head replaced since."""
        thresholds = self.meta.thresholds
        return thresholds if thresholds is not None and head_size(self.fc) == len(thresholds) else None

    @property
    def multi_label(self) -> bool:
        """Whether the head is multi-label (a sigmoid per class, see ``thresholds``)."""
        return self.thresholds is not None

    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        """timm's: the head module (``fc``), or its name."""
        return "fc" if name_only else self.fc
