"""Draft trees: building them from stream predictions, and walking them to accept tokens.

Plain numpy, shared by the PyTorch reference decoder and the ONNX Runtime engine.

A tree holds N nodes, flattened so that ancestors come before descendants:
  node 0       the root: the correction token of the previous step (already decided,
               not yet in the KV cache)
  node i > 0   a drafted token; depth d means "d tokens after the root"
Its rows in a step sit at positions past + depth.

Draft nodes come from two sources: the streams (`build_tree`) and prompt lookup
(`lookup_draft` + `add_branch`: the tokens that followed an earlier occurrence of the
latest n-gram, copied at no parameter cost). `Tree.sources` says which made each node.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np


STREAM, LOOKUP = 0, 1  # Tree.sources values (the root counts as STREAM)


@dataclass
class Tree:
    tokens: np.ndarray  # [N] int64
    parents: np.ndarray  # [N] int32, -1 for the root
    depths: np.ndarray  # [N] int32
    path_probs: np.ndarray  # [N] float32: product of stream probabilities from the root
    sources: Optional[np.ndarray] = None  # [N] int8: STREAM or LOOKUP (None: all streams)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def ancestor_mask(self) -> np.ndarray:
        """[N, N] bool: mask[i, j] = node j is node i or one of its ancestors."""
        n = self.size
        mask = np.eye(n, dtype=bool)
        for i in range(1, n):
            mask[i] |= mask[self.parents[i]]  # parents come first, so their row is complete
        return mask

    def positions(self, past_length: int) -> np.ndarray:
        return (past_length + self.depths).astype(np.int64)

    def source_of(self, node: int) -> int:
        return STREAM if self.sources is None else int(self.sources[node])

    def select(self, nodes: np.ndarray) -> "Tree":
        """The subtree of `nodes` [K] (ascending, closed under taking parents), re-indexed
        0..K-1 in the same order, so ancestors still come first."""
        index = np.full(self.size, -1, dtype=np.int32)
        index[nodes] = np.arange(len(nodes), dtype=np.int32)
        parents = np.where(self.parents[nodes] < 0, -1, index[np.maximum(self.parents[nodes], 0)])
        return Tree(self.tokens[nodes], parents.astype(np.int32), self.depths[nodes], self.path_probs[nodes],
                    None if self.sources is None else self.sources[nodes])


def single_node_tree(token: int) -> Tree:
    """A tree with only the root (autoregressive decoding, or the first step)."""
    return Tree(np.array([token], dtype=np.int64), np.array([-1], dtype=np.int32),
                np.zeros(1, dtype=np.int32), np.ones(1, dtype=np.float32))


def chain_tree(tokens: Sequence[int]) -> Tree:
    """A chain (a prompt, or a committed sequence): node i is the parent of node i + 1."""
    n = len(tokens)
    return Tree(np.asarray(tokens, dtype=np.int64), np.arange(-1, n - 1, dtype=np.int32),
                np.arange(n, dtype=np.int32), np.ones(n, dtype=np.float32))


def build_tree(root_token: int, stream_ids: np.ndarray, stream_probs: np.ndarray,
               budget: int) -> Tree:
    """The `budget` most probable draft nodes under the root, best first.

    stream_ids, stream_probs: [γ, k], stream j's top-k at the last accepted node, sorted
    by probability (descending). A node at depth d takes a token from stream d's list;
    its score is the product of the stream probabilities along its path. Products only
    shrink along a path, so the best-first set is closed under taking parents.
    """
    gamma, k = stream_ids.shape
    tokens, parents, depths, probs = [int(root_token)], [-1], [0], [1.0]
    # Candidates: (-score, tie-break, parent node, depth, rank in that depth's list).
    heap: list = []
    counter = 0

    def push(parent: int, depth: int, rank: int) -> None:
        nonlocal counter
        if depth <= gamma and rank < k:
            score = probs[parent] * float(stream_probs[depth - 1, rank])
            heapq.heappush(heap, (-score, counter, parent, depth, rank))
            counter += 1

    push(0, 1, 0)
    while heap and len(tokens) <= budget:
        neg_score, _, parent, depth, rank = heapq.heappop(heap)
        node = len(tokens)
        tokens.append(int(stream_ids[depth - 1, rank]))
        parents.append(parent)
        depths.append(depth)
        probs.append(-neg_score)
        push(parent, depth, rank + 1)  # the next sibling
        push(node, depth + 1, 0)  # the first child
    return Tree(np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int32),
                np.array(depths, dtype=np.int32), np.array(probs, dtype=np.float32))


def accept(tree: Tree, choose: Callable[[int], int]) -> tuple[list[int], int]:
    """Walk the tree from the root, following the model's own choice at each node.

    `choose(node)` returns the token the main stream picks after that node: its argmax
    (greedy) or a token sampled from its distribution (sampling). The walk moves to the
    child holding that token; where none does, the chosen token is the correction.
    Each token is thus exactly what autoregressive decoding would have picked.
    Returns (accepted node indices from the root, correction token).
    """
    children: dict[int, dict[int, int]] = {}
    for node in range(1, tree.size):
        children.setdefault(int(tree.parents[node]), {})[int(tree.tokens[node])] = node
    path = [0]
    while True:
        token = choose(path[-1])
        child = children.get(path[-1], {}).get(token)
        if child is None:
            return path, token
        path.append(child)


def in_place(path: Sequence[int]) -> int:
    """How many leading nodes of an accepted path already sit where compaction puts them
    (path[i] == i): their cache rows need not move."""
    return next((i for i, node in enumerate(path) if node != i), len(path))


def nodes_to_score(tree: Tree, threshold: float) -> np.ndarray:
    """The nodes whose early-exit probability tree pruning needs: the drafts that the
    streams do not vouch for already (path probability below the threshold)."""
    return np.flatnonzero((tree.path_probs < threshold) & (tree.parents >= 0)).astype(np.int64)


def prune(tree: Tree, scored: np.ndarray, exit_probs: np.ndarray, threshold: float) -> np.ndarray:
    """Parallel tree pruning: the nodes [K] that survive, ascending.

    A draft node survives when its parent does and either the streams' path probability
    (`Tree.path_probs`) or the early-exit probability of its token under its parent
    (exit_probs [len(scored)], computed after the lower layers for the `scored` nodes)
    reaches the threshold. The exit head alone agrees with the main stream too rarely
    on a small model (46% on SmolLM2), so it vouches for nodes besides the streams
    rather than instead of them (README: tree pruning, for the measurements).
    """
    score = tree.path_probs.astype(np.float64)
    score[scored] = np.maximum(score[scored], exit_probs)
    keep = np.ones(tree.size, dtype=bool)
    for node in range(1, tree.size):  # parents come first
        keep[node] = keep[tree.parents[node]] and score[node] >= threshold
    return np.flatnonzero(keep).astype(np.int64)


def lookup_draft(history: Sequence[int], length: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Prompt lookup: the `length` tokens that followed the most recent earlier
    occurrence of the longest suffix n-gram of `history` (max_ngram down to min_ngram),
    or [] when none occurs. `history` is the prompt plus everything committed so far,
    ending with the root token, so the result continues the root."""
    if length < 1:
        return []
    tokens = np.asarray(history, dtype=np.int64)
    n = len(tokens)
    for size in range(min(max_ngram, n - 1), min_ngram - 1, -1):
        suffix = tokens[n - size:]
        # Windows starting at 0 .. n - size - 1 (the suffix itself is excluded); latest first.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:n - 1], size)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + size
            return tokens[start:start + length].tolist()
    return []


