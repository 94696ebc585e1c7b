"""Draft trees: building them from stream predictions, and walking them to accept tokens.

Plain numpy, shared by the PyTorch reference decoder and the ONNX Runtime engine.

A tree holds N nodes, flattened so that ancestors come before descendants:
  node 0       the root: the correction token of the previous step (already decided,
               not yet in the KV cache)
  node i > 0   a drafted token; depth d means "d tokens after the root"
Its rows in a step sit at positions past + depth.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass
class Tree:
    tokens: np.ndarray  # [N] int64
    parents: np.ndarray  # [N] int32, -1 for the root
    depths: np.ndarray  # [N] int32
    path_probs: np.ndarray  # [N] float32: product of stream probabilities from the root

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
