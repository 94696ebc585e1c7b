"""Small edits of an ONNX graph (a GraphProto) that the rewrites share: what a graph
reads, and dropping what nothing reads any more."""

from __future__ import annotations


def used_names(graph) -> set[str]:
    """Every value name read by a node of `graph` or of its subgraphs (which may read
    outer values)."""
    used = set()
    for node in graph.node:
        used.update(node.input)
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                used |= used_names(sub)
    return used


def drop_unused_initializers(graph) -> None:
    """Remove the initializers and Constant nodes whose value nothing reads and that are
    no graph output."""
    used = used_names(graph) | {v.name for v in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) != len(graph.initializer):
        graph.ClearField("initializer")
        graph.initializer.extend(kept)
    nodes = [n for n in graph.node if n.op_type != "Constant" or n.output[0] in used]
    if len(nodes) != len(graph.node):
        graph.ClearField("node")
        graph.node.extend(nodes)


def drop_dead_nodes(graph) -> None:
    """Remove the nodes none of whose outputs is read or a graph output (repeatedly, so
    whole dead chains go), then the initializers only they read."""
    outputs = {v.name for v in graph.output}
    while True:
        used = used_names(graph) | outputs
        alive = [node for node in graph.node if any(out and out in used for out in node.output)]
        if len(alive) == len(graph.node):
            break
        graph.ClearField("node")
        graph.node.extend(alive)
    drop_unused_initializers(graph)


def drop_unused_inputs(graph) -> None:
    """Remove the graph inputs that nothing reads (e.g. tree_parent, which only the custom
    backend reads, or the positions of a graph whose attention rotates by itself)."""
    used = used_names(graph)
    for value in list(graph.input):
        if value.name not in used:
            graph.input.remove(value)
