"""Jetson deployment: the board-side scripts and the Python helpers they call.

    setup          bash: JetPack/CUDA/Python detection, onnxruntime-gpu, streamspec, custom op
    deploy         bash: copy an exported folder to a board, smoke test, systemd service
    monitor        bash: tegrastats beside `streamspec profile`, merged into its JSON
    common.sh      bash helpers the three share (dry run, quoting, root-relative paths)
    verify.py      `python -m streamspec.tools.jetson.verify`: CUDA and the custom op work
    tegrastats.py  `python -m streamspec.tools.jetson.tegrastats`: parse and merge tegrastats logs

The Python modules import only the standard library, numpy and onnxruntime, so they
run on a board that has just the edge runtime. docs/jetson.md walks through it all.
"""
