"""A ResNet copy run by another runtime (OpenVINO, or torchao's compiled graph) behind the float copies' interface.

The int8 copies (:mod:`.quantize`) and OpenVINO's float copies (:mod:`.openvino_runtime`) are this one
module type: a float ``(N, 3, H, W)`` CPU tensor in, fp32 logits out, the model's ``meta`` kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .meta import Described


class BackendResNet(Described, nn.Module):
    """A copy of a ResNet run by ``backend``: a float ``(N, 3, H, W)`` CPU tensor in, fp32 logits out.

    ``image_size``: the one ``(H, W)`` it accepts, or None (any size >= 32). ``precision``: what it
    computes in ("int8"; "bf16" or "fp32" for OpenVINO's float copies, :func:`~.openvino_runtime.openvino_float`).
    """

    def __init__(
        self,
        meta: Any,
        backend: str,
        run: Callable[[Tensor], Tensor],
        image_size: tuple[int, int] | None,
        *,
        first_conv: str = "conv1",
        precision: str = "int8",
    ) -> None:
        super().__init__()
        self.precision = precision
        self.meta = meta
        self.first_conv = first_conv
        self.backend = backend
        self.image_size = image_size
        self._run = run
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            raise ValueError(
                f"the {self.precision} model ({self.backend}) runs on the CPU; got a tensor on {x.device} "
                "(move it with .cpu())"
            )
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a batch (N, 3, H, W), got shape {tuple(x.shape)}")
        if self.image_size is not None and tuple(x.shape[2:]) != self.image_size:
            raise ValueError(
                f"this {self.precision} model ({self.backend}) was built for "
                f"{self.image_size[0]}x{self.image_size[1]} images "
                f"(the calibration size), got {x.shape[2]}x{x.shape[3]}; calibrate at the size you run"
            )
        return self._run(x.detach().float())

    @property
    def backend_model(self) -> Any:
        """The backend's own model: OpenVINO's ``ov.Model``, or torchao's compiled callable (diagnostics)."""
        return getattr(self._run, "model", self._run)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, image_size={self.image_size}"
