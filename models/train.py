"""Training the speculative streams (and the early-exit adapter) on distilled answers.

Loss of a batch of windows (docs/design.md):
    α0·CE(main) + Σ_j α_j·CE(stream j) + α_exit·KL(main ‖ exit)
The main term only counts in shared mode: in lossless mode no trained parameter
touches the main stream. The exit adapter learns the main stream's next-token
distribution at the insertion layer (tree pruning).

Two ways to compute a window, chosen by `path`:
  cached (lossless only): one pass without gradient per sequence gives the hidden
    states at the insertion layer and the main rows' keys/values in every MSA layer
    (the frozen base model); each window then runs only its stream rows, with
    gradient, over those cached keys/values (`Transformer.stream_upper`).
  plain: the insertion-layer hidden states are cached the same way (no layer below
    the MSA layers trains in either mode), then `Transformer.upper` runs main and
    stream rows of the window's whole prefix with gradient. Shared mode needs it.

The run folder (--out) holds the best checkpoint (lowest held-out loss) at its top,
and `last/`: the latest checkpoint plus optimizer state and `trainer_state.json`, from
which an interrupted run resumes exactly (data order and initialisation are pure
functions of the seed and the step). Under torchrun (WORLD_SIZE set) the objective is
wrapped in DistributedDataParallel and each process takes its share of the windows.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from streamspec.runtime.tree import accept, build_tree

from .attention import EagerAttention, MainKVAttention, causal_tree_mask
from .checkpoint import (CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE, CheckpointInfo, load_trained,
                         read_checkpoint_info, read_trained, save_checkpoint, save_tensors, write_json)
from .config import StreamConfig
from .data import Record, Window, file_sha256, heldout_by_domain, read_records, split_records, window_stream
from .errors import StreamspecError
from .model import Transformer

LAST_DIR = "last"
STATE_FILE = "trainer_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"


@dataclass
class TrainConfig:
    """Every hyper-parameter of a run (stored in the checkpoint's streamspec.json)."""

    data: str
    out: str
    base: Optional[str] = None  # None / "default": the embedded SmolLM2-135M-Instruct
    mode: str = "lossless"
    streams: int = 3  # γ
    msa_layers: int = 10  # N_s
    lora_rank: int = 32
    lora_alpha: float = 32.0
    exit_rank: int = 8
    draft_vocab: int = 0  # >0: stream rows and the exit head score only the N most frequent answer tokens
    steps: int = 1000
    batch: int = 4  # windows per step and process
    window: int = 64  # trained positions per window
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient norm limit, 0 for none
    main_weight: float = 1.0  # α0 (shared mode only)
    stream_weight: float = 0.1  # α_j
    exit_weight: float = 0.1
    max_length: int = 1024  # longer records are skipped
    seed: int = 0
    # Not part of the run's identity: may change when resuming.
    eval_every: int = 100
    eval_records: int = 32  # held-out records per domain
    save_every: int = 50
    budgets: tuple = (1, 4, 8, 16, 32, 64)
    stop_at: Optional[int] = None  # pause after this step (resumable)
    path: str = "auto"  # auto | cached | plain
    threads: Optional[int] = None
    device: str = "auto"
    restart: bool = False
    init: Optional[str] = None  # warm start: a checkpoint folder whose trained weights a new run starts from

    # What a resumed run must share with the run it resumes. `steps` may grow (the
    # learning-rate schedule then stretches from the resumed step on).
    IDENTITY = ("mode", "streams", "msa_layers", "lora_rank", "lora_alpha", "exit_rank", "draft_vocab", "batch", "window", "lr", "warmup", "weight_decay", "clip", "main_weight",
                "stream_weight", "exit_weight", "max_length", "seed")

    def stream_config(self) -> StreamConfig:
        return StreamConfig(num_streams=self.streams, num_msa_layers=self.msa_layers, mode=self.mode,
                            lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, exit_rank=self.exit_rank)

    def validate(self) -> None:
        checks = [(self.steps >= 1, "--steps must be at least 1"),
                  (self.batch >= 1, "--batch must be at least 1"),
                  (self.window >= 1, "--window must be at least 1"),
                  (self.lr > 0, "--lr must be positive"),
                  (self.eval_every >= 1 and self.save_every >= 1, "--eval-every and --save-every must be at least 1"),
                  (self.eval_records >= 1, "--eval-records must be at least 1"),
                  (self.draft_vocab >= 0, "--draft-vocab must not be negative"),
                  (all(b >= 0 for b in self.budgets), "--budgets must be non-negative"),
                  (self.path in ("auto", "cached", "plain"), "--path must be auto, cached or plain"),
                  (not (self.path == "cached" and self.mode == "shared"),
                   "--path cached needs lossless mode (in shared mode the main rows train)")]
        for ok, message in checks:
            if not ok:
                raise StreamspecError(message + ".")


@dataclass
class TrainResult:
    out: Path
    step: int
    best_step: int
    history: list = field(default_factory=list)  # held-out metrics per evaluation
    seconds_per_step: float = 0.0
    model: Optional[Transformer] = None  # the model as the run left it (last step)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ------------------------------------------------------------------------------------
# One record's pass without gradient.


@dataclass
class SequenceStates:
    tokens: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    hidden: torch.Tensor  # [1, T, D] at the insertion layer
    main_keys: dict  # MSA layer -> [1, KV, T, D] (cached path only)
    main_values: dict
    answer_logprobs: Optional[torch.Tensor]  # [1, T - first, V] main stream, positions first.. (cached path)


class _KVRecorder(EagerAttention):
    """Causal attention over a whole sequence that keeps the MSA layers' keys and values."""

    def __init__(self, length: int, from_layer: int, device):
        super().__init__(causal_tree_mask(length, device=device), 0)
        self.from_layer = from_layer
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def __call__(self, layer, q, k, v, scale):
        if layer >= self.from_layer:
            self.keys[layer], self.values[layer] = k, v
        return super().__call__(layer, q, k, v, scale)


@torch.no_grad()
def sequence_states(model: Transformer, record: Record, with_main: bool, device) -> SequenceStates:
    tokens = torch.tensor([record.tokens], dtype=torch.long, device=device)
    positions = torch.arange(tokens.shape[1], device=device)[None]
    recorder = _KVRecorder(tokens.shape[1], model.msa_start, device)
    hidden = model.lower(tokens, positions, recorder)
    if not with_main:
        return SequenceStates(tokens, positions, hidden, {}, {}, None)
    # The head only over the answer positions: the prompt's rows predict nothing trained.
    upper = model.msa_layers(hidden, positions, recorder, with_streams=False)
    logprobs = F.log_softmax(model.head(upper[:, record.first_position:]).float(), dim=-1)
    return SequenceStates(tokens, positions, hidden, recorder.keys, recorder.values, logprobs)


# ------------------------------------------------------------------------------------
# The objective.

IGNORE = -100  # cross-entropy's ignore_index: a target no stream can draft


def draft_columns(model: Transformer) -> Optional[torch.Tensor]:
    """[V] column of each token id in the stream logits over model.draft_vocab, IGNORE for
    tokens outside it; None when the streams score the whole vocabulary."""
    if model.draft_vocab is None:
        return None
    index = torch.full((model.config.vocab_size,), IGNORE, dtype=torch.long, device=model.draft_vocab.device)
    index[model.draft_vocab] = torch.arange(len(model.draft_vocab), device=model.draft_vocab.device)
    return index


class StreamObjective(nn.Module):
    """Loss of a batch of windows; a module so that DistributedDataParallel can wrap it."""

    def __init__(self, model: Transformer, config: TrainConfig, cached: bool, cache_records: int = 4):
        super().__init__()
        self.model = model
        self.config = config
        self.cached = cached
        self._states: OrderedDict[int, SequenceStates] = OrderedDict()
        self._cache_records = cache_records
        # With a drafting vocabulary [V'] (model.draft_vocab), stream rows and the exit head
        # are trained as they are deployed: a softmax over V' only (a sixth of SmolLM2's
        # head to compute). vocab_index maps a token id to its column, -100 (ignored by
        # the loss) for tokens outside V', which a stream can never draft anyway.
        self.vocab_index = draft_columns(model)

    def columns(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> columns of the stream logits (IGNORE outside the drafting vocabulary)."""
        return tokens if self.vocab_index is None else self.vocab_index[tokens]

    def states(self, record: Record) -> SequenceStates:
        # Windows of a record come one after another (data.window_stream), so a small
        # LRU computes each record's pass once per epoch.
        if record.index in self._states:
            self._states.move_to_end(record.index)
        else:
            device = self.model.embed.weight.device
            self._states[record.index] = sequence_states(self.model, record, self.cached, device)
            if len(self._states) > self._cache_records:
                self._states.popitem(last=False)
        return self._states[record.index]

    def _window_logits(self, window: Window, states: SequenceStates):
        """(main [W, V] or None, streams [W, γ, V'], exit [W, V'], main log-probs [W, V]),
        V' the drafting vocabulary (V without one)."""
        model, s, e = self.model, window.start, window.end
        g, vocab = model.num_streams, model.draft_vocab
        device = states.hidden.device
        if self.cached:
            keys = {layer: k[:, :, :e] for layer, k in states.main_keys.items()}
            values = {layer: v[:, :, :e] for layer, v in states.main_values.items()}
            visible = causal_tree_mask(e, device=device)[:, s:e]
            attention = MainKVAttention(keys, values, visible, g)
            streams = model.stream_upper(states.hidden[:, s:e], states.positions[:, s:e], attention, vocab)[0]
            first = window.record.first_position
            target = states.answer_logprobs[0, s - first:e - first]
            return None, streams, model.exit_head(states.hidden[:, s:e], vocab)[0], target
        out = model.upper(states.hidden[:, :e], states.positions[:, :e],
                          EagerAttention(causal_tree_mask(e, device=device), g))
        main = out.main_logits[0, s:e]
        target = F.log_softmax(main.detach().float(), dim=-1)
        streams, exit_logits = out.stream_logits[0, s:e], out.exit_logits[0, s:e]
        if vocab is not None:
            streams, exit_logits = streams[..., vocab], exit_logits[..., vocab]
        return main, streams, exit_logits, target

    def forward(self, windows: list[Window]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the loss and detached sums: stream_loss/stream_correct/stream_count [γ], main_*, exit_*."""
        g, config = self.model.num_streams, self.config
        device = self.model.embed.weight.device
        zero = torch.zeros((), device=device)
        stream_loss = [zero] * g  # summed cross-entropies, one per stream
        stream_correct, stream_count = torch.zeros(g, device=device), torch.zeros(g, device=device)
        main_loss = main_correct = exit_loss = exit_agree = rows = zero
        for window in windows:
            states = self.states(window.record)
            main, streams, exit_logits, target = self._window_logits(window, states)
            tokens = states.tokens[0]
            s, e = window.start, window.end
            for j in range(1, g + 1):
                targets = self.columns(tokens[s + 1 + j:e + 1 + j])  # shorter near the sequence end
                if len(targets) == 0:
                    continue
                logits = streams[:len(targets), j - 1]
                stream_loss[j - 1] = stream_loss[j - 1] + F.cross_entropy(logits.float(), targets, reduction="sum",
                                                                          ignore_index=IGNORE)
                stream_correct[j - 1] += (logits.argmax(-1) == targets).sum()
                stream_count[j - 1] += (targets != IGNORE).sum()
            targets = tokens[s + 1:e + 1]
            main_logprobs = target if main is None else F.log_softmax(main.float(), dim=-1)
            main_loss = main_loss + F.nll_loss(main_logprobs, targets, reduction="sum")
            main_correct = main_correct + (main_logprobs.argmax(-1) == targets).sum()
            # The exit head learns the main stream's distribution over the columns it scores.
            exit_target = target if self.model.draft_vocab is None else \
                (lambda t: t - t.logsumexp(-1, keepdim=True))(target[:, self.model.draft_vocab])
            exit_logprobs = F.log_softmax(exit_logits.float(), dim=-1)
            exit_loss = exit_loss + F.kl_div(exit_logprobs, exit_target, log_target=True, reduction="sum")
            exit_agree = exit_agree + (exit_logprobs.argmax(-1) == exit_target.argmax(-1)).sum()
            rows = rows + (e - s)
        stream_loss = torch.stack(stream_loss)
        stream_mean = stream_loss / stream_count.clamp(min=1)
        loss = config.stream_weight * stream_mean.sum() + config.exit_weight * exit_loss / rows
        if self.model.streams.mode == "shared":
            loss = loss + config.main_weight * main_loss / rows
        stats = {"stream_loss": stream_loss.detach(), "stream_correct": stream_correct,
                 "stream_count": stream_count, "main_loss": main_loss.detach(),
                 "main_correct": main_correct, "exit_loss": exit_loss.detach(), "exit_agree": exit_agree,
                 "rows": rows}
        return loss, stats


# ------------------------------------------------------------------------------------
# Held-out evaluation.


def greedy_walk(tokens: np.ndarray, first: int, stream_ids: np.ndarray, stream_probs: np.ndarray,
                budget: int) -> int:
    """Forward passes that greedy speculative decoding needs for the answer tokens[first + 1:].

    Exact in lossless mode on the base model's own greedy answers: the accepted path is
    the answer itself. stream_ids, stream_probs: [T - 1 - first, γ, k] top-k of the
    streams at positions first.. (sorted). The prefill yields tokens[first + 1]; each
    step drafts from the streams at position t (the last accepted node), builds the
    tree under the root tokens[t + 1] and accepts the longest prefix of tokens[t + 2:]
    along one of its paths, plus the correction token.
    """
    length, t, steps = len(tokens), first, 0
    while t + 2 < length:
        tree = build_tree(int(tokens[t + 1]), stream_ids[t - first], stream_probs[t - first], budget)
        base = t + 2

        def choose(node: int) -> int:
            index = base + int(tree.depths[node])
            return int(tokens[index]) if index < length else -1

        path, _ = accept(tree, choose)
        steps += 1
        t += len(path)  # the last accepted node sits at t + 1 + (len(path) - 1)
    return steps


@torch.no_grad()
def evaluate(model: Transformer, records: list[Record], budgets, config: TrainConfig) -> dict:
    """Held-out losses, top-1 accuracies, exit agreement and greedy tokens per pass.

    Runs the full forward pass of inference (main and stream rows, causal) per record.
    Tokens per pass is exact for lossless models on self-distilled data; in shared mode
    the main stream drifts from the data, so it is an estimate there.
    """
    model.eval()
    g, vocab = model.num_streams, model.draft_vocab
    device = model.embed.weight.device
    columns = draft_columns(model)
    # stream_valid: targets inside the drafting vocabulary (the loss's rows); a target
    # outside it counts as a miss in the accuracy, as no stream can draft it.
    stream_loss, stream_correct, stream_count, stream_valid = np.zeros(g), np.zeros(g), np.zeros(g), np.zeros(g)
    main_loss = main_correct = exit_agree = rows = 0.0
    step_tokens, steps = 0, {b: 0 for b in budgets}
    top_k = max(1, min(max(budgets, default=1), model.config.vocab_size))
    for record in records:
        tokens = torch.tensor([record.tokens], dtype=torch.long, device=device)
        length, first = tokens.shape[1], record.first_position
        positions = torch.arange(length, device=device)[None]
        out = model(tokens, positions, EagerAttention(causal_tree_mask(length, device=device), g))
        targets = tokens[0, first + 1:]
        main = out.main_logits[0, first:length - 1].float()
        main_loss += F.cross_entropy(main, targets, reduction="sum").item()
        main_correct += (main.argmax(-1) == targets).sum().item()
        exit_logits = out.exit_logits[0, first:length - 1]
        streams = out.stream_logits[0, first:length - 1].float()  # [A, γ, V]
        if vocab is not None:  # score what deployment scores: [A, V'], [A, γ, V']
            exit_logits, streams = exit_logits[..., vocab], streams[..., vocab]
        exit_ids = exit_logits.argmax(-1) if vocab is None else vocab[exit_logits.argmax(-1)]
        exit_agree += (exit_ids == main.argmax(-1)).sum().item()
        rows += len(targets)
        for j in range(1, g + 1):
            stream_targets = tokens[0, first + 1 + j:]
            if columns is not None:
                stream_targets = columns[stream_targets]
            logits = streams[:len(stream_targets), j - 1]
            stream_loss[j - 1] += F.cross_entropy(logits, stream_targets, reduction="sum", ignore_index=IGNORE).item()
            stream_correct[j - 1] += (logits.argmax(-1) == stream_targets).sum().item()
            stream_count[j - 1] += len(stream_targets)
            stream_valid[j - 1] += (stream_targets != IGNORE).sum().item()
        top = torch.softmax(streams, dim=-1).topk(min(top_k, streams.shape[-1]), dim=-1)
        top_ids = top.indices if vocab is None else vocab[top.indices]
        ids, probs = top_ids.cpu().numpy(), top.values.cpu().numpy()
        sequence = tokens[0].cpu().numpy()
        step_tokens += length - 1 - first - 1  # the prefill yields the first answer token
        for budget in budgets:
            steps[budget] += greedy_walk(sequence, first, ids, probs, budget)
    stream_mean = stream_loss / np.maximum(stream_valid, 1)
    loss = config.stream_weight * float(stream_mean.sum())
    if model.streams.mode == "shared":
        loss += config.main_weight * main_loss / max(rows, 1)
    return {
        "loss": loss,
        "main_loss": main_loss / max(rows, 1),
        "main_accuracy": main_correct / max(rows, 1),
        "stream_loss": [float(x) for x in stream_mean],
        "stream_accuracy": [float(x) for x in stream_correct / np.maximum(stream_count, 1)],
        "exit_agreement": exit_agree / max(rows, 1),
        "tokens_per_pass": {str(b): step_tokens / max(steps[b], 1) for b in budgets},
        "records": len(records),
    }


MACRO_KEYS = ("loss", "main_loss", "main_accuracy", "exit_agreement")


def evaluate_domains(model: Transformer, groups: dict[str, list[Record]], budgets, config: TrainConfig) -> dict:
    """`evaluate` on each domain's held-out records, and their macro average (every domain
    counts the same, however many records it has): a regression on one domain shows in
    its own figures and moves the average that picks the best checkpoint."""
    per = {domain: evaluate(model, records, budgets, config) for domain, records in groups.items()}
    results = list(per.values())
    metrics = {key: float(np.mean([r[key] for r in results])) for key in MACRO_KEYS}
    for key in ("stream_loss", "stream_accuracy"):
        metrics[key] = [float(x) for x in np.mean([r[key] for r in results], axis=0)]
    metrics["tokens_per_pass"] = {b: float(np.mean([r["tokens_per_pass"][b] for r in results]))
                                  for b in results[0]["tokens_per_pass"]}
    metrics["records"] = sum(r["records"] for r in results)
    metrics["domains"] = {domain: {"records": r["records"], "tokens_per_pass": r["tokens_per_pass"],
                                   "stream_accuracy": r["stream_accuracy"]} for domain, r in per.items()}
    return metrics


def describe(metrics: dict) -> str:
    """Held-out metrics: one line, then one line of tokens per pass per domain."""
    accuracy = " ".join(f"{100 * a:.1f}%" for a in metrics["stream_accuracy"])
    losses = " ".join(f"{x:.2f}" for x in metrics["stream_loss"])
    per_pass = " ".join(f"B{b}:{v:.2f}" for b, v in metrics["tokens_per_pass"].items())
    line = (f"stream acc {accuracy} | stream loss {losses} | main acc {100 * metrics['main_accuracy']:.1f}% "
            f"| exit agree {100 * metrics['exit_agreement']:.1f}% | tokens/pass {per_pass}")
    domains = metrics.get("domains", {})
    if len(domains) > 1:
        line += "".join(f"\n  {domain:>10}: " + " ".join(f"B{b}:{v:.2f}" for b, v in d["tokens_per_pass"].items())
                        for domain, d in domains.items())
    return line


# ------------------------------------------------------------------------------------
# Run folder: best checkpoint at the top, resumable state in last/.


def save_optimizer(folder: Path, optimizer: torch.optim.Optimizer, names: list[str]) -> None:
    """AdamW state as safetensors (tensors by parameter name) + json (hyper-parameters)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{names[index]}/{key}"] = value
            else:
                scalars[f"{names[index]}/{key}"] = value
    groups = [{**{k: v for k, v in group.items() if k != "params"},
               "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]
    save_tensors(folder / OPTIMIZER_TENSORS, tensors)
    write_json(folder / OPTIMIZER_JSON, {"param_groups": groups, "scalars": scalars})


def load_optimizer(folder: Path, optimizer: torch.optim.Optimizer, names: list[str]) -> None:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(folder / OPTIMIZER_TENSORS))
        meta = json.loads((folder / OPTIMIZER_JSON).read_text(encoding="utf-8"))
    except Exception:
        raise StreamspecError(f"The optimizer state in {folder} is missing or corrupt; pass --restart to start over.") from None
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        name, _, field_name = key.rpartition("/")
        state.setdefault(index[name], {})[field_name] = value
    groups = [{**group, "params": [index[n] for n in group["params"]]} for group in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _find_last(out: Path) -> Optional[Path]:
    for name in (LAST_DIR, f".{LAST_DIR}.old"):  # .old: a save interrupted mid-swap
        if (out / name / STATE_FILE).is_file():
            return out / name
    return None


def _swap_in(tmp: Path, dest: Path) -> None:
    """Replace folder dest by tmp with renames only (never a half-written dest)."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def _clear_run(out: Path) -> None:
    """--restart: remove what a run writes, and only that."""
    for name in (CONFIG_FILE, WEIGHTS_FILE) + TOKENIZER_FILES:
        (out / name).unlink(missing_ok=True)
    for name in (LAST_DIR, f".{LAST_DIR}.old", f".{LAST_DIR}.tmp"):
        shutil.rmtree(out / name, ignore_errors=True)


# ------------------------------------------------------------------------------------
# The loop.


def build_for_training(config: TrainConfig) -> tuple[Path, str, Transformer]:
    """(base folder, base fingerprint, model with only the trained parameters requiring grad)."""
    from .loading import base_fingerprint, resolve_base
    from .model import build_model

    base_folder = resolve_base(config.base)
    base_sha = base_fingerprint(base_folder)
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(config.seed)  # the initial stream parameters depend on the seed only
        model = build_model(base_folder, config.stream_config())
    trained = model.trainable_parameters()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trained)
    return base_folder, base_sha, model


class _Distributed:
    """torchrun's environment: DistributedDataParallel when WORLD_SIZE is set."""

    def __init__(self):
        self.enabled = "WORLD_SIZE" in os.environ
        self.rank, self.world, self.local_rank = 0, 1, 0
        if self.enabled:
            import torch.distributed as dist

            self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
            if torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank)  # one GPU per process, before NCCL starts
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.enabled:
            torch.distributed.destroy_process_group()


def _init_checkpoint(config: TrainConfig, base_sha: str) -> CheckpointInfo:
    """The checkpoint a new run starts from (--init): same base model and stream shape,
    a LoRA rank at least as large (`grow_lora`); the optimizer, schedule and drafting
    vocabulary start afresh."""
    info = read_checkpoint_info(config.init)
    if info.base_sha256 != base_sha:
        raise StreamspecError(f"--init {config.init} was trained on another base model than --base.")
    wanted = config.stream_config()
    if (info.streams.num_streams, info.streams.num_msa_layers, info.streams.mode, info.streams.exit_rank) != \
            (wanted.num_streams, wanted.num_msa_layers, wanted.mode, wanted.exit_rank) or \
            info.streams.lora_rank > wanted.lora_rank:
        raise StreamspecError(
            f"--init {config.init} has {info.streams.num_streams} streams on {info.streams.num_msa_layers} layers "
            f"({info.streams.mode}, rank {info.streams.lora_rank}, exit rank {info.streams.exit_rank}); pass the "
            f"same --streams, --msa-layers, --mode and --exit-rank, and a --lora-rank of at least "
            f"{info.streams.lora_rank}.")
    return info


def grow_lora(trained: dict[str, torch.Tensor], model: Transformer, scale: float) -> dict[str, torch.Tensor]:
    """Trained weights of a smaller LoRA rank r (adapters scaled by `scale`) laid into
    `model`'s larger rank R, computing the same function: A [r, in] fills A's first r rows
    (the other R - r keep their random start), B [out, r] B's first r columns rescaled to
    the new scale (the other columns stay zero, so the new directions start silent and
    training opens them). Other weights pass through."""
    ours = model.trainable_parameters()
    grown = dict(trained)
    for name, weight in trained.items():
        if ".lora_" not in name or name not in ours or weight.shape == ours[name].shape:
            continue
        module = model.get_submodule(name.rsplit(".", 1)[0])
        new = ours[name].detach().clone()
        if name.endswith("lora_A"):
            new[:weight.shape[0]] = weight
        else:
            new.zero_()
            new[:, :weight.shape[1]] = weight * (scale / module.lora_scale)
        grown[name] = new
    return grown


def _device(name: str, dist: _Distributed) -> torch.device:
    if name == "auto":
        return torch.device("cuda", dist.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StreamspecError(f"--device {name!r} is not a device torch knows (try cpu or cuda).") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StreamspecError("--device cuda was asked for, but torch sees no CUDA device.")
        if dist.enabled:
            device = torch.device("cuda", dist.local_rank)
    return device


def train(config: TrainConfig, progress: bool = True, echo: bool = True) -> TrainResult:
    """Train (or resume) a run into config.out; returns where it ended and its evaluations."""
    from rich.console import Console

    config.validate()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    console = Console(quiet=not echo, highlight=False)
    dist = _Distributed()
    try:
        return _train(config, dist, console, progress and dist.main)
    finally:
        dist.close()
        torch.set_num_threads(threads)  # a library call leaves the caller's setting as it was


def _train(config: TrainConfig, dist: _Distributed, console, progress: bool) -> TrainResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from safetensors.torch import load_file

    device = _device(config.device, dist)
    base_folder, base_sha, model = build_for_training(config)
    model.to(device)
    train_records, heldout, skipped = split_records(read_records(config.data, model.config.vocab_size, base_sha),
                                                    config.max_length)
    vocab_coverage = None
    if config.draft_vocab:
        from .vocab import choose_draft_vocab, coverage

        ids, train_share = choose_draft_vocab([r.answer_ids for r in train_records], model.config.vocab_size,
                                              config.draft_vocab, model.config.eos_token_ids)
        model.draft_vocab = ids.to(device)
        vocab_coverage = (train_share, coverage(ids, [r.answer_ids for r in heldout]))
    heldout_groups = heldout_by_domain(heldout, config.eval_records)
    heldout = [r for group in heldout_groups.values() for r in group]
    init_info = _init_checkpoint(config, base_sha) if config.init else None
    identity = {**{k: getattr(config, k) for k in TrainConfig.IDENTITY},
                "base_sha256": base_sha, "data_sha256": file_sha256(config.data), "world_size": dist.world}
    if init_info is not None:  # only when set, so runs saved before --init existed still resume
        identity["init_sha256"] = init_info.weights_sha256
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise StreamspecError(f"--out {out} is a file, not a folder.")
    if config.restart and dist.main:
        _clear_run(out)
    dist.barrier()
    last = _find_last(out)
    state = {"step": 0, "history": [], "best": None}
    if last is not None:
        state = json.loads((last / STATE_FILE).read_text(encoding="utf-8"))
        recorded = state.get("identity", {})
        changed = [k for k in {**recorded, **identity} if recorded.get(k) != identity.get(k)]
        if changed:
            k = changed[0]
            raise StreamspecError(
                f"{out} holds a run with other settings ({k} was {recorded.get(k)!r}, now "
                f"{identity.get(k)!r}); resume it with the same settings or pass --restart."
            )
    elif out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise StreamspecError(f"--out {out} already holds files but no training run; choose another folder or pass --restart.")

    names = list(model.trainable_parameters())
    parameters = [model.trainable_parameters()[n] for n in names]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if last is not None:
        load_trained(model, load_file(str(last / WEIGHTS_FILE)), str(last / WEIGHTS_FILE))
        load_optimizer(last, optimizer, names)
    elif init_info is not None:
        streams = init_info.streams
        trained = grow_lora(read_trained(init_info), model, streams.lora_alpha / streams.lora_rank)
        load_trained(model, trained, str(init_info.weights_path))
    start = state["step"]
    cached = config.path == "cached" or (config.path == "auto" and config.mode == "lossless")
    objective: nn.Module = StreamObjective(model, config, cached)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)

    run_switches = ("out", "restart", "stop_at", "threads", "device")  # not hyper-parameters
    training_meta = {**{k: v for k, v in asdict(config).items() if k not in run_switches},
                     "budgets": list(config.budgets), **identity,
                     "train_records": len(train_records), "heldout_records": len(heldout),
                     "heldout_domains": {d: len(g) for d, g in heldout_groups.items()},
                     "skipped_records": skipped, "path": "cached" if cached else "plain"}

    def save_model(folder: Path, meta: dict, heldout_metrics: dict) -> None:
        save_checkpoint(folder, model, base_folder, base_sha, config.base, meta, heldout_metrics)
        if vocab_coverage is not None:  # the vocabulary the streams were trained to score
            from .vocab import save_draft_vocab

            save_draft_vocab(folder, model.draft_vocab.cpu(), *vocab_coverage)

    def save(step: int, metrics: Optional[dict], best: bool) -> None:
        meta = {**training_meta, "step": step}
        heldout_metrics = {"step": step, "heldout": metrics} if metrics else {}
        if best:
            save_model(out, meta, heldout_metrics)
        tmp = out / f".{LAST_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(tmp, meta, heldout_metrics)
        save_optimizer(tmp, optimizer, names)
        write_json(tmp / STATE_FILE, {**state, "step": step, "identity": identity})
        _swap_in(tmp, out / LAST_DIR)

    def run_eval(step: int) -> None:
        metrics = evaluate_domains(model, heldout_groups, config.budgets, config)
        model.train()
        state["history"].append({"step": step, **metrics})
        best = state["best"] is None or metrics["loss"] < state["best"]["loss"]
        if best:
            state["best"] = {"step": step, "loss": metrics["loss"]}
        console.print(f"[bold]step {step}[/] held-out: {describe(metrics)}" + ("  [green](best)[/]" if best else ""))
        save(step, metrics, best)

    if dist.main:
        trainable = sum(p.numel() for p in parameters)
        console.print(
            f"{model.config.model_type} {model.config.num_layers} layers, mode {config.mode}, γ={config.streams}, "
            f"N_s={config.msa_layers}, {trainable / 1e6:.2f}M trained parameters, {len(train_records)} train / "
            f"{len(heldout)} held-out records" + (f" ({skipped} too long, skipped)" if skipped else "")
            + f", {'cached main K/V' if cached else 'plain'} path, {dist.world} process(es) on {device}"
        )
        if start >= config.steps:
            console.print(f"{out} already finished {config.steps} steps.")
        elif start:
            console.print(f"Resuming {out} at step {start} of {config.steps}.")
    if config.stop_at is not None and config.stop_at <= start:
        return TrainResult(out, start, state["best"]["step"] if state["best"] else 0, state["history"], 0.0, model)
    model.train()
    if dist.main and start == 0 and start < config.steps:
        run_eval(0)
    per_step = config.batch * dist.world
    stream = itertools.islice(window_stream(train_records, config.window, config.seed), start * per_step, None)
    recent: deque = deque(maxlen=20)
    seconds = []
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[stats]}")]
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=config.steps, completed=start, stats="")
        for step in range(start, config.steps):
            began = time.perf_counter()
            windows = [next(stream) for _ in range(per_step)][dist.rank::dist.world]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            loss, stats = objective(windows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip:
                torch.nn.utils.clip_grad_norm_(parameters, config.clip)
            optimizer.step()
            seconds.append(time.perf_counter() - began)
            recent.append({k: v.cpu() for k, v in stats.items()})
            done = step + 1
            if dist.main:
                bar.update(task, completed=done, stats=_running(recent, seconds))
                if done % config.eval_every == 0 or done == config.steps:
                    run_eval(done)
                elif done % config.save_every == 0 or done == config.stop_at:
                    save(done, None, best=False)
            state["step"] = done
            if done == config.stop_at:
                break
    dist.barrier()
    best_step = state["best"]["step"] if state["best"] else 0
    return TrainResult(out, max(start, state["step"]), best_step, state["history"],
                       float(np.mean(seconds)) if seconds else 0.0, model)


def _running(recent: deque, seconds: list) -> str:
    """Progress text: mean stream loss and per-stream accuracy over the last steps."""
    correct = sum(s["stream_correct"] for s in recent)
    count = sum(s["stream_count"] for s in recent).clamp(min=1)
    loss = (sum(s["stream_loss"] for s in recent) / count).mean().item()
    accuracy = " ".join(f"{100 * a:.0f}%" for a in (correct / count).tolist())
    return f"stream loss {loss:.2f} acc {accuracy} | {np.mean(seconds[-20:]):.2f} s/step"
