"""`streamspec build-ops`: compile the TreeAttention custom op for this ONNX Runtime."""

from __future__ import annotations

import argparse

HELP = ("Build the TreeAttention custom-op library (C++ for the CPU provider, optionally CUDA) "
        "for the installed onnxruntime and cache it.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cuda", action="store_true",
                        help="also build the CUDA kernel (needs nvcc; registers CPU and CUDA kernels)")
    parser.add_argument("--cuda-arch", nargs="+", default=None, metavar="SM",
                        help="CUDA architectures, e.g. 87 (Jetson Orin) 72 (Xavier) 80 90; "
                             "default 80 87 90")
    parser.add_argument("--ort-include-dir", default=None,
                        help="folder with onnxruntime_c_api.h (Jetson or source installs); default: "
                             "the headers of the npm package com.github.asus4.onnxruntime 0.4.9, "
                             "fetched once into the cache")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching build is cached")


def run(args: argparse.Namespace) -> int:
    from streamspec.custom_ops import CustomOpError, build
    from streamspec.errors import StreamspecError

    try:
        path = build(cuda=args.cuda, cuda_arch=args.cuda_arch, ort_include_dir=args.ort_include_dir,
                     force=args.force)
    except CustomOpError as error:
        raise StreamspecError(str(error)) from None
    print(f"Built {path}")
    return 0
