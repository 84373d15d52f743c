"""Files shipped into an exported Triton repository's Python-backend models (not used by the package itself).

- ``preprocess.py``: copied verbatim to ``<name>_preprocess/1/model.py`` (image bytes -> tensor, error);
- ``postprocess.py``: copied verbatim to ``<name>_postprocess/1/model.py`` and
  ``<name>_image_postprocess/1/model.py`` (top-k numbers -> the contract's answer);
- ``transform.py``: the weights' preset in numpy + PIL (no torch), copied with the image loader and
  the contract into ``<name>_preprocess/1/resnext_hub_image/`` (see :mod:`resnext_hub.triton.repository`).
"""
