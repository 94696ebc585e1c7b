"""streamspec: Speculative Streaming for edge devices.

The parts live in their own folders and install as ``streamspec.models``,
``streamspec.runtime``, ``streamspec.exporter``, ``streamspec.custom_ops`` and
``streamspec.tools`` (see docs/design.md).
"""

__version__ = "0.1.0"
