"""A first convolution's weights adapted to another number of input channels (timm's rule)."""

from __future__ import annotations

import math

from torch import Tensor


def adapt_input_conv(in_chans: int, weight: Tensor) -> Tensor:
    """A first conv's weight ``(O, I, kH, kW)`` for ``in_chans`` input channels, as timm's ``adapt_input_conv``:

    1 channel sums the filters of the input channels (for I > 3, of each group of 3); another count repeats
    the 3 RGB filters and scales them by ``3 / in_chans``. Rules of timm 1.0 (``timm.models._manipulate``).
    """
    dtype = weight.dtype
    weight = weight.float()  # half weights: sum on the CPU in float
    out_chans, channels, height, width = weight.shape
    if in_chans == 1:
        if channels > 3:
            if channels % 3:
                raise ValueError(f"cannot adapt a first conv of {channels} input channels (not RGB groups) to 1")
            weight = weight.reshape(out_chans, channels // 3, 3, height, width).sum(dim=2)
        else:
            weight = weight.sum(dim=1, keepdim=True)
    elif in_chans != 3:
        if channels != 3:
            raise ValueError(f"cannot adapt a first conv of {channels} input channels to {in_chans}: it needs RGB (3)")
        repeat = math.ceil(in_chans / 3)
        weight = weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (3 / float(in_chans))
    return weight.to(dtype)
