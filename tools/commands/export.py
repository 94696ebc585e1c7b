"""`streamspec export`: a checkpoint or base model -> a deployable ONNX folder."""

from __future__ import annotations

import argparse
import time

from streamspec.tools.commands.arguments import integer

HELP = ("Export a streamspec checkpoint (or a plain base model, for autoregressive use) to a folder "
        "that `streamspec generate` and streamspec.runtime.Engine run on ONNX Runtime.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="CKPT",
                        help="a checkpoint folder written by `streamspec train`, or a base model: 'default' "
                             "(the embedded SmolLM2-135M-Instruct), a Hugging Face folder or a .gguf file")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="the folder to write; it appears only once the export is complete")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                        help="weights, activations and KV cache; fp16 is meant for GPUs")
    parser.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                        help="weight-only quantization of the MatMuls (ONNX Runtime's MatMulNBits; int4 also "
                             "quantizes the embedding); greedy output then differs from fp32, see "
                             "docs/precision.md")
    parser.add_argument("--block-size", type=integer(16, 1 << 16), default=32,
                        help="with --quantize: weights per quantization block along the input dimension "
                             "(a power of two >= 16; smaller is more accurate and a little larger)")
    parser.add_argument("--no-quantize-head", action="store_true",
                        help="with --quantize: keep the LM head (vocabulary projection) in fp32")
    parser.add_argument("--quant-method", choices=("default", "symmetric", "rtn", "k_quant", "hqq"),
                        default="default",
                        help="with --quantize: ONNX Runtime's weight-only algorithm for what is quantized: default "
                             "(min/max round to nearest per block), symmetric (zero point fixed at the middle "
                             "code, as onnxruntime-genai does: faster with int8 activations), rtn (with clipping), "
                             "k_quant (searches each block's scale and minimum, as llama.cpp does) or hqq "
                             "(half-quadratic); the last three are 4-bit only. bench_precision compares them with fp32")
    parser.add_argument("--requantize-gguf", action="store_true",
                        help="with --quantize and a GGUF base: quantize the de-quantized weights again instead of "
                             "carrying the GGUF's own Q4_0/Q4_1/Q8_0/Q4_K/Q6_K blocks (the default, which keeps "
                             "the GGUF's weights exactly)")
    parser.add_argument("--quant-activations", choices=("fp32", "int8", "int8-head"), default="fp32",
                        help="with --quantize: what the quantized MatMuls compute with: fp32 activations "
                             "(speculative == autoregressive as with fp32 weights), int8 per row and block "
                             "(faster on CPU; the two modes may then part at near-ties and the text departs from "
                             "fp32 sooner), or int8 in the LM head only (most of int8's speed-up on a GGUF base, "
                             "little of its cost); measured in docs/precision.md")
    parser.add_argument("--kv-dtype", choices=("none", "int8", "int4"), default="none",
                        help="store the KV cache as int8 or int4 with per-channel scales calibrated on the model "
                             "(ONNX Runtime's GroupQueryAttention; portable backend only): 4x / 8x less cache "
                             "memory than fp32, at a cost in agreement with fp32, see docs/precision.md")
    parser.add_argument("--max-length", type=integer(16), default=None,
                        help="the longest prompt + answer the runtime may hold in its KV cache "
                             "(default: the model's positions, at most 2048)")
    parser.add_argument("--candidates", type=integer(1, 1 << 16), default=8,
                        help="K: top-K ids and probabilities per node that leave the graph")
    parser.add_argument("--budget", type=integer(0, 4096), default=None,
                        help="default number of draft nodes per tree for the runtime (default: the checkpoint's "
                             "measured choice, else 8; `streamspec tune` re-measures it on the device)")
    parser.add_argument("--lookup", type=integer(0, 4096), default=None,
                        help="default prompt-lookup draft tokens per tree for the runtime (default: the checkpoint's "
                             "measured choice, else 0; `streamspec tune --lookup` re-measures it)")
    parser.add_argument("--streams", type=integer(1), default=None,
                        help="deploy only the first N trained streams (shallower trees, fewer rows per node; "
                             "default: all)")
    parser.add_argument("--attention", "--backend", dest="backend", choices=("portable", "custom"),
                        default="portable",
                        help="attention backend: portable (ONNX Runtime's GroupQueryAttention, runs anywhere) or "
                             "custom (streamspec.TreeAttention, needs `streamspec build-ops`)")
    parser.add_argument("--pruning", action="store_true",
                        help="also write the step cut at the stream-insertion layer (lower.onnx, upper.onnx), so that "
                             "the runtime can prune draft trees between them (`--prune`, `streamspec tune`); "
                             "about doubles the folder's size on disk")
    parser.add_argument("--autoregressive", action="store_true",
                        help="a graph for one-token-at-a-time decoding only: the main stream as a plain decoder, no "
                             "tree inputs, no stream rows (fewer nodes per step: for a device where `streamspec tune` "
                             "picks autoregressive decoding, e.g. int4 on a CPU); the output is the same tokens")
    parser.add_argument("--full-draft-vocab", action="store_true",
                        help="stream rows and the early-exit head score the whole vocabulary even when the "
                             "checkpoint has a reduced drafting vocabulary (models/vocab.py)")
    parser.add_argument("--full-logits", action="store_true",
                        help="also output the main stream's full logits (debugging; slower)")
    parser.add_argument("--no-slim", action="store_true", help="skip onnxslim on the traced graph")
    parser.add_argument("--force", action="store_true", help="replace --out if it is an exported folder")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from streamspec.exporter import export

    from streamspec.runtime.folder import read_folder
    from streamspec.runtime.memory import estimate_memory

    start = time.perf_counter()
    out = export(args.source, args.out, streams=args.streams, dtype=args.dtype, max_length=args.max_length,
                 candidates=args.candidates, budget=args.budget, lookup=args.lookup, backend=args.backend, full_logits=args.full_logits,
                 slim=not args.no_slim, force=args.force, quantize=args.quantize, block_size=args.block_size,
                 quantize_head=not args.no_quantize_head, quant_activations=args.quant_activations,
                 gguf_blocks=not args.requantize_gguf, quant_method=args.quant_method,
                 kv_dtype=args.kv_dtype, pruning=args.pruning, full_draft_vocab=args.full_draft_vocab,
                 autoregressive=args.autoregressive)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 2 ** 20
    console = Console(stderr=True)
    console.print(f"Exported {args.source} to {out} ({size:.0f} MiB) in {time.perf_counter() - start:.0f} s.")
    console.print(f"Memory estimate: {estimate_memory(read_folder(out)).summary()}.")
    return 0
