"""A compiler pass that computes narrow matrix products transposed (``torch.compile``, inductor backend).

The equivariant models multiply many matrices whose output has few columns: ``[E (2l+1), 88] @ [88, 8]``
in a linear map of ``l = 2`` features, or, per edge, ``[20, 16] @ [16, 3]`` in the gradient of a
tensor-product coupling. BLAS kernels vectorise along the output's columns, and with 3-8 of them they run
at a fraction of their speed; the same product transposed, ``C^T = B^T A^T``, has the long dimension
there. On an AMD EPYC (MKL 2024.2, one thread) the transposed form took 0.24-0.6x the time for the
products of the reduced MD17 Equiformer (``[2880, 88] @ [88, 8]``: 383 -> 90 us; per-edge
``[20, 16] @ [16, 3]`` x 576: 248 -> 80-155 us), and 1-1.2x for outputs of 16 or more columns, which are
left alone.

:class:`NarrowGemmLayout` rewrites, in the CPU graphs inductor compiles (forward, backward, and the
gradients inside them, after autograd), every ``mm``, ``bmm`` and ``addmm`` whose output has at most
``max_columns`` static columns and more rows than columns into the transposed product and a copy of its
transposed result in the original layout. The copy (small: the output is narrow) keeps the strides that the
rest of the graph was traced with, views of the product and tensors saved for the backward included;
inductor fuses it into the consumers where it can. The arithmetic is the same products and sums: results
agree to rounding. GPU graphs are left as they are (not measured there).
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .slice_cat import PaddedSlicesAsCat

__all__ = ["NarrowGemmLayout", "inductor_options"]

_aten = torch.ops.aten


def _static(size: Any) -> int | None:
    return size if isinstance(size, int) else None


class NarrowGemmLayout(CustomGraphPass):
    """Post-grad pass: ``A @ B`` with a narrow output becomes ``(B^T @ A^T)^T`` (see the module docstring).

    Parameters
    ----------
    max_columns : int
        Rewrite products whose output has at most this many columns (8), when it has more rows.
    """

    def __init__(self, max_columns: int = 8) -> None:
        self.max_columns = max_columns

    def uuid(self) -> str:
        """Inductor's cache key for this pass: its code and threshold (not the rest of this file)."""
        code = "".join(inspect.getsource(f) for f in (NarrowGemmLayout, _transposed, _static))
        return hashlib.sha256(f"{code}{self.max_columns}".encode()).hexdigest()

    def _narrow(self, rows: Any, columns: Any) -> bool:
        columns = _static(columns)
        if columns is None or columns > self.max_columns:
            return False
        rows = _static(rows)
        return rows is None or rows > columns  # a symbolic row count is the number of edges or atoms

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op != "call_function" or node.kwargs:
                continue
            if node.target is _aten.bmm.default:
                a, b = node.args
                rows, columns, dims = a.meta["val"].shape[1], b.meta["val"].shape[2], [0, 2, 1]
            elif node.target is _aten.mm.default:
                a, b = node.args
                rows, columns, dims = a.meta["val"].shape[0], b.meta["val"].shape[1], [1, 0]
            elif node.target is _aten.addmm.default:
                bias, a, b = node.args
                if bias.meta["val"].dim() != 2:  # a broadcast bias would need its own view
                    continue
                rows, columns, dims = a.meta["val"].shape[0], b.meta["val"].shape[1], [1, 0]
            else:
                continue
            if node.meta["val"].device.type != "cpu" or not self._narrow(rows, columns):
                continue  # measured on CPUs (MKL) only: GPU products are left to their own libraries
            with graph.inserting_before(node):
                args = [_transposed(graph, arg, dims) for arg in node.args]
                if node.target is _aten.addmm.default:
                    args = [args[0], args[2], args[1]]
                else:
                    args = [args[1], args[0]]
                product = graph.call_function(node.target, tuple(args))
                product.meta["val"] = node.target(*(arg.meta["val"] for arg in args))
                # back in the original layout (a copy inductor fuses into the consumers where it can):
                # views of the product and tensors saved for the backward keep the strides they were
                # traced with
                out = graph.call_function(
                    _aten.clone.default,
                    (_transposed(graph, product, dims),),
                    {"memory_format": torch.contiguous_format},
                )
                out.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(out)
            graph.erase_node(node)


def _transposed(graph: torch.fx.Graph, node: torch.fx.Node, dims: list[int]) -> torch.fx.Node:
    view = graph.call_function(_aten.permute.default, (node, dims))
    view.meta["val"] = node.meta["val"].permute(dims)
    return view


def inductor_options(options: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile`` keyword arguments: ``options`` over dens's defaults.

    The defaults are ``dynamic=True`` and, for the inductor backend, dens's two graph passes:
    :class:`NarrowGemmLayout` after autograd (``post_grad_custom_post_pass``) and
    :class:`~dens.models.slice_cat.PaddedSlicesAsCat` on the joint graph (``joint_custom_post_pass``);
    inductor settings in ``options["options"]`` (an empty dict: none) are added to (or replace) them. With
    a ``mode``, which ``torch.compile`` does not take together with ``options``, no pass is added.

    Raises
    ------
    ValueError
        For inductor settings with another backend (``torch.compile`` would ignore them).

    Examples
    --------
    >>> sorted(inductor_options({"options": {"cpp_wrapper": True}})["options"])
    ['cpp_wrapper', 'joint_custom_post_pass', 'post_grad_custom_post_pass']
    >>> inductor_options({"backend": "aot_eager", "options": {}})
    {'dynamic': True, 'backend': 'aot_eager'}
    """
    merged = {"dynamic": True, **options}
    extra = merged.pop("options", None) or {}  # an empty dict is no setting (and no warning below)
    backend = merged.get("backend", "inductor")
    if backend != "inductor" and extra:  # torch.compile would ignore them with a warning
        raise ValueError(f"compile options {extra} are inductor settings; backend {backend!r} takes none")
    if backend == "inductor" and "mode" not in merged:
        extra = {
            "post_grad_custom_post_pass": NarrowGemmLayout(),
            "joint_custom_post_pass": PaddedSlicesAsCat(),
            **extra,
        }
    if extra:
        merged["options"] = extra
    return merged
