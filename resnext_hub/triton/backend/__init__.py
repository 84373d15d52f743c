"""Files shipped into an exported Triton repository's preprocessing model (not used by the package itself).

- ``model.py``: the Python-backend model, copied verbatim to ``<name>_preprocess/1/model.py``;
- ``transform.py``: the weights' preset in numpy + PIL (no torch), copied with the image loader into
  ``<name>_preprocess/1/resnext_hub_image/`` (see :mod:`resnext_hub.export.triton_repository`).
"""