def add_branch(tree: Tree, tokens: Sequence[int], source: int = LOOKUP) -> Tree:
    """`tree` with the chain `tokens` under its root, merged where a path already holds
    the same tokens (those nodes keep their source); new nodes are appended, so
    ancestors still come before descendants."""
    children: dict[tuple[int, int], int] = {}
    for node in range(1, tree.size):
        children[(int(tree.parents[node]), int(tree.tokens[node]))] = node
    new_tokens, parents, depths = [], [], []
    node, next_index = 0, tree.size
    for depth, token in enumerate(tokens, start=1):  # the chain descends one level per token
        token = int(token)
        child = children.get((node, token))
        if child is None:
            child = next_index
            next_index += 1
            children[(node, token)] = child
            new_tokens.append(token)
            parents.append(node)
            depths.append(depth)
        node = child
    if not new_tokens:
        return tree
    sources = tree.sources if tree.sources is not None else np.full(tree.size, STREAM, dtype=np.int8)
    return Tree(np.concatenate([tree.tokens, np.array(new_tokens, dtype=np.int64)]),
                np.concatenate([tree.parents, np.array(parents, dtype=np.int32)]),
                np.concatenate([tree.depths, np.array(depths, dtype=np.int32)]),
                np.concatenate([tree.path_probs, np.zeros(len(new_tokens), dtype=np.float32)]),
                np.concatenate([sources, np.full(len(new_tokens), source, dtype=np.int8)]))
