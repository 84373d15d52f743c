"""Class activation maps: where in the image the evidence for a class lies, computed without gradients.

For a head that average-pools the last stage's maps ``A`` (``(C, H, W)``) and applies a Linear layer,
the class score is ``y_c = sum_k w_ck * mean_ij A_kij + b_c``. Grad-CAM (Selvaraju et al. 2017,
"Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization", section 3.1) weighs
each map by its mean gradient ``dy_c / dA_kij = w_ck / (H W)`` and keeps the positive part:
``relu(sum_k w_ck A_k) / (H W)``. That is the class activation map of Zhou et al. 2016 ("Learning Deep
Features for Discriminative Localization"), ``sum_k w_ck A_k``, with its negative part cut, up to a
positive factor that the per-image normalisation removes. So it is computed from one forward pass,
on any copy of the network that gives out its last stage's maps (the fast fp32/bf16/fp16 copies too).

The maps have the feature grid's size (the input's size / 32: 7x7 for a 224 crop); they are normalised
per image to [0, 1] by their maximum (0 where there is no positive evidence, a map with no positive value
is all zeros). Drawing one over a photo is :mod:`resnext_hub.processing.overlay`'s job.

:class:`Explainable` gives :class:`~.resnet.ResNet` and :class:`~.fused.OptimizedResNet` their
``explain`` and ``explanation`` methods; this module never imports either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .head import HeadError

# Elementwise, strictly increasing layers after the Linear: they rescale each class score's gradient by a positive
# factor per image (sigmoid's s(1 - s), ...), which the normalisation removes; Dropout is the identity in eval.
MONOTONE_AFTER = (nn.Identity, nn.Dropout, nn.Sigmoid, nn.Tanh)
Target = int | Sequence[int] | Tensor | None  # numpy integers and arrays too


class Explanation(NamedTuple):
    """One forward pass, explained: ``maps`` ``(N, H, W)`` in [0, 1] (fp32, fp64 for a float64 model; on the
    input's device), the class
    each map explains ``classes`` ``(N,)``, and the model's output ``logits`` ``(N, num_classes)`` (fp32)."""

    maps: Tensor
    classes: Tensor
    logits: Tensor


def head_linear(fc: nn.Module, pool_type: str) -> nn.Linear:
    """The Linear layer whose rows weigh the maps, or a :class:`~.head.HeadError` saying why this head has none.

    Understood: ``nn.Linear``, or an ``nn.Sequential`` of one Linear preceded by ``Dropout``/``Identity`` and
    followed by strictly increasing elementwise layers (``Sigmoid``, ``Tanh``: a multi-label head), on
    average-pooled features.
    """
    if pool_type != "avg":
        raise HeadError(
            f"explanation maps need an average-pooled head (global_pool='avg'), this model pools with "
            f"{pool_type!r}: only with average pooling is the class activation map the Grad-CAM map"
        )
    layers = list(fc) if isinstance(fc, nn.Sequential) else [fc]
    linears = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)]
    if len(linears) == 1:
        before, after = layers[: linears[0]], layers[linears[0] + 1 :]
        if all(isinstance(layer, (nn.Identity, nn.Dropout)) for layer in before) and all(
            isinstance(layer, MONOTONE_AFTER) for layer in after
        ):
            return layers[linears[0]]
    raise HeadError(
        f"explanation maps need a linear head on the pooled features: model.fc is {type(fc).__name__} "
        f"({fc!r:.200}). Expected nn.Linear(num_features, n), optionally followed by Sigmoid or Tanh; for "
        "another head, compute Grad-CAM with autograd on model.forward_features' output"
    )


def explained_classes(
    target: Target, count: int, num_classes: int, device: torch.device | None = None
) -> Tensor | None:
    """``target`` as ``count`` class indices (one index for all, or one per image), checked against the head's
    ``num_classes``; None stays None (each image's top-1, known after the forward pass)."""
    if target is None:
        return None
    try:  # an int, a list of ints, a numpy array, a tensor
        classes = torch.as_tensor(target, device=device)
    except (TypeError, ValueError, RuntimeError):
        classes = None
    if classes is None or classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        got = type(target).__name__ if classes is None else f"{type(target).__name__} of {classes.dtype}"
        raise TypeError(f"target must be an integer class index, one per image, or None (top-1); got {got}")
    classes = classes.long().flatten().expand(count) if classes.dim() == 0 else classes.long()
    if classes.shape != (count,):
        raise ValueError(f"target: expected one class index, or {count} (one per image), got {tuple(classes.shape)}")
    bad = classes[(classes < 0) | (classes >= num_classes)]
    if bad.numel():
        raise ValueError(f"target: class index {bad[0].item()} is out of range: the head has {num_classes} classes")
    return classes


def class_activation_maps(features: Tensor, linear: nn.Linear, classes: Tensor) -> Tensor:
    """``relu(sum_k w[c, k] A_k)`` of each image's class ``c``, normalised by its maximum: ``(N, H, W)``.

    ``features``: the last stage's maps ``(N, C, H, W)`` in any dtype and memory format; summed in fp32
    (fp64 for a float64 model), the maps' dtype.
    """
    dtype = torch.promote_types(features.dtype, torch.float32)
    weights = linear.weight.detach()[classes].to(dtype)  # (N, C)
    maps = torch.einsum("nchw,nc->nhw", features.to(dtype), weights).relu_()
    peak = maps.amax((1, 2), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), maps)


class Explainable:
    """``explain`` and ``explanation`` of a model with ``forward_features``, ``forward_head``, ``fc`` and
    ``global_pool`` (composed by :class:`~.resnet.ResNet` and :class:`~.fused.OptimizedResNet`)."""

    fc: nn.Module
    global_pool: nn.Module

    def explain(self, x: Tensor, target: Target = None) -> Tensor:
        """Class activation maps ``(N, H/32, W/32)``, each normalised to [0, 1], of the top-1 class of each image of
        ``x`` (a preprocessed batch ``(N, 3, H, W)``) or of ``target`` (a class index, or one per image).

        Equal to Grad-CAM for this head, computed without gradients (see :mod:`resnext_hub.models.explain`).
        A head that is not linear on average-pooled features is a :class:`~.head.HeadError`.
        """
        return self.explanation(x, target).maps

    def explanation(self, x: Tensor, target: Target = None) -> Explanation:
        """:meth:`explain`'s maps, with the classes they explain and the logits, from one forward pass."""
        linear = head_linear(self.fc, self.global_pool.pool_type)
        classes = explained_classes(target, x.shape[0], linear.out_features, x.device)  # before any work
        with torch.no_grad():
            features = self.forward_features(x)
            logits = self.forward_head(features).float()
            classes = logits.argmax(1) if classes is None else classes
            return Explanation(class_activation_maps(features, linear, classes), classes, logits)
