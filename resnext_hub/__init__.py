"""Private import root of this repository.

torch.hub imports ``hubconf`` with the repo on ``sys.path``; other hub repos also have
top-level ``models``/``processing`` packages, and whichever is imported first would own
those names in ``sys.modules``. So ``hubconf`` imports ours as ``resnext_hub.models`` and
``resnext_hub.processing``: this package's search path also covers the repo root.
The command line lives here too (``python -m resnext_hub --help``).
"""

import os

__path__.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: F821
