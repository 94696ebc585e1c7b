"""The edge runtime: ONNX Runtime session, IO-bound KV cache, trees, sampling, tokenizer.

Imports only numpy, onnxruntime, tokenizers, jinja2 (and rich in the CLI), never torch
or transformers, so a device needs nothing else. `Engine` is imported on first use, so
that `streamspec.runtime.tree` stays importable without onnxruntime. The HTTP server
(`streamspec.runtime.server`, FastAPI) is imported only by those who serve.
"""

# public name -> the module that defines it
_MODULES = {"Engine": "engine", "Generation": "stats", "GenerationStats": "stats", "StepRecord": "stats",
            "TreeSettings": "tree_settings", "Conversation": "conversation", "Fallback": "fallback"}
__all__ = list(_MODULES)


def __getattr__(name: str):
    if name in _MODULES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
