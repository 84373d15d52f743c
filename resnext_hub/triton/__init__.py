"""resnext-hub and Triton Inference Server: one contract, served by ``serve`` and by the exported repository.

- :mod:`.contract`: the two public models (names, inputs, outputs, dtypes, dims) and the per-sample
  error rule, declared once; everything below is generated from it;
- :mod:`.server`: ``serve``, the contract on a real Triton server in this process (PyTriton);
- :mod:`.repository`: ``export --format triton``, the contract as a model repository for any Triton
  deployment (:mod:`.classifier`: its ONNX classifier; :mod:`.backend`: the files its Python-backend
  models run);
- :mod:`.config`: ``config.pbtxt`` generated from the contract and checked with Triton's schema;
- :mod:`.bundle`: PyTriton's bundled ``tritonserver`` and the interpreter check;
  :mod:`.local`: that server run on any repository.

The submodules are imported by name (``from resnext_hub.triton.repository import export_triton``):
this package imports nothing, so the contract loads without torch or tritonclient.
"""
