"""The e3nn irreps layers of Equiformer (flat ``[N, irreps.dim]`` features, e3nn's real basis).

Linear maps per irrep, the depth-wise tensor product (weights stored flat in the official order), the
radial profile and ExpNormal smearing, the irreps layer norm, the gate and the irreps dropout, plus the
initialisation helpers they share. :mod:`dens.models.equiformer` builds the model from them; parameter
names and shapes are the official ones, so official weights import by renaming.
"""

from __future__ import annotations

import functools
import math

import torch
from e3nn import o3
from e3nn.math import normalize2mom
from torch import Tensor, nn

from .layers import smooth_leaky_relu

__all__ = [
    "DepthwiseTensorProduct",
    "ExpNormalSmearing",
    "Gate",
    "IrrepsDropout",
    "IrrepsLayerNorm",
    "IrrepsLinear",
    "RadialProfile",
    "is_scalar",
    "second_moment_constant",
    "sort_even_first",
]


@functools.cache
def second_moment_constant(name: str) -> float:
    """e3nn's ``normalize2mom`` constant: ``c`` with ``E[(c f(z))^2] = 1`` for ``z ~ N(0, 1)``.

    The official model wraps every activation (SiLU, sigmoid gates, SmoothLeakyReLU) this way.
    """
    fn = {
        "silu": torch.nn.functional.silu,
        "sigmoid": torch.sigmoid,
        "smooth_leaky_relu": smooth_leaky_relu,
    }[name]
    return float(normalize2mom(fn).cst)


def is_scalar(ir: o3.Irrep) -> bool:
    return ir.l == 0 and ir.p == 1


def sort_even_first(irreps: o3.Irreps) -> tuple[o3.Irreps, list[int]]:
    """Sort irreps by degree, even parity first, keeping the original order otherwise.

    Returns the sorted irreps and, for each original entry, its position after sorting.
    """
    order = sorted(range(len(irreps)), key=lambda i: (irreps[i].ir.l, -irreps[i].ir.p, i))
    position = [0] * len(irreps)
    for new, old in enumerate(order):
        position[old] = new
    return o3.Irreps([irreps[i] for i in order]), position


