"""The exporter: a streamspec checkpoint or base model -> a deployable ONNX folder.

    from streamspec.exporter import export, export_model
    export("default", "smollm2-onnx")            # a base model, autoregressive use
    export("my-checkpoint", "my-onnx", dtype="fp16")
"""

from .pipeline import export, export_model, load_source

__all__ = ["export", "export_model", "load_source"]
