"""Feasible sets with a linear minimisation oracle (LMO), vertex enumeration and barycentric coordinates.

    S = FlooredSimplex(dim, tau, eps)    # {s >= eps, sum(s) <= tau + dim*eps}   (paper's S, tau = budget)
    S = ProbabilitySimplex(dim)          # {x >= 0, sum(x) = 1}
    S = L1Ball(dim, radius)              # {||x||_1 <= radius}
    S = Box(lower, upper)                # {lower <= x <= upper}
    S = ProductSet([S_1, ..., S_L])      # S_1 x ... x S_L, e.g. one FlooredSimplex per adapted layer
    v = S.lmo(grad)                      # a vertex v of S minimising <grad, v>

Every set is a product of *atomic blocks* (see ``_layout``): the LMO, the away-vertex search and the
weight updates of the solvers are single vectorised tensor operations over all blocks, so a ProductSet
of hundreds of layers costs one call.  Sets are immutable; truncation returns a new set.

Tie-breaking of the LMO: within a block the origin vertex (e.g. v_0 = eps*1) wins ties, then the
lowest coordinate, then plus before minus atoms.  In the paper's words: z = v_0 if all entries of the
gradient are >= 0, else eps*1 + tau e_i with i = argmin g_i.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch

from ._checks import check_dim, check_finite, check_real, check_vector
from ._layout import Layout

_INF = float("inf")


def default_atol(dtype: torch.dtype) -> float:
    """Relative feasibility tolerance used when ``atol`` is not given: 64 units in the last place."""
    return 64 * torch.finfo(dtype).eps


class FeasibleSet:
    """Base class: a product of atomic blocks (offset o_b, scale tau_b, origin vertex?, symmetric?)."""

    def _set_blocks(self, sizes, offset, scale, has_origin, symmetric, removable):
        self._sizes = [int(s) for s in sizes]
        self._offset = torch.as_tensor(offset, dtype=torch.float64).reshape(-1).clone()
        self._scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1).clone()
        self._has_origin = torch.as_tensor(has_origin, dtype=torch.bool).reshape(-1).clone()
        self._symmetric = torch.as_tensor(symmetric, dtype=torch.bool).reshape(-1).clone()
        self._removable = torch.as_tensor(removable, dtype=torch.bool).reshape(-1).clone()
        self._layouts = {}

    # ---- basic properties ----------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return sum(self._sizes)

    @property
    def n_blocks(self) -> int:
        """Number of atomic blocks (1 for the simple sets, one per coordinate for Box)."""
        return len(self._sizes)

    def layout(self, dtype=torch.float64, device="cpu") -> Layout:
        key = (dtype, torch.device(device))
        if key not in self._layouts:
            self._layouts[key] = Layout(self._sizes, self._offset, self._scale, self._has_origin,
                                        self._symmetric, dtype, torch.device(device))
        return self._layouts[key]

    def _L(self, v: torch.Tensor) -> Layout:
        return self.layout(v.dtype, v.device)

    def floor(self, dtype=torch.float64, device="cpu") -> torch.Tensor:
        """The per-coordinate floor o (eps for FlooredSimplex, lower for Box, 0 otherwise)."""
        return self.layout(dtype, device).offset.clone()

    # ---- LMO -------------------------------------------------------------------------------------
    def _fw_vertex(self, g: torch.Tensor, L: Layout, sp: Optional[torch.Tensor] = None):
        """Per block: (score min_v <g, v - o_b>, atom index, coordinate, value of v - o_b at it)."""
        if sp is None:
            sp = L.scale_c * g
        mp, ip = L.seg_min(sp)
        inf = torch.full_like(mp, _INF)
        if L.any_sym:
            mm, im = L.seg_min(torch.where(L.sym_c, -sp, _INF))
        else:
            mm, im = inf, ip
        mo = torch.where(L.has_origin, torch.zeros_like(mp), inf)
        is_origin = mo <= torch.minimum(mp, mm)
        is_plus = ~is_origin & (mp <= mm)
        is_minus = ~is_origin & ~is_plus
        score = torch.where(is_origin, mo, torch.where(is_plus, mp, mm))
        atom = torch.where(is_origin, L.a0 + L.arange_B, torch.where(is_plus, ip, L.dim + im))
        coord = torch.where(is_minus, im, ip)
        val = torch.where(is_origin, torch.zeros_like(mp), torch.where(is_plus, L.scale, -L.scale))
        return score, atom, coord, val

    def lmo(self, grad: torch.Tensor) -> torch.Tensor:
        """A vertex v in argmin_{v in S} <grad, v>, as a dense tensor like ``grad``.

        Cost O(dim): per block, compare tau_b * grad_i (plus atoms), -tau_b * grad_i (minus atoms of
        symmetric blocks) and 0 (origin vertex).
        """
        g = check_vector("grad", grad, self.dim)
        check_finite("grad", g)
        L = self._L(g)
        _, _, coord, val = self._fw_vertex(g, L)
        return L.offset + torch.zeros_like(g).scatter_(0, coord, val)

    # ---- barycentric coordinates -----------------------------------------------------------------
    def combine(self, weights: torch.Tensor) -> torch.Tensor:
        """x = sum_a weights[a] * atom_a (blockwise), i.e. o + tau_c * (w_plus - w_minus)."""
        L = self._L(weights)
        if weights.shape != (L.n_atoms,):
            raise ValueError(f"weights has shape {tuple(weights.shape)}, expected ({L.n_atoms},)")
        return L.combine(weights)

    def decompose(self, x: torch.Tensor) -> torch.Tensor:
        """Barycentric weights of a feasible x (clipped to >= 0 and renormalised per block).

        Origin blocks: w_plus = (x - o)/tau, w_origin = 1 - sum(w_plus).  Probability simplex: w = x.
        L1 ball: w_plus = max(x, 0)/r, w_minus = max(-x, 0)/r, the slack 1 - ||x||_1/r split evenly
        between +r e_j and -r e_j of the block's first coordinate j (they cancel).
        """
        L = self._L(x)
        rel = (x - L.offset) / L.scale_c
        w = x.new_zeros(L.n_atoms)
        if L.any_sym:
            wp = rel.clamp_min(0)
            wm = torch.where(L.sym_c, (-rel).clamp_min(0), torch.zeros_like(rel))
        else:
            wp, wm = rel.clamp_min(0), None
        mass = L.seg_sum(wp) + (L.seg_sum(wm) if wm is not None else 0)
        slack = (1 - mass).clamp_min(0)
        w0 = torch.where(L.has_origin, slack, torch.zeros_like(slack))
        if L.any_sym:
            half = torch.where(L.symmetric, slack / 2, torch.zeros_like(slack))
            wp = wp.index_add(0, L.starts, half)
            wm = wm.index_add(0, L.starts, half)
            w[L.dim:L.a0] = wm
        w[:L.dim] = wp
        w[L.a0:] = w0
        return w / L.block_weight_sums(w)[L.atom_block]

    def atoms(self, dtype=torch.float64, device="cpu") -> torch.Tensor:
        """(n_atoms, dim) matrix A with x = A^T w for barycentric weights w (block-local atoms:
        a block's atom has the block's coordinates and zeros elsewhere).  Non-existent atoms are 0."""
        L = self.layout(dtype, device)
        A = torch.zeros(L.n_atoms, L.dim, dtype=dtype, device=device)
        same = L.block_id[None, :] == L.block_id[:, None]
        A[:L.dim] = torch.where(same, L.offset[None, :], torch.zeros((), dtype=dtype, device=device))
        A[:L.dim] += torch.diag(L.scale_c)
        if L.any_sym:
            A[L.dim:L.a0] = torch.where(same, L.offset[None, :], torch.zeros((), dtype=dtype, device=device))
            A[L.dim:L.a0] -= torch.diag(L.scale_c)
        for_b = L.block_id[None, :] == L.arange_B[:, None]
        A[L.a0:] = torch.where(for_b, L.offset[None, :], torch.zeros((), dtype=dtype, device=device))
        return A * L.atom_exists[:, None]

    def vertices(self, dtype=torch.float64, device="cpu", max_vertices: int = 100_000) -> torch.Tensor:
        """All vertices of S as rows of a (n_vertices, dim) tensor (the product over blocks of each
        block's vertex list: origin, plus atoms, minus atoms).  Refuses more than ``max_vertices``."""
        L = self.layout(dtype, device)
        per_block = []
        n = 1
        for b, size in enumerate(L.sizes):
            k = size * (2 if bool(self._symmetric[b]) else 1) + int(bool(self._has_origin[b]))
            n *= k
            if n > max_vertices:
                raise ValueError(f"{type(self).__name__} has more than max_vertices={max_vertices} vertices; "
                                 f"enumerate a smaller set or raise max_vertices")
            start = int(L.starts[b])
            o = L.offset[start:start + size]
            tau = L.scale[b]
            vs = []
            if bool(self._has_origin[b]):
                vs.append(o.clone())
            eye = torch.eye(size, dtype=dtype, device=device)
            vs.extend(o + tau * eye)
            if bool(self._symmetric[b]):
                vs.extend(o - tau * eye)
            per_block.append(vs)
        return torch.stack([torch.cat(c) for c in itertools.product(*per_block)])

    # ---- feasibility -----------------------------------------------------------------------------
    def _tolerances(self, x: torch.Tensor, L: Layout, atol: Optional[float]):
        """Per coordinate and per block absolute tolerances (relative to the scale of the data)."""
        r = default_atol(x.dtype) if atol is None else float(atol)
        coord_tol = r * (L.offset.abs() + L.scale_c) if atol is None else torch.full_like(x, r)
        block_tol = r * (L.scale + L.seg_sum((x - L.offset).abs() + L.offset.abs())) if atol is None else \
            torch.full_like(L.scale, r)
        return coord_tol, block_tol

    def feasibility_error(self, x: torch.Tensor, atol: Optional[float] = None, name: str = "x") -> Optional[str]:
        """None if x is in S (to tolerance), else a message naming the first violated constraint."""
        L = self._L(x)
        ct, bt = self._tolerances(x, L, atol)
        rel = x - L.offset
        low = torch.where(L.sym_c, torch.zeros_like(rel), rel) < -ct
        if bool(low.any()):
            i = int(torch.nonzero(low)[0])
            return (f"{name}[{i}] = {x[i].item()!r} is below its floor {L.offset[i].item()!r}"
                    f"{self._floor_name()}")
        mass = L.seg_sum(torch.where(L.sym_c, rel.abs(), rel))
        over = mass > L.scale + bt
        under = (~L.has_origin & ~L.symmetric) & (mass < L.scale - bt)
        bad = over | under
        if bool(bad.any()):
            b = int(torch.nonzero(bad)[0])
            return self._block_violation(name, x, L, b, float(mass[b]), bool(over[b]))
        return None

    def _floor_name(self) -> str:
        return ""

    def _block_violation(self, name, x, L, b, mass, over) -> str:
        s, n = int(L.starts[b]), L.sizes[b]
        where = f"block {b} (coordinates {s}..{s + n - 1}) of " if L.B > 1 else ""
        tau = float(L.scale[b])
        if bool(self._symmetric[b]):
            return f"||{name}||_1 over {where}{self!r} is {mass!r} > radius {tau!r}"
        if not bool(self._has_origin[b]):
            return f"sum of {name} over {where}{self!r} is {mass + float(L.offset[s:s+n].sum())!r}, must be {tau!r}"
        if n == 1:
            return (f"{name}[{s}] = {x[s].item()!r} is above its upper bound "
                    f"{float(L.offset[s]) + tau!r} in {self!r}")
        budget = tau + float(L.offset[s:s + n].sum())
        return (f"sum of {name} over {where}{self!r} is {mass + budget - tau!r} > tau + dim*eps = "
                f"{budget!r}")

    def contains(self, x: torch.Tensor, atol: Optional[float] = None) -> bool:
        """Whether x is in S up to ``atol`` (default: 64 ulp relative to the set's scale)."""
        x = check_vector("x", x, self.dim)
        return self.feasibility_error(x, atol) is None

    def at_floor(self, x: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
        """Boolean mask of coordinates with |x_i - o_i| <= atol (s_i at eps for the floored simplex)."""
        x = check_vector("x", x, self.dim)
        atol = check_real("atol", atol, nonnegative=True)
        L = self._L(x)
        return (x - L.offset).abs() <= atol

    # ---- Euclidean projection (sort-based; for baselines and references, not used by FW) ----------
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Euclidean projection onto S, O(dim log dim), batched over blocks (Held et al. / Duchi et al.).

        Origin blocks: u = x - o; if sum(max(u, 0)) <= tau: max(u, 0), else the projection of u onto
        {u >= 0, sum u = tau}.  Simplex blocks: always the latter.  L1 blocks: x if ||x||_1 <= r, else
        sign(x) * proj(|x|).  Then add o back.
        """
        x = check_vector("x", x, self.dim)
        L = self._L(x)
        u = x - L.offset
        a = torch.where(L.sym_c, u.abs(), u)
        pos_mass = L.seg_sum(a.clamp_min(0))
        inside = (L.has_origin | L.symmetric) & (pos_mass <= L.scale)
        # batched projection of a onto {p >= 0, sum p = tau_b}
        fill = -(L.seg_sum(a.abs()) + L.scale + 1)
        M = L.padded(a, fill)
        srt = torch.sort(M, dim=1, descending=True).values
        cs = torch.cumsum(srt, dim=1) - L.scale[:, None]
        j = torch.arange(1, M.shape[1] + 1, dtype=x.dtype, device=x.device)
        cond = srt - cs / j > 0
        rho = (cond * torch.arange(M.shape[1], device=x.device)).amax(1)   # last index where cond holds
        theta = cs.gather(1, rho[:, None]).squeeze(1) / (rho + 1).to(x.dtype)
        p = (a - theta[L.block_id]).clamp_min(0)
        p = torch.where(inside[L.block_id], a.clamp_min(0), p)
        p = torch.where(L.sym_c, torch.sign(u) * p, p)
        p = torch.where(L.sym_c & inside[L.block_id], u, p)
        return L.offset + p

    # ---- truncation ------------------------------------------------------------------------------
    def remove_coordinates(self, idx) -> "FeasibleSet":
        """The set restricted to the remaining coordinates (x_i fixed at its floor for removed i).

        Refuses to empty a block (see ``AwayStepFW.remove_coordinates``); a Box may lose any but not
        all of its coordinates."""
        keep = self._keep_mask(idx)
        self._check_keep(keep)
        return self._restrict(keep)

    def _check_keep(self, keep: torch.Tensor) -> None:
        """ValueError if ``keep`` (CPU bool mask) removes every coordinate, or every coordinate of a block
        that cannot disappear (all but Box's one-coordinate intervals)."""
        if not bool(keep.any()):
            raise ValueError(f"cannot remove all {self.dim} coordinates of {self!r}; keep at least one")
        sizes = torch.tensor(self._sizes, dtype=torch.long)
        block_id = torch.repeat_interleave(torch.arange(len(self._sizes)), sizes)
        kept = torch.zeros(len(self._sizes), dtype=torch.long).index_add_(0, block_id, keep.long())
        emptied = (kept == 0) & ~self._removable
        if bool(emptied.any()):
            b = int(torch.nonzero(emptied)[0])
            s = int(sizes[:b].sum())
            removed = torch.nonzero(~keep).flatten()
            shown = removed.tolist() if removed.numel() <= 10 else f"{removed.numel()} coordinates"
            raise ValueError(f"removing {shown} would empty block {b} (coordinates {s}..{s + self._sizes[b] - 1}) "
                             f"of {self!r}; a block must keep at least one coordinate -- keep its largest "
                             f"entry, or rebuild the set without that block")

    def _keep_mask(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx).reshape(-1) if not isinstance(idx, torch.Tensor) else idx
        if idx.dim() != 1:
            raise ValueError(f"idx must be a 1-D tensor of coordinate indices, got shape {tuple(idx.shape)}")
        if idx.numel() and (idx.is_floating_point() or idx.dtype == torch.bool):
            raise TypeError(f"idx must hold integer coordinate indices, got dtype {idx.dtype}")
        idx = idx.to("cpu", torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.dim):
            bad = idx[(idx < 0) | (idx >= self.dim)][0]
            raise ValueError(f"coordinate index {int(bad)} is out of range for dim={self.dim}")
        keep = torch.ones(self.dim, dtype=torch.bool)
        keep[idx] = False
        return keep

    def _restrict(self, keep: torch.Tensor) -> "FeasibleSet":  # pragma: no cover - abstract
        raise NotImplementedError

    def _members(self):
        """The user-visible blocks, as (set, first coordinate) pairs."""
        return [(self, 0)]


class FlooredSimplex(FeasibleSet):
    """S = {s in R^dim : s >= eps, sum(s) <= tau + dim*eps} (the paper's rank-weight set).

    Vertices v_0 = eps*1 and v_i = eps*1 + tau*e_i; ``tau`` (paper: tau) is the rank budget, ``eps``
    (paper: eps) the floor that keeps 1/s finite.  Barycentric weights: (w_1..w_dim, w_0) with
    s = eps + tau*w_plus.
    """

    def __init__(self, dim: int, tau: float, eps: float):
        self.dim_ = check_dim("dim", dim)
        self.tau = check_real("tau", tau, positive=True, hint=" (tau is the rank budget: sum(s - eps) <= tau)")
        self.eps = check_real("eps", eps, nonnegative=True, hint=" (eps is the floor: s >= eps)")
        self._set_blocks([self.dim_], torch.full((self.dim_,), self.eps, dtype=torch.float64), [self.tau], [True], [False], [False])

    def _floor_name(self):
        return " (eps)"

    def _restrict(self, keep):
        return FlooredSimplex(int(keep.sum()), self.tau, self.eps)

    def __repr__(self):
        return f"FlooredSimplex(dim={self.dim_}, tau={self.tau!r}, eps={self.eps!r})"


class ProbabilitySimplex(FeasibleSet):
    """{x >= 0, sum(x) = 1}; vertices e_i."""

    def __init__(self, dim: int):
        self.dim_ = check_dim("dim", dim)
        self._set_blocks([self.dim_], torch.zeros(self.dim_, dtype=torch.float64), [1.0], [False], [False], [False])

    def _restrict(self, keep):
        return ProbabilitySimplex(int(keep.sum()))

    def __repr__(self):
        return f"ProbabilitySimplex(dim={self.dim_})"


class L1Ball(FeasibleSet):
    """{||x||_1 <= radius}; vertices +-radius*e_i."""

    def __init__(self, dim: int, radius: float = 1.0):
        self.dim_ = check_dim("dim", dim)
        self.radius = check_real("radius", radius, positive=True)
        self._set_blocks([self.dim_], torch.zeros(self.dim_, dtype=torch.float64), [self.radius], [False], [True], [False])

    def _restrict(self, keep):
        return L1Ball(int(keep.sum()), self.radius)

    def __repr__(self):
        return f"L1Ball(dim={self.dim_}, radius={self.radius!r})"


class Box(FeasibleSet):
    """{lower <= x <= upper} (lower < upper entrywise), a product of intervals: one atomic block per
    coordinate with vertices lower_i and upper_i.  Removing a coordinate removes its interval."""

    def __init__(self, lower, upper):
        lo = torch.as_tensor(lower, dtype=torch.float64).detach().cpu().reshape(-1) if not isinstance(
            lower, torch.Tensor) else lower.detach().to("cpu", torch.float64)
        up = torch.as_tensor(upper, dtype=torch.float64).detach().cpu().reshape(-1) if not isinstance(
            upper, torch.Tensor) else upper.detach().to("cpu", torch.float64)
        if lo.dim() != 1 or up.dim() != 1 or lo.shape != up.shape:
            raise ValueError(f"lower and upper must be 1-D of equal length, got shapes {tuple(lo.shape)} "
                             f"and {tuple(up.shape)}")
        check_dim("dim (len(lower))", lo.shape[0])
        check_finite("lower", lo, "; a Box needs finite bounds")
        check_finite("upper", up, "; a Box needs finite bounds")
        bad = ~(up > lo)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(f"Box needs lower < upper, but lower[{i}] = {lo[i].item()!r} >= upper[{i}] = "
                             f"{up[i].item()!r}; drop fixed coordinates from the problem instead")
        self.lower, self.upper = lo, up
        n = lo.shape[0]
        self._set_blocks([1] * n, lo, up - lo, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool),
                         torch.ones(n, dtype=torch.bool))

    def _floor_name(self):
        return " (lower)"

    def _restrict(self, keep):
        return Box(self.lower[keep], self.upper[keep])

    def __repr__(self):
        return f"Box(dim={self.lower.shape[0]})"


class ProductSet(FeasibleSet):
    """S_1 x ... x S_L on the concatenation of the blocks' coordinates (in order).

    Blocks may be FlooredSimplex, ProbabilitySimplex, L1Ball, Box or ProductSet (flattened).  For the
    per-layer budget of dEBORA: ``ProductSet([FlooredSimplex(r_l, tau, eps) for each layer])``.
    """

    def __init__(self, blocks: Sequence[FeasibleSet]):
        blocks = list(blocks) if not isinstance(blocks, FeasibleSet) else [blocks]
        if not blocks:
            raise ValueError("ProductSet needs at least one block, got an empty list")
        flat = []
        for i, b in enumerate(blocks):
            if isinstance(b, ProductSet):
                flat.extend(b.blocks)
            elif isinstance(b, FeasibleSet):
                flat.append(b)
            else:
                raise TypeError(f"ProductSet block {i} is a {type(b).__name__}, expected a feasible set such "
                                f"as FlooredSimplex(dim, tau, eps)")
        self.blocks = flat
        self._set_blocks([s for b in flat for s in b._sizes], torch.cat([b._offset for b in flat]),
                         torch.cat([b._scale for b in flat]), torch.cat([b._has_origin for b in flat]),
                         torch.cat([b._symmetric for b in flat]), torch.cat([b._removable for b in flat]))
        dims = [b.dim for b in flat]
        self.block_dims = dims
        self.block_starts = list(itertools.accumulate([0] + dims[:-1]))

    def _floor_name(self):
        return ""

    def _members(self):
        return list(zip(self.blocks, self.block_starts))

    def block_slices(self):
        """slice of x for each block, in order."""
        return [slice(s, s + d) for s, d in zip(self.block_starts, self.block_dims)]

    def _restrict(self, keep):
        new = []
        for b, s in zip(self.blocks, self.block_starts):
            k = keep[s:s + b.dim]
            if bool(k.any()):
                new.append(b._restrict(k) if not bool(k.all()) else b)
        return ProductSet(new)

    def __repr__(self):
        if len(self.blocks) <= 3:
            return f"ProductSet({self.blocks!r})"
        return f"ProductSet(<{len(self.blocks)} blocks, dim={self.dim}>)"
