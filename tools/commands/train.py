"""`streamspec train`: teach a base model's top layers to draft its next tokens."""

from __future__ import annotations

import argparse
import os

from streamspec.tools.commands.arguments import integer, real, seed, threads

HELP = ("Train speculative streams (and the early-exit pruning adapter) on distilled answers; "
        "resumable, prints per-stream held-out accuracy and greedy tokens per pass.")


def _budgets(text: str) -> tuple:
    try:
        budgets = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not budgets or min(budgets) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative tree budgets, got {text!r}")
    return budgets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input and output")
    io.add_argument("--base", default="default",
                    help="base model: 'default' (the embedded SmolLM2-135M-Instruct), a Hugging Face "
                         "folder or a .gguf file; must be the model the data was distilled from")
    io.add_argument("--data", required=True,
                    help="JSONL of distilled answers written by `streamspec distill`")
    io.add_argument("--out", required=True,
                    help="run folder: the best checkpoint at its top, the latest (resumable) in last/; "
                         "an unfinished run there resumes automatically")
    io.add_argument("--init", default=None, metavar="CHECKPOINT",
                    help="start a new run from this checkpoint's trained weights (e.g. models/default, to "
                         "adapt the shipped streams to your data); same base and stream shape (a larger "
                         "--lora-rank grows the adapters, computing the same at the start), fresh "
                         "optimizer and schedule")
    io.add_argument("--restart", action="store_true",
                    help="discard the run in --out and start over")

    model = parser.add_argument_group("streams")
    model.add_argument("--mode", choices=("lossless", "shared"), default="lossless",
                       help="lossless: base frozen, adapters on stream rows only (output identical to the "
                            "base model); shared: adapters on all rows of the MSA layers")
    model.add_argument("--streams", type=integer(1, 64), default=3, help="γ: speculative streams (tokens drafted per pass)")
    model.add_argument("--msa-layers", type=integer(1), default=10, help="N_s: top layers made multi-stream")
    model.add_argument("--lora-rank", type=integer(1), default=32, help="rank of the LoRA adapters in the MSA layers")
    model.add_argument("--lora-alpha", type=real(0, low_open=True), default=32.0, help="LoRA scale numerator (scale = alpha/rank)")
    model.add_argument("--exit-rank", type=integer(1), default=8, help="rank of the early-exit pruning adapter")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--steps", type=integer(1), default=1000, help="optimizer steps (may grow when resuming)")
    opt.add_argument("--batch", type=integer(1), default=4, help="windows per step (per process under torchrun)")
    opt.add_argument("--window", type=integer(1), default=64, help="answer positions per window")
    opt.add_argument("--lr", type=real(0, low_open=True), default=1e-3, help="peak AdamW learning rate")
    opt.add_argument("--warmup", type=integer(0), default=50, help="linear warm-up steps, then cosine decay to lr/10")
    opt.add_argument("--weight-decay", type=real(0), default=0.0, help="AdamW weight decay")
    opt.add_argument("--clip", type=real(0), default=1.0, help="gradient norm limit (0: none)")
    opt.add_argument("--main-weight", type=real(0), default=1.0, help="α0, main-stream loss weight (shared mode)")
    opt.add_argument("--stream-weight", type=real(0), default=0.1, help="α_j, loss weight of each stream")
    opt.add_argument("--exit-weight", type=real(0), default=0.1, help="loss weight of the early-exit adapter")
    opt.add_argument("--max-length", type=integer(1), default=1024, help="skip records longer than this (tokens)")
    opt.add_argument("--seed", type=seed, default=0, help="seed of initialisation and data order")

    run = parser.add_argument_group("evaluation and running")
    run.add_argument("--eval-every", type=integer(1), default=100, help="held-out evaluation (and best save) every N steps")
    run.add_argument("--eval-records", type=integer(1), default=32,
                     help="held-out records per domain in each evaluation (figures per domain and their mean)")
    run.add_argument("--save-every", type=integer(1), default=50, help="save last/ (resume point) every N steps")
    run.add_argument("--budgets", type=_budgets, default=(1, 4, 8, 16, 32, 64),
                     help="tree budgets (draft nodes) for the greedy tokens-per-pass metric, comma-separated")
    run.add_argument("--stop-at", type=integer(1), default=None,
                     help="pause after this step; run the same command again to resume")
    run.add_argument("--path", choices=("auto", "cached", "plain"), default="auto",
                     help="cached: stream rows only over the frozen main rows' cached keys/values "
                          "(lossless, fastest); plain: full MSA pass with gradient; auto picks")
    model.add_argument("--draft-vocab", type=integer(0), default=0, metavar="N",
                       help="train and deploy the stream rows and the exit head over a reduced drafting vocabulary: "
                            "the N most frequent training-answer tokens (stored in the checkpoint; the export scores "
                            "only those, verification keeps the whole vocabulary; 0: the whole vocabulary)")
    run.add_argument("--threads", type=threads, default=os.cpu_count() or 1, help="CPU threads for torch")
    run.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda:LOCAL_RANK under torchrun)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (evaluations still print)")


def run(args: argparse.Namespace) -> int:
    from streamspec.models.train import TrainConfig, train

    config = TrainConfig(
        data=args.data, out=args.out, base=args.base, mode=args.mode, streams=args.streams,
        msa_layers=args.msa_layers, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        exit_rank=args.exit_rank, draft_vocab=args.draft_vocab, steps=args.steps, batch=args.batch, window=args.window, lr=args.lr,
        warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip, main_weight=args.main_weight,
        stream_weight=args.stream_weight, exit_weight=args.exit_weight, max_length=args.max_length,
        seed=args.seed, eval_every=args.eval_every, eval_records=args.eval_records,
        save_every=args.save_every, budgets=args.budgets, stop_at=args.stop_at, path=args.path,
        threads=args.threads, device=args.device, restart=args.restart, init=args.init,
    )
    result = train(config, progress=not args.no_progress)
    if result.history:
        best = next((h for h in result.history if h["step"] == result.best_step), result.history[-1])
        per_pass = ", ".join(f"budget {b}: {v:.2f}" for b, v in best["tokens_per_pass"].items())
        print(f"Best checkpoint (step {result.best_step}) in {result.out}; greedy tokens per pass {per_pass}"
              + (" (mean over domains)." if len(best.get("domains", {})) > 1 else "."))
    return 0
