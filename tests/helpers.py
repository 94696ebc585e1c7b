"""Shared test checks (and `announce_body`, a raw HTTP request for the server tests).

Exactness: greedy speculative decoding must reproduce greedy autoregressive decoding
token for token. A tree step and a one-token step add the same numbers in a different
order, so two logits within rounding of each other may swap; a divergence passes only
where the reference's top two logits differ by less than 1e-4 relative and the
diverging token is one of them. Any other divergence is a bug.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Callable, Sequence

import numpy as np

NEAR_TIE = 1e-4
HEAVY_MODULES = ("torch", "transformers", "streamspec.models")


def assert_runs_without_heavy_imports(code: str, timeout: float = 120) -> None:
    """Run `code` in a fresh interpreter; fail if it ends with torch, transformers or the
    training side (streamspec.models) imported, or fails. What an edge device runs must
    need only onnxruntime, numpy and tokenizers."""
    check = (f"import sys\n{code}\nheavy = [m for m in {HEAVY_MODULES!r} if m in sys.modules]\n"
             "print(heavy)\nsys.exit(1 if heavy else 0)\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr


def first_divergence(tokens: Sequence[int], reference: Sequence[int]) -> int:
    """Index of the first differing token, or -1 when equal (lengths included)."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return -1 if len(tokens) == len(reference) else min(len(tokens), len(reference))


def assert_tokens_match(tokens: Sequence[int], reference: Sequence[int],
                        reference_logits: Callable[[list[int]], np.ndarray]) -> None:
    """Assert equality, or that the first divergence is a near-tie of the reference.

    reference_logits(generated_prefix) returns the reference model's logits [V] for the
    token that follows the prompt plus `generated_prefix`.
    """
    i = first_divergence(tokens, reference)
    if i < 0:
        return
    assert i < len(tokens) and i < len(reference), (
        f"lengths differ ({len(tokens)} vs {len(reference)}) with equal common prefix")
    logits = np.asarray(reference_logits(list(reference[:i])), dtype=np.float64)
    top2 = np.argsort(-logits)[:2]
    gap = (logits[top2[0]] - logits[top2[1]]) / max(abs(logits[top2[0]]), 1e-12)
    assert gap < NEAR_TIE and {tokens[i], reference[i]} <= set(top2.tolist()), (
        f"token {i} differs ({tokens[i]} vs reference {reference[i]}) and is no near-tie: "
        f"top-2 logits {logits[top2].tolist()} (relative gap {gap:.2e})")


def oracle_tree(root: int, right: list[int], vocab: int = 128):
    """root -> a wrong child (node 1), plus `right` (the true next tokens) as a chain
    under the root at nodes 2.. : the accepted path skips node 1, so path[i] != i."""
    from streamspec.runtime.tree import Tree

    right = right or [0]
    tokens = [root, (right[0] + 1) % vocab] + right
    parents = [-1, 0, 0] + list(range(2, 2 + len(right) - 1))
    depths = [0, 1] + list(range(1, len(right) + 1))
    return Tree(np.array(tokens, np.int64), np.array(parents, np.int32), np.array(depths, np.int32),
                np.ones(len(tokens), np.float32))


def count_generated(engine, monkeypatch) -> Callable[[], int]:
    """A function that says how many tokens the engine's generation has produced so far
    (the prefill's one, then what each step committed: `Engine.on_step`), for planted
    trees that must continue a reference from where the generation stands."""
    records = []
    monkeypatch.setattr(engine, "on_step", records.append)
    return lambda: 1 + sum(record.committed for record in records)


def generate_with_oracle_trees(engine, prompt_ids: list[int], reference: Sequence[int],
                               max_new_tokens: int, monkeypatch) -> tuple[list[int], object]:
    """Greedy speculative generation whose trees hold the true continuation off the first branch.

    Each tree is root -> a wrong child (node 1), plus the next 3 reference tokens as a
    chain under the root at nodes 2..4, so accepted paths are long and path[i] != i: KV
    compaction moves rows every step. Returns (generated tokens, GenerationStats).
    """
    from streamspec.runtime import engine as engine_module

    generated = count_generated(engine, monkeypatch)  # the root is reference[generated() - 1]

    def planted(root, stream_ids, stream_probs, budget):
        start = generated()
        return oracle_tree(root, list(reference[start:start + 3]))

    monkeypatch.setattr(engine_module, "build_tree", planted)
    monkeypatch.setattr(engine, "fallback", None)  # every step speculates: the trees are the point
    result = engine.generate(prompt_ids, max_new_tokens=max_new_tokens, ignore_eos=True)
    return result.token_ids, result.stats


def assert_top_matches(ids: np.ndarray, probs: np.ndarray, logits: np.ndarray, atol: float = 2e-5) -> None:
    """ids, probs [..., K] from the graph against reference logits [..., V]: equal ids
    (except where the reference's own logits are a near-tie), probabilities within atol."""
    logits = logits.reshape(-1, logits.shape[-1])
    ids, probs = ids.reshape(len(logits), -1), probs.reshape(len(logits), -1)
    k = ids.shape[-1]
    for row, (row_ids, row_probs) in enumerate(zip(ids, probs)):
        ref = logits[row]
        order = np.argsort(-ref, kind="stable")
        ref_probs = np.exp(ref - ref.max()) / np.exp(ref - ref.max()).sum()
        for i in np.flatnonzero(row_ids != order[:k]):
            # Equal ids, except where the reference itself cannot tell the two apart.
            a, b = ref[row_ids[i]], ref[order[i]]
            assert abs(a - b) <= NEAR_TIE * max(abs(b), 1e-6), (
                f"row {row}, candidate {i}: graph id {row_ids[i]}, reference id {order[i]} (logits {a} vs {b})")
        np.testing.assert_allclose(row_probs, ref_probs[row_ids], atol=atol, rtol=1e-4)


def announce_body(base_url: str, path: str, size: int) -> tuple[int, dict]:
    """Send only the headers of a `size`-byte POST: the server must refuse on the
    Content-Length alone (sending the body too races with the server closing early)."""
    import http.client
    import json
    from urllib.parse import urlsplit

    where = urlsplit(base_url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    try:
        connection.putrequest("POST", path)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(size))
        connection.endheaders()
        answer = connection.getresponse()
        return answer.status, json.load(answer)
    finally:
        connection.close()
