"""The edge runtime: ONNX Runtime session, IO-bound KV cache, trees, sampling, tokenizer.

Imports only numpy, onnxruntime, tokenizers, jinja2 (and rich in the CLI), never torch
or transformers, so a device needs nothing else. `Engine` is imported on first use, so
that `streamspec.runtime.tree` stays importable without onnxruntime.
"""

__all__ = ["Engine", "Generation", "GenerationStats"]


def __getattr__(name: str):
    if name in __all__:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
