"""PyTorch side of streamspec: base-model loading (HF folder, GGUF), the multi-stream
`Transformer` (`model.py`), training (`train.py`), self-distillation (`distill.py`),
checkpoints (`checkpoint.py`) and the reference decoder (`reference.py`).

Modules are imported explicitly (``from streamspec.models.model import Transformer``) so
that importing one part does not load torch for the others.
"""
