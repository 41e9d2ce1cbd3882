"""The model runtime under both services and training.

The chat vocabulary (:mod:`.chat`), the item model (:mod:`.items`), rendering and truncation
(:mod:`.rendering`), the token-budget batcher (:mod:`.batcher`), the backends (torch, ONNX Runtime,
a deterministic fake: :mod:`.backends`), device and weights helpers (:mod:`.device`), the embedded
default model (:mod:`.default_model`) and the ONNX export (:mod:`.onnx_export`). It knows no
transport and no service: the reward service, the judge's local backend and ``train rm`` all run
models through it, which is what makes their scores agree exactly.
"""
