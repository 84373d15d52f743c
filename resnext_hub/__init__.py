"""resnext-hub: NVIDIA's ResNeXt/SE-ResNeXt for torch.hub, and the tools around them.

The model and input code lives in the repo's top-level ``models/`` and ``processing/`` folders
(the layout hub users know) but has ONE import identity: ``resnext_hub.models`` and
``resnext_hub.processing``. torch.hub puts the repo root on ``sys.path`` while it imports
``hubconf``, and other hub repos have top-level ``models``/``processing`` packages too, so the
bare names are never ours to take: this package's search path also covers the repo root, and
those two folders refuse to be imported under their bare names.
"""

import os

__path__.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: F821