def _draw_(weight: Tensor, fan_in: int, weight_init: str) -> None:
    """Official normal init ``N(0, 1/fan_in)``, or ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        if weight_init == "normal":
            weight.normal_(0.0, bound)
        elif weight_init == "uniform":
            weight.uniform_(-bound, bound)
        else:
            raise ValueError(f"weight_init must be 'normal' or 'uniform', got {weight_init!r}")


class IrrepsLinear(nn.Module):
    """Equivariant linear map between irreps (official ``LinearRS``): one matrix per pair of equal irreps.

    Parameters
    ----------
    irreps_in, irreps_out : str or e3nn Irreps
    bias : bool
        Learnable bias on the even scalar outputs.

    Notes
    -----
    ``weight`` is flat: for each input block (outer) and each output block of the same irrep (inner) a
    ``[mul_in, mul_out]`` matrix, row-major; this is e3nn's weight order for the official
    ``TensorProduct(irreps_in, '1x0e', irreps_out, 'uvw')`` with a constant second input, whose path
    coefficients are exactly one. Output blocks no input reaches are zero.

    Examples
    --------
    >>> lin = IrrepsLinear("4x0e+2x1e", "3x0e+1x1e+1x2e")
    >>> lin.weight.numel(), lin(torch.randn(5, 10)).shape
    (14, torch.Size([5, 11]))
    """

    def __init__(self, irreps_in: str | o3.Irreps, irreps_out: str | o3.Irreps, bias: bool = True) -> None:
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        # (mul, 2l+1) per block as plain ints: forward never touches e3nn objects (torch.compile guards)
        self.in_blocks = tuple((mul, ir.dim) for mul, ir in self.irreps_in)
        self.out_blocks = tuple((mul, ir.dim) for mul, ir in self.irreps_out)
        self.in_irreps = tuple((ir.l, ir.p) for _, ir in self.irreps_in)
        self.paths: list[tuple[int, int, slice]] = []
        offset = 0
        for i, (mul_in, ir_in) in enumerate(self.irreps_in):
            for o, (mul_out, ir_out) in enumerate(self.irreps_out):
                if ir_in == ir_out:
                    self.paths.append((i, o, slice(offset, offset + mul_in * mul_out)))
                    offset += mul_in * mul_out
        # per input block, its (path, output block) pairs
        self.block_paths = tuple(
            tuple((k, o) for k, (i, o, _) in enumerate(self.paths) if i == block)
            for block in range(len(self.in_blocks))
        )
        self.weight = nn.Parameter(torch.empty(offset))
        # biases on the even-scalar outputs, in order (official: one per block of the merged irreps, which
        # holds the same channels as the unmerged blocks, in the same order)
        self.bias_blocks = tuple(o for o, (_, ir) in enumerate(self.irreps_out) if is_scalar(ir))
        num_bias = sum(self.out_blocks[o][0] for o in self.bias_blocks)
        self.bias = nn.Parameter(torch.zeros(num_bias)) if bias and num_bias else None
        self.reset_parameters()

    def fan_in(self, out_block: int) -> int:
        return sum(self.irreps_in[i].mul for i, o, _ in self.paths if o == out_block)

    def reset_parameters(self, weight_init: str = "normal") -> None:
        for _, o, sl in self.paths:
            _draw_(self.weight[sl], self.fan_in(o), weight_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _input_pieces(self, x: Tensor | list[Tensor]) -> list[tuple[list[tuple[int, int, int]], Tensor]]:
        """The pieces of the input, each with the ``(block, first, channels)`` it spans.

        A piece is ``[n, mul, 2l+1]`` for a list input, or the ``[n, mul (2l+1)]`` columns of one block for a
        tensor input.

        A list input holds consecutive pieces: several may make up one block of ``irreps_in``, and one may
        span several consecutive blocks of the same irrep (e.g. a grouped output block of
        :class:`DepthwiseTensorProduct` into an unmerged ``irreps_in``). Passing pieces instead of one
        concatenated tensor saves a concatenation, whose double backward (gradient forces) costs a
        full-size buffer per piece.
        """
        if isinstance(x, Tensor):
            xs = x.split([mul * dim for mul, dim in self.in_blocks], dim=1)
            return [
                ([(i, 0, mul)], xi) for i, (xi, (mul, _)) in enumerate(zip(xs, self.in_blocks, strict=True))
            ]
        pieces, block, used = [], 0, 0
        for piece in x:
            spans: list[tuple[int, int, int]] = []
            left = piece.shape[1]
            while left > 0 or not spans:
                if (
                    block >= len(self.in_blocks)
                    or piece.shape[2] != self.in_blocks[block][1]
                    or (spans and self.in_irreps[block] != self.in_irreps[spans[0][0]])
                ):
                    raise ValueError(f"input pieces do not match {self.irreps_in}")
                take = min(left, self.in_blocks[block][0] - used)
                spans.append((block, used, take))
                used, left = used + take, left - take
                if used == self.in_blocks[block][0]:
                    block, used = block + 1, 0
            pieces.append((spans, piece))
        if block != len(self.in_blocks):
            raise ValueError(f"input pieces do not cover {self.irreps_in}")
        return pieces

    def forward(self, x: Tensor | list[Tensor], scales: list[Tensor] | None = None) -> Tensor:
        """``x``: ``[n, irreps_in.dim]``, or a list of consecutive ``[n, mul, 2l+1]`` pieces of it.

        ``scales``: with a list input, a ``[mul]`` factor per channel of each piece, applied to the weight
        rows (see :meth:`DepthwiseTensorProduct.unweighted_blocks`).

        Each piece takes one matrix product per output block it reaches: its weight rows are gathered from
        the paths of the input blocks it spans (parameters only, small), and the products of the pieces
        accumulate in place (``addmm``), starting from the bias where there is one.
        """
        pieces = self._input_pieces(x)
        if scales is not None and len(scales) != len(pieces):
            raise ValueError(f"{len(scales)} scales for {len(pieces)} input pieces")
        n, flat = pieces[0][1].shape[0], isinstance(x, Tensor)
        # split the weight once: a slice per path would cost a full-size zero gradient each in backward
        ws = self.weight.split([sl.stop - sl.start for _, _, sl in self.paths])
        bias: list[Tensor | None] = [None] * len(self.out_blocks)
        if self.bias is not None:
            split = self.bias.split([self.out_blocks[o][0] for o in self.bias_blocks])
            for o, b in zip(self.bias_blocks, split, strict=True):
                bias[o] = b
        # accumulated component-major, [n (2l+1), mul_out]: a piece that is a transposed view of a contiguous
        # [n, 2l+1, mul_in] tensor (DepthwiseTensorProduct's blocks) is then a plain matrix product, no copy
        blocks: list[Tensor | None] = [None] * len(self.out_blocks)
        for index, (spans, piece) in enumerate(pieces):
            # all spanned blocks hold the same irrep, hence reach the same output blocks
            targets = self.block_paths[spans[0][0]]
            if not targets:
                continue
            # [n (2l+1), mul_in]: a view for scalars and component-major pieces, a copy otherwise
            dim = self.in_blocks[spans[0][0]][1]
            mul_in = sum(count for *_, count in spans)
            if dim == 1:
                matrix = piece if flat else piece.squeeze(2)
            else:
                piece = piece.view(n, mul_in, dim) if flat else piece
                matrix = piece.transpose(1, 2).reshape(n * dim, mul_in)
            for t, (_, o) in enumerate(targets):
                mul_out = self.out_blocks[o][0]
                rows = [
                    self._rows(
                        ws[self.block_paths[i][t][0]].view(self.in_blocks[i][0], mul_out), first, count
                    )
                    for i, first, count in spans
                ]
                w = rows[0] if len(rows) == 1 else torch.cat(rows)
                if scales is not None:
                    w = scales[index].unsqueeze(1) * w
                # accumulate inside the product (addmm): no separate pass to add the pieces or the bias
                acc = blocks[o] if blocks[o] is not None else bias[o]
                blocks[o] = matrix @ w if acc is None else torch.addmm(acc, matrix, w)
        parts = []
        for b, c, (mul, dim) in zip(blocks, bias, self.out_blocks, strict=True):
            if b is None:  # no input reaches this block
                b = self.weight.new_zeros(n, mul * dim) if c is None else c.repeat(n, 1)
            elif dim > 1:  # mul-major
                b = b.view(n, dim, mul).transpose(1, 2).reshape(n, mul * dim)
            parts.append(b)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    @staticmethod
    def _rows(w: Tensor, first: int, count: int) -> Tensor:
        """Rows ``first:first + count`` of ``w``; all of it unsliced (a slice costs an op and a zero gradient)."""
        return w if first == 0 and count == w.shape[0] else w[first : first + count]

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}, bias={self.bias is not None}"


class DepthwiseTensorProduct(nn.Module):
    """Channel-wise tensor product of node (or edge) features with edge spherical harmonics ('uvu').

    Every input block ``mul x l1`` is combined with every harmonic ``l2`` into each ``l3`` that
    ``irreps_filter`` contains (plus odd scalars, as in the official code); every channel keeps its own
    weight, shared over edges (``internal_weights``) or given per edge (from a radial MLP). The output
    blocks are sorted by degree, even parity first, and not merged (official ``DepthwiseTensorProduct``);
    the paths into one irrep, consecutive there, are computed as one group (``as_blocks``: one block per
    irrep of ``irreps_out.simplify()``).

    The path coefficient is ``sqrt(2 l3 + 1) * wigner_3j(l1, l2, l3)`` (e3nn 'component' normalisation, no
    path normalisation), with e3nn's ``wigner_3j`` in double precision (buffers ``cg_{l1}_{l2}_{l3}``,
    not saved; :meth:`set_coupling` replaces one, e.g. by an official checkpoint's own tensor).

    Parameters
    ----------
    irreps_in, irreps_sh, irreps_filter : str or e3nn Irreps
    internal_weights : bool
        Learn one weight per path and channel, shared by all edges; otherwise ``forward`` takes
        ``weight [E, weight_numel]``.

    Examples
    --------
    >>> tp = DepthwiseTensorProduct("4x0e+2x1e", "1x0e+1x1e", "1x0e+1x1e", internal_weights=True)
    >>> tp.irreps_out, tp.weight_numel
    (4x0e+2x0e+4x1e+2x1e+2x1e, 14)
    """

    def __init__(
        self,
        irreps_in: str | o3.Irreps,
        irreps_sh: str | o3.Irreps,
        irreps_filter: str | o3.Irreps,
        internal_weights: bool = False,
    ) -> None:
        super().__init__()
        self.irreps_in, self.irreps_sh = o3.Irreps(irreps_in), o3.Irreps(irreps_sh)
        self.in_blocks = tuple((mul, ir.dim) for mul, ir in self.irreps_in)  # plain ints for forward
        irreps_filter = o3.Irreps(irreps_filter)
        raw: list[tuple[int, int, int, o3.Irrep]] = []
        for i, (mul, ir_in) in enumerate(self.irreps_in):
            for j, (_, ir_sh) in enumerate(self.irreps_sh):
                for ir_out in ir_in * ir_sh:
                    if ir_out in irreps_filter or ir_out == o3.Irrep(0, -1):
                        raw.append((i, j, mul, ir_out))
        self.irreps_out, position = sort_even_first(o3.Irreps([(mul, ir) for _, _, mul, ir in raw]))
        # paths in weight order: (input block, harmonic block, output position, (l1, l2, l3), weight slice)
        self.paths: list[tuple[int, int, int, tuple[int, int, int], slice]] = []
        offset = 0
        for k, (i, j, mul, ir_out) in enumerate(raw):
            ls = (self.irreps_in[i].ir.l, self.irreps_sh[j].ir.l, ir_out.l)
            self.paths.append((i, j, position[k], ls, slice(offset, offset + mul)))
            offset += mul
        self.weight_numel = offset
        # output groups: the positions of the paths into one irrep, consecutive after sorting (the blocks
        # of irreps_out.simplify()); and the weight columns in group order
        self.groups: list[list[int]] = []
        for position, (_, ir) in enumerate(self.irreps_out):
            if position and ir == self.irreps_out[position - 1].ir:
                self.groups[-1].append(position)
            else:
                self.groups.append([position])
        slice_at = {position: sl for _, _, position, _, sl in self.paths}
        order = [
            c for group in self.groups for p in group for c in range(slice_at[p].start, slice_at[p].stop)
        ]
        self.group_numels = [sum(self.irreps_out[p].mul for p in group) for group in self.groups]
        self.register_buffer(
            "weight_order",
            torch.tensor(order, dtype=torch.long) if order != list(range(offset)) else None,
            persistent=False,
        )
        for ls in sorted({p[3] for p in self.paths}):
            self.register_buffer(self._cg_name(ls), o3.wigner_3j(*ls, dtype=torch.float64), persistent=False)
        # Per input block, all its paths at once: y = (sum_s Y_s(r) C_i[s]) @ x_i -> [E, K_i, mul], with the
        # paths' output components side by side (K_i, component-major: see `forward`).
        self.block_paths = [
            [k for k, p in enumerate(self.paths) if p[0] == i] for i in range(len(self.irreps_in))
        ]
        self._stack_couplings()
        self.weight = nn.Parameter(torch.empty(offset)) if internal_weights else None
        self.reset_parameters()

    def _stack_couplings(self) -> None:
        """``stack_{i} [irreps_sh.dim, K_i, 2l1+1]``: the path coefficients of input block ``i``."""
        sh_start = [sl.start for sl in self.irreps_sh.slices()]
        for i, paths in enumerate(self.block_paths):
            d1 = self.irreps_in[i].ir.dim
            dims = [2 * self.paths[k][3][2] + 1 for k in paths]
            stack = torch.zeros(self.irreps_sh.dim, sum(dims), d1, dtype=torch.float64)
            column = 0
            for k, d3 in zip(paths, dims, strict=True):
                _, j, _, ls, _ = self.paths[k]
                cg = self.coupling(ls).to(torch.float64).permute(1, 2, 0) * math.sqrt(
                    d3
                )  # [2l2+1, 2l3+1, 2l1+1]
                stack[sh_start[j] : sh_start[j] + cg.shape[0], column : column + d3] = cg
                column += d3
            old = getattr(self, f"stack_{i}", None)
            self.register_buffer(f"stack_{i}", stack if old is None else stack.to(old), persistent=False)

    @staticmethod
    def _cg_name(ls: tuple[int, int, int]) -> str:
        return "cg_{}_{}_{}".format(*ls)

    def coupling(self, ls: tuple[int, int, int]) -> Tensor:
        """The ``wigner_3j(l1, l2, l3)`` tensor this module uses."""
        return getattr(self, self._cg_name(ls))

    def set_coupling(self, ls: tuple[int, int, int], w3j: Tensor) -> None:
        """Use ``w3j`` for the paths ``(l1, l2, l3)``; it must equal e3nn's ``wigner_3j`` to 1e-5."""
        current = self.coupling(ls)
        if w3j.shape != current.shape or not torch.allclose(w3j.to(current), current, atol=1e-5, rtol=0):
            raise ValueError(f"coupling {ls} differs from e3nn's wigner_3j{ls} by more than 1e-5")
        setattr(self, self._cg_name(ls), w3j.to(current))
        self._stack_couplings()

    def reset_parameters(self, weight_init: str = "normal") -> None:
        if self.weight is not None:
            _draw_(self.weight, 1, weight_init)  # every output block has a single path of fan-in 1

    def forward(
        self,
        x: Tensor,
        sh: Tensor,
        weight: Tensor | None = None,
        as_blocks: bool = False,
        grouped_weight: bool = False,
    ) -> Tensor | list[Tensor]:
        """``x [E, irreps_in.dim]``, ``sh [E, irreps_sh.dim]``, ``weight [E, weight_numel]`` (external).

        With ``grouped_weight``, ``weight``'s columns are already in group order, ``weight[:, weight_order]``
        (what ``RadialProfile(x, order=tp.weight_order)`` returns), which saves reordering every edge's row.

        ``x`` may also have a single row, shared by all edges (e.g. a constant input).
        Returns ``[E, irreps_out.dim]``, or with ``as_blocks`` one ``[E, mul, 2l+1]`` block per block of
        ``irreps_out.simplify()`` (for :class:`IrrepsLinear`, saving a concatenation).

        Notes
        -----
        The paths into one irrep are consecutive in ``irreps_out`` and computed as one group: their blocks
        side by side, component-major, ``[E, 2l+1, mul]`` contiguous, times the group's weights in one
        product, and returned as a transposed view. Flattened mul-major, a group is the concatenation of its
        paths' blocks, so the flat output is that of the unmerged ``irreps_out``. :class:`IrrepsLinear`
        multiplies the groups as ``[E (2l+1), mul]`` matrices without copying, and the per-edge, per-channel
        weight multiplies each group directly (no weight expanded to every component). Grouping costs one
        copy (the concatenation) and saves, in forward, backward and the double backward of gradient forces,
        an operation per path on the weights and in the linear map that follows.
        """
        if weight is None:
            if self.weight is None:
                raise ValueError("this tensor product takes per-edge weights: pass `weight`")
            if grouped_weight:
                raise ValueError(
                    "`grouped_weight` describes a given `weight`; the internal one is in path order"
                )
            weight = self.weight.unsqueeze(0)
        out = self._blocks(x, sh, weight, grouped_weight)
        if as_blocks:
            return out
        n = sh.shape[0]
        return torch.cat([y.reshape(n, y.shape[1] * y.shape[2]) for y in out], dim=1)

    def unweighted_blocks(self, x: Tensor, sh: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The grouped output blocks before the internal weights, and those weights (``[mul]`` per group).

        For a linear map that follows (:class:`IrrepsLinear` with ``scales``): a weight per path and channel,
        shared by all edges, scales the linear's matrix rows instead of every edge's block, which saves a
        pass over the largest per-edge tensors in forward, backward and double backward.
        """
        if self.weight is None:
            raise ValueError("this tensor product has per-edge weights: use forward")
        return self._blocks(x, sh, None), list(self._group_weights(self.weight))

    def _group_weights(self, weight: Tensor, grouped: bool = False) -> tuple[Tensor, ...]:
        """``weight [..., weight_numel]`` split into ``[..., mul]`` per group (one reordering unless
        ``grouped``: already in group order)."""
        if self.weight_order is not None and not grouped:
            weight = weight.index_select(-1, self.weight_order)
        return weight.split(self.group_numels, dim=-1)

    def _blocks(self, x: Tensor, sh: Tensor, weight: Tensor | None, grouped: bool = False) -> list[Tensor]:
        """Grouped output blocks ``[E, mul, 2l+1]`` (transposed views), times ``weight [E or 1, weight_numel]``."""
        n = sh.shape[0]
        # split once (per-path slices would each cost a full-size zero gradient in backward)
        xs = x.split([mul * dim for mul, dim in self.in_blocks], dim=1)
        out: list[Tensor | None] = [None] * len(self.paths)  # [E, 2l3+1, mul] per output position
        for i, paths in enumerate(self.block_paths):
            if not paths:
                continue
            mul, dim = self.in_blocks[i]
            stack = getattr(self, f"stack_{i}").to(x.dtype)  # [S, K, 2l1+1]
            # explicit sizes: a graph without edges (n = 0) leaves no dimension to infer
            coupling = (sh @ stack.reshape(stack.shape[0], -1)).view(n, stack.shape[1], dim)  # [E, K, 2l1+1]
            xi = xs[i].reshape(x.shape[0], mul, dim).transpose(1, 2)  # [E or 1, 2l1+1, mul]
            dims = [2 * self.paths[k][3][2] + 1 for k in paths]
            if dim == 1:  # scalars in: each path is an outer product
                blocks = [c * xi for c in coupling.split(dims, dim=1)]
            else:
                if x.shape[0] == 1 and n != 1:  # one input for all edges: one plain matrix product
                    y = (coupling.reshape(n * stack.shape[1], dim) @ xi[0]).view(n, stack.shape[1], mul)
                else:  # a batched product of small matrices; a product per path would cost more calls
                    y = torch.bmm(coupling, xi)  # [E, K, mul]
                # split, not sliced: a slice per path would cost a full-size zero gradient each in backward
                blocks = y.split(dims, dim=1)
            for k, block in zip(paths, blocks, strict=True):
                out[self.paths[k][2]] = block
        ws = self._group_weights(weight, grouped) if weight is not None else [None] * len(self.groups)
        groups = []
        for group, w in zip(self.groups, ws, strict=True):
            parts = [out[p] for p in group]
            y = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]  # [E, 2l3+1, mul]
            if w is not None:
                y = y * w.unsqueeze(1)
            groups.append(y.transpose(1, 2))  # [E, mul, 2l3+1] view
        return groups

    def extra_repr(self) -> str:
        kind = "internal" if self.weight is not None else "external"
        return f"{self.irreps_in} x {self.irreps_sh} -> {self.irreps_out}, {kind} weights"


class RadialProfile(nn.Module):
    """Radial MLP: (Linear, LayerNorm, SiLU) per hidden layer, then a bias-free Linear plus ``offset``.

    ``net`` indices match the official ``RadialProfile`` (``net.0, net.1, net.3, net.4, net.6``).
    """

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for k in range(1, len(channels)):
            last = k == len(channels) - 1
            layers.append(nn.Linear(channels[k - 1], channels[k], bias=not last))
            if not last:
                layers += [nn.LayerNorm(channels[k]), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.offset = nn.Parameter(torch.zeros(channels[-1]))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.net:
            if isinstance(module, nn.Linear):
                module.reset_parameters()
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        bound = 1.0 / math.sqrt(self.net[-1].in_features)
        nn.init.uniform_(self.offset, -bound, bound)

    def forward(self, x: Tensor, order: Tensor | None = None) -> Tensor:
        """``x [E, channels[0]]`` -> ``[E, channels[-1]]``; with ``order``, only those output columns, in that
        order (e.g. a tensor product's :attr:`~DepthwiseTensorProduct.weight_order`).

        The columns are chosen on the last layer's weight rows, not on the per-edge output: the same values,
        without a gather of every edge's row (and its scatter in backward and the double backward).
        """
        if order is None:
            return self.net(x) + self.offset
        last = self.net[-1]
        return nn.functional.linear(self.net[:-1](x), last.weight.index_select(0, order)) + (
            self.offset.index_select(0, order)
        )


class ExpNormalSmearing(nn.Module):
    """ExpNormal radial basis (PhysNet / TorchMD-Net) with a cosine cutoff, on ``[0, cutoff]``.

    ``phi_k(d) = c(d) exp(-beta (exp(-alpha d) - mu_k)^2)`` with ``alpha = 5 / cutoff``, ``mu_k`` evenly
    spaced in ``[exp(-5), 1]``, ``beta = (2 (1 - exp(-5)) / K)^-2`` and
    ``c(d) = (cos(pi d / cutoff) + 1) / 2`` for ``d < cutoff`` (0 beyond).
    """

    def __init__(self, cutoff: float = 5.0, num_basis: int = 32) -> None:
        super().__init__()
        self.cutoff, self.alpha = cutoff, 5.0 / cutoff
        start = torch.exp(torch.tensor(-cutoff, dtype=torch.float32))
        self.register_buffer("means", torch.linspace(float(start), 1.0, num_basis))
        self.register_buffer("betas", torch.full((num_basis,), float((2 / num_basis * (1 - start)) ** -2)))

    def forward(self, dist: Tensor) -> Tensor:
        d = dist.unsqueeze(-1)
        envelope = 0.5 * (torch.cos(d * math.pi / self.cutoff) + 1.0) * (d < self.cutoff).to(d.dtype)
        return envelope * torch.exp(-self.betas * (torch.exp(-self.alpha * d) - self.means) ** 2)


class IrrepsLayerNorm(nn.Module):
    """Equivariant layer norm (official ``EquivariantLayerNormV2``), per ``mul x l`` block.

    Even scalars are centred over their channels; every block is divided by the root of the mean over
    channels and components of its squares (plus ``eps``), scaled by one weight per channel, and even
    scalars get a bias.
    """

    def __init__(self, irreps: str | o3.Irreps, eps: float = 1e-5) -> None:
        super().__init__()
        self.irreps, self.eps = o3.Irreps(irreps), eps
        self.blocks = tuple((mul, ir.dim, is_scalar(ir)) for mul, ir in self.irreps)  # plain, for forward
        self.affine_weight = nn.Parameter(torch.ones(self.irreps.num_irreps))
        self.affine_bias = nn.Parameter(torch.zeros(sum(m for m, ir in self.irreps if is_scalar(ir))))

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        blocks = x.split([mul * dim for mul, dim, _ in self.blocks], dim=1)
        # the affine parameters split once: a slice per block would cost an op and a zero gradient each
        weights = self.affine_weight.split([mul for mul, _, _ in self.blocks])
        biases = iter(self.affine_bias.split([mul for mul, _, scalar in self.blocks if scalar]))
        fields = []
        for (mul, dim, scalar), block, weight in zip(self.blocks, blocks, weights, strict=True):
            if dim == 1:  # [n, mul] as it is, no reshapes
                field = block - block.mean(dim=1, keepdim=True) if scalar else block
                scale = torch.rsqrt(field.pow(2).mean(dim=1, keepdim=True) + self.eps) * weight
                fields.append(torch.addcmul(next(biases), field, scale) if scalar else field * scale)
            else:
                field = block.reshape(n, mul, dim)
                norm = field.pow(2).mean(dim=(1, 2), keepdim=True)  # [n, 1, 1]
                scale = torch.rsqrt(norm + self.eps) * weight.unsqueeze(1)  # [n, mul, 1]
                fields.append((field * scale).reshape(n, mul * dim))
        return torch.cat(fields, dim=1)


class Gate(nn.Module):
    """Gate activation: SiLU on the scalars, and each non-scalar copy times the sigmoid of one gate scalar.

    Both activations are normalised to unit second moment (e3nn ``normalize2mom``). The input irreps are
    ``scalars + gates + gated`` (``irreps_in``); the output irreps are ``irreps`` (``scalars + gated``).
    """

    def __init__(self, irreps: str | o3.Irreps) -> None:
        super().__init__()
        irreps = o3.Irreps(irreps)
        scalars = o3.Irreps([(m, ir) for m, ir in irreps if is_scalar(ir)]).simplify()
        gated = o3.Irreps([(m, ir) for m, ir in irreps if not is_scalar(ir)]).simplify()
        self.irreps_out = scalars + gated
        self.num_scalars, self.num_gates = scalars.dim, gated.num_irreps
        self.irreps_in = (scalars + o3.Irreps(f"{self.num_gates}x0e") + gated).simplify()
        if self.num_gates == 0:
            self.irreps_in = scalars
            if scalars.dim != irreps.dim:
                raise ValueError(f"cannot gate {irreps}: odd scalars are not supported")
        self.gated_blocks = tuple((mul, ir.dim) for mul, ir in gated)  # plain ints for forward
        self.silu_cst = second_moment_constant("silu")
        self.sigmoid_cst = second_moment_constant("sigmoid")

    def forward(self, x: Tensor) -> Tensor:
        ns, ng = self.num_scalars, self.num_gates
        if ng == 0:
            return torch.nn.functional.silu(x) * self.silu_cst
        scalars, gates, gated = x.split([ns, ng, x.shape[1] - ns - ng], dim=1)
        n = x.shape[0]
        scalars = torch.nn.functional.silu(scalars) * self.silu_cst
        gates = (torch.sigmoid(gates) * self.sigmoid_cst).split([mul for mul, _ in self.gated_blocks], dim=1)
        blocks = gated.split([mul * dim for mul, dim in self.gated_blocks], dim=1)
        # copy k of the gated irreps times gate k, per block by broadcasting (an index per component and its
        # scatter in backward would cost a full-size pass each)
        parts = [
            (block.reshape(n, mul, dim) * gate.unsqueeze(-1)).reshape(n, mul * dim)
            for block, gate, (mul, dim) in zip(blocks, gates, self.gated_blocks, strict=True)
        ]
        return torch.cat([scalars, *parts], dim=1)


class IrrepsDropout(nn.Module):
    """Equivariant dropout: each irrep copy (all its components) is dropped as a whole."""

    def __init__(self, irreps: str | o3.Irreps, p: float) -> None:
        super().__init__()
        self.irreps, self.p = o3.Irreps(irreps), p
        self.num_copies = self.irreps.num_irreps
        # the irrep copy of every component
        index = [
            k
            for k, dim in enumerate(ir.dim for mul, ir in self.irreps for _ in range(mul))
            for _ in range(dim)
        ]
        self.register_buffer("copy_index", torch.tensor(index, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty(x.shape[0], self.num_copies, dtype=x.dtype, device=x.device)
        keep = keep.bernoulli_(1 - self.p) / (1 - self.p)
        return x * keep[:, self.copy_index]
