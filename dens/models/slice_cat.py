"""A compiler pass that writes a sum of zero-padded slices as one concatenation (``torch.compile``, inductor).

A tensor cut into blocks and concatenated (the tensor-product paths of one output irrep, the blocks of a
split) is, differentiated twice, a *sum of slices scattered into zeros*: the backward of ``cat`` slices
the gradient, and the backward of each slice pads it back with zeros (``slice_backward``, decomposed into
``slice_scatter(zeros, block, dim, start, end)``), so the second-order gradient of a gradient-force model
adds, per concatenation, one zero-padded copy per block. When the blocks tile the dimension, that sum is
their concatenation. Inductor fuses the sum into one kernel that evaluates, for every vector of the output,
a mask and a masked load per block (six blocks in ``[E, 3, 96]`` of the MD17 Equiformer); written as
``cat``, each block is copied once into its part of the output.

:class:`PaddedSlicesAsCat` runs on the joint graph (forward and backward before they are split, where the
zeros are still visible; after the split they can be a saved input of the backward) and replaces every such
sum on the CPU (``add`` nodes whose leaves include ``slice_scatter`` of a zero ``full`` with step 1, the
slices disjoint and covering the whole static dimension) by ``cat`` of the blocks plus the sum's other
terms. Each output element is the same block value plus the same other terms (the rest of the sum adds
exact zeros), so results are unchanged. Sums with gaps, overlaps, strides, symbolic bounds or broadcasting
are left alone, as are GPU graphs (not measured there).
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["PaddedSlicesAsCat"]

_aten = torch.ops.aten


class PaddedSlicesAsCat(CustomGraphPass):
    """Joint-graph pass: a sum of zero-padded slices that tile a dimension becomes ``cat`` (module docstring).

    Examples
    --------
    >>> import torch
    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> def padded_sum(a, b):
    ...     zeros = torch.full((4, 5), 0.0)
    ...     return zeros.slice_scatter(a, 1, 0, 2) + zeros.slice_scatter(b, 1, 2, 5)
    >>> graph = make_fx(padded_sum, tracing_mode="fake")(torch.ones(4, 2), torch.ones(4, 3))
    >>> PaddedSlicesAsCat()(graph.graph)
    1
    >>> [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    ['aten.cat.default']
    """

    def uuid(self) -> str:
        """Inductor's cache key for this pass: its code."""
        helpers = (_is_add, _single_user, _add_tree, _zero_padded_block, _same_sizes, _is_zero_full)
        code = "".join(inspect.getsource(f) for f in (PaddedSlicesAsCat, *helpers))
        return hashlib.sha256(code.encode()).hexdigest()

    def __call__(self, graph: torch.fx.Graph) -> int:
        """Rewrite ``graph`` in place; returns the number of sums replaced."""
        replaced = 0
        for root in list(graph.nodes):
            if not _is_add(root) or any(_is_add(user) and _single_user(root) for user in root.users):
                continue  # not the root of an add tree
            value = root.meta.get("val")
            if not isinstance(value, torch.Tensor) or value.device.type != "cpu":
                continue
            terms, inner = _add_tree(root)
            blocks = [(b, t) for t in terms if (b := _zero_padded_block(t, value)) is not None]
            if len(blocks) < 2 or len({dim for (dim, _, _, _), _ in blocks}) != 1:
                continue
            dim = blocks[0][0][0]
            blocks.sort(key=lambda item: item[0][1])
            bounds = [(start, end) for (_, start, end, _), _ in blocks]
            # each block non-empty and starting where the one before ends, from 0 to the dimension's size
            ends = [0, *(end for _, end in bounds)]
            if ends[-1] != value.shape[dim] or any(
                start != before or start >= end for (start, end), before in zip(bounds, ends, strict=False)
            ):
                continue  # a gap, an overlap or not the whole dimension
            padded = [term for _, term in blocks]
            rest = [term for term in terms if term not in padded]
            with graph.inserting_before(root):
                out = graph.call_function(_aten.cat.default, ([src for (*_, src), _ in blocks], dim))
                out.meta["val"] = torch.cat([src.meta["val"] for (*_, src), _ in blocks], dim)
                for term in rest:
                    out = graph.call_function(_aten.add.Tensor, (out, term))
                    out.meta["val"] = value
            root.replace_all_uses_with(out)
            for node in [root, *inner, *padded]:  # the tree top down, then the scatters and their zeros
                if not node.users:
                    base = node.args[0] if node in padded else None
                    graph.erase_node(node)
                    if isinstance(base, torch.fx.Node) and not base.users:
                        graph.erase_node(base)
            replaced += 1
        return replaced


def _is_add(node: Any) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.target is _aten.add.Tensor
        and not node.kwargs  # no alpha
        and all(isinstance(a, torch.fx.Node) for a in node.args)
    )


def _single_user(node: torch.fx.Node) -> bool:
    return len(node.users) == 1


def _add_tree(root: torch.fx.Node) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """The terms of the sum at ``root`` and its inner ``add`` nodes (used by the sum only), top down."""
    terms: list[torch.fx.Node] = []
    inner: list[torch.fx.Node] = []
    stack = list(root.args)
    while stack:
        node = stack.pop(0)
        if _is_add(node) and _single_user(node):
            inner.append(node)
            stack.extend(node.args)
        else:
            terms.append(node)
    return terms, inner


def _zero_padded_block(node: torch.fx.Node, value: torch.Tensor) -> tuple[int, int, int, Any] | None:
    """``(dim, start, end, block)`` when ``node`` is ``slice_scatter(zeros, block, dim, start, end)`` of
    ``value``'s shape and dtype with static bounds and step 1, else None."""
    if node.target is not _aten.slice_scatter.default or not isinstance(node.meta.get("val"), torch.Tensor):
        return None
    names = ("input", "src", "dim", "start", "end", "step")
    defaults = {"dim": 0, "start": None, "end": None, "step": 1}
    args = {**defaults, **dict(zip(names, node.args, strict=False)), **node.kwargs}
    out, src = node.meta["val"], args["src"]
    if (
        not _same_sizes(out.shape, value.shape)
        or out.dtype != value.dtype
        or not _is_zero_full(args["input"])
    ):
        return None
    dim, size = args["dim"] % out.dim(), out.shape[args["dim"]]
    start, end = args["start"], args["end"]
    start = 0 if start is None else start
    end = size if end is None else end
    if not all(isinstance(v, int) for v in (size, start, end)) or args["step"] != 1:
        return None
    start, end = (v + size if v < 0 else v for v in (start, end))
    start, end = max(0, min(start, size)), max(0, min(end, size))
    block = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
    if (
        block is None
        or block.dim() != out.dim()
        or not statically_known_true(block.shape[dim] == end - start)
    ):
        return None
    others = [d for d in range(out.dim()) if d != dim]
    if not _same_sizes([block.shape[d] for d in others], [out.shape[d] for d in others]):
        return None
    return dim, start, end, src


def _same_sizes(a: Any, b: Any) -> bool:
    """Sizes known equal without a guard (symbolic sizes compared by their expressions, not their hints)."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b, strict=True))


def _is_zero_full(node: Any) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.target is _aten.full.default
        and len(node.args) > 1
        and node.args[1] == 0
    )
