"""bilevel.solvers (SOBA, AmIGO, StocBiO, alternating): one step against its formula, convergence to
the closed-form solution of a strongly convex bilevel quadratic, checkpoint/resume, options (float64)."""
import io
import math

import pytest
import torch

import bilevel
from bilevel import pytree as pt
from bilevel.solvers import SolverState

D = torch.float64


class Quad:
    """g = ½ yᵀHy − yᵀBx (+ noise ½ yᵀE_ξy), f = ½‖y − c‖² + ½ρ‖x‖²: y*(x) = H⁻¹Bx and
    F(x) = ½‖H⁻¹Bx − c‖² + ½ρ‖x‖², so ∇F = BᵀH⁻¹(H⁻¹Bx − c) + ρx and x* = (BᵀH⁻²B + ρI)⁻¹BᵀH⁻¹c."""

    def __init__(self, m=6, n=4, rho=0.5, seed=0):
        gen = torch.Generator().manual_seed(seed)
        U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=D))
        self.H = (U * torch.linspace(1.0, 4.0, m, dtype=D)) @ U.T
        self.B = torch.randn(m, n, generator=gen, dtype=D) / math.sqrt(m)
        self.c = torch.randn(m, generator=gen, dtype=D)
        self.rho = rho
        Hi = torch.linalg.inv(self.H)
        self.x_star = torch.linalg.solve(self.B.T @ Hi @ Hi @ self.B + rho * torch.eye(n, dtype=D),
                                         self.B.T @ Hi @ self.c)
        self.Hi = Hi

    def lower(self, x, y, E):
        Hb = self.H if E is None else self.H + E
        return 0.5 * y["y"] @ Hb @ y["y"] - y["y"] @ (self.B @ x["x"])

    def upper(self, x, y, b):
        return 0.5 * ((y["y"] - self.c) ** 2).sum() + 0.5 * self.rho * (x["x"] ** 2).sum()

    def problem(self):
        return bilevel.BilevelProblem(self.upper, self.lower)

    def grad_F(self, x):
        return self.B.T @ self.Hi @ (self.Hi @ self.B @ x - self.c) + self.rho * x

    def noise(self, seed, scale=0.3):
        gen = torch.Generator().manual_seed(seed)
        m = self.H.shape[0]
        while True:
            z = torch.randn(m, generator=gen, dtype=D)
            yield scale * (torch.outer(z, z) - torch.eye(m, dtype=D)) / m


def _start(q):
    return {"x": torch.zeros(4, dtype=D)}, {"y": torch.zeros(6, dtype=D)}


def test_soba_step_is_its_formula():
    q = Quad()
    x = {"x": torch.randn(4, dtype=D)}
    y = {"y": torch.randn(6, dtype=D)}
    solver = bilevel.solvers.get("soba", outer_lr=0.1, inner_lr=0.2, linear_lr=0.3)
    st = solver.init(q.problem(), x, y)
    st = SolverState(x=st.x, y=st.y, v={"y": torch.randn(6, dtype=D)})
    new, info = solver.step(q.problem(), st, None, None)
    X, Y, V = x["x"], y["y"], st.v["y"]
    torch.testing.assert_close(new.y["y"], Y - 0.2 * (q.H @ Y - q.B @ X), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(new.v["y"], V - 0.3 * (q.H @ V - (Y - q.c)), rtol=1e-14, atol=1e-14)
    # ∂²_xy g · v = −Bᵀv, ∂_x f = ρx:  x ← x − γ(ρx + Bᵀv)
    torch.testing.assert_close(new.x["x"], X - 0.1 * (q.rho * X + q.B.T @ V), rtol=1e-14, atol=1e-14)
    assert (info.lower_grads, info.upper_grads, info.hvp_count, info.mixed_count) == (1, 1, 1, 1)
    assert info.oracle_calls == 4 and new.step == 1


SOLVERS = [("soba", dict(outer_lr=0.1, inner_lr=0.2, linear_lr=0.2), 3000),
           ("amigo", dict(outer_lr=0.2, inner_lr=0.2, linear_lr=0.2, inner_steps=5), 400),
           ("stocbio", dict(outer_lr=0.2, inner_lr=0.2, linear_lr=0.25, inner_steps=5, terms=40), 300),
           ("alternating", dict(outer_lr=0.2, inner_lr=0.2, inner_steps=5,
                                estimator="cg", estimator_options=dict(tol=1e-12, warm_start=True)), 400)]


@pytest.mark.parametrize("name,opts,steps", SOLVERS)
def test_deterministic_runs_reach_the_closed_form_solution(name, opts, steps):
    # With exact (deterministic) oracles every method is a contraction towards x* on this strongly
    # convex quadratic (μ_F ≥ ρ = 0.5, H ∈ [1, 4], ρ_y·L_H = 0.8 < 2): x_T → x* geometrically.
    q = Quad()
    solver = bilevel.solvers.get(name, **opts)
    x, y = _start(q)
    st = solver.init(q.problem(), x, y)
    stream = iter(lambda: None, 1)
    for _ in range(steps):
        st, info = solver.step(q.problem(), st, None, stream)
    bias = 0.0
    if name == "stocbio":
        # A K-term Neumann series with η = 1/L = 0.25 leaves (I − ηH)^K v*, ‖·‖ ≤ 0.75^K ‖v*‖: the
        # fixed point moves by at most ‖B‖₂ 0.75^K ‖v*(x̂)‖ / μ_F with μ_F ≥ ρ.
        xh = st.x["x"]
        v_star = q.Hi @ (q.Hi @ q.B @ xh - q.c)
        bias = float(torch.linalg.matrix_norm(q.B, 2) * 0.75 ** opts["terms"] * v_star.norm() / q.rho)
    assert float((st.x["x"] - q.x_star).norm()) <= 1e-8 * float(q.x_star.norm()) + 1.01 * bias
    assert float(q.grad_F(st.x["x"]).norm()) <= 1e-8 + 2 * bias


@pytest.mark.parametrize("name,opts,steps", SOLVERS)
def test_stochastic_runs_approach_the_solution(name, opts, steps):
    # Zero-mean Hessian noise: not exact, but ‖∇F‖ must drop well below its start (20× here, a loose
    # bound: the noise floor with these constant steps is ~1e-2 relative).
    q = Quad(seed=1)
    solver = bilevel.solvers.get(name, **opts)
    x, y = _start(q)
    st = solver.init(q.problem(), x, y)
    g0 = float(q.grad_F(st.x["x"]).norm())
    stream = q.noise(seed=3)
    for _ in range(min(steps // 2, 150)):
        st, _ = solver.step(q.problem(), st, None, stream)
    assert float(q.grad_F(st.x["x"]).norm()) <= g0 / 20


@pytest.mark.parametrize("name,opts,steps", SOLVERS)
def test_checkpoint_and_resume_is_exact(name, opts, steps):
    q = Quad(seed=2)
    solver = bilevel.solvers.get(name, **opts)
    x, y = _start(q)
    st = solver.init(q.problem(), x, y)

    def run(st, k, seed):
        stream = q.noise(seed)
        for _ in range(k):
            st, _ = solver.step(q.problem(), st, None, stream)
        return st
    mid = run(st, 4, seed=5)
    straight = run(mid, 4, seed=6)
    buf = io.BytesIO()
    torch.save(mid.to_dict(), buf)
    buf.seek(0)
    restored = SolverState.from_dict(torch.load(buf, weights_only=True))
    fresh = bilevel.solvers.get(name, **opts)
    resumed = run(restored, 4, seed=6) if name != "stocbio" else None
    if name == "stocbio":
        st2 = restored
        stream = q.noise(6)
        for _ in range(4):
            st2, _ = fresh.step(q.problem(), st2, None, stream)
        resumed = st2
    assert torch.equal(straight.x["x"], resumed.x["x"]) and torch.equal(straight.y["y"], resumed.y["y"])
    assert resumed.step == 8


def test_info_counts_products():
    q = Quad()
    x, y = _start(q)
    stream = iter(lambda: None, 1)
    s = bilevel.solvers.get("amigo", outer_lr=0.1, inner_lr=0.1, inner_steps=3, linear_steps=4)
    _, info = s.step(q.problem(), s.init(q.problem(), x, y), None, stream)
    assert (info.lower_grads, info.hvp_count, info.mixed_count, info.oracle_calls) == (3, 4, 1, 9)
    s = bilevel.solvers.get("stocbio", outer_lr=0.1, inner_lr=0.1, inner_steps=2, terms=5)
    _, info = s.step(q.problem(), s.init(q.problem(), x, y), None, stream)
    assert (info.lower_grads, info.hvp_count, info.mixed_count) == (2, 4, 1)


def test_solver_options_and_errors():
    assert bilevel.solvers.available() == ["alternating", "amigo", "soba", "stocbio"]
    with pytest.raises(ValueError, match="outer_lr must be > 0 and finite, got nan"):
        bilevel.solvers.get("soba", outer_lr=float("nan"), inner_lr=0.1)
    with pytest.raises(ValueError, match="linear_lr"):
        bilevel.solvers.get("amigo", outer_lr=0.1, inner_lr=0.1, linear_lr=-1.0)
    with pytest.raises(TypeError, match=r"does not take \['lr'\]"):
        bilevel.solvers.get("soba", lr=0.1)
    with pytest.raises(ValueError, match="unknown bilevel solver 'adam'"):
        bilevel.solvers.get("adam")
    with pytest.raises(ValueError, match="inner_steps"):
        bilevel.solvers.get("amigo", outer_lr=0.1, inner_lr=0.1, inner_steps=0)
    q = Quad()
    x, y = _start(q)
    with pytest.raises(TypeError, match="mix dtypes"):
        bilevel.solvers.get("soba", outer_lr=0.1, inner_lr=0.1).init(q.problem(), x, {"y": y["y"].float()})
    s = bilevel.solvers.get("amigo", outer_lr=0.1, inner_lr=0.1)
    with pytest.warns(UserWarning, match="single lower batch"):
        s.step(q.problem(), s.init(q.problem(), x, y), None, None)


@pytest.mark.parametrize("name,opts,steps", SOLVERS)
def test_solvers_match_leaves_by_key(name, opts, steps):
    # The same problem with x and y split into several leaves, handed over in two key orders: the
    # iterates agree leaf by leaf (to rounding: the flat and leaf-wise paths round differently).
    q = Quad(seed=4)

    def split(v, keys, sizes):
        out, i = {}, 0
        for k, s in zip(keys, sizes):
            out[k] = v[i:i + s]
            i += s
        return out

    def problem():
        def cat(t, keys):
            return torch.cat([t[k] for k in keys])
        return bilevel.BilevelProblem(
            lambda x, y, b: q.upper({"x": cat(x, "ab")}, {"y": cat(y, "cde")}, b),
            lambda x, y, b: q.lower({"x": cat(x, "ab")}, {"y": cat(y, "cde")}, b))
    x0, y0 = _start(q)
    runs = []
    for order in ((("a", "b"), ("c", "d", "e")), (("b", "a"), ("e", "c", "d"))):
        xs = split(x0["x"], "ab", (1, 3))
        ys = split(y0["y"], "cde", (2, 1, 3))
        x = {k: xs[k] for k in order[0]}
        y = {k: ys[k] for k in order[1]}
        solver = bilevel.solvers.get(name, **opts)
        st = solver.init(problem(), x, y)
        stream = q.noise(seed=8)
        for _ in range(5):
            st, _ = solver.step(problem(), st, None, stream)
        runs.append(st)
    for k in "ab":
        torch.testing.assert_close(runs[0].x[k], runs[1].x[k], rtol=1e-12, atol=1e-14)
    for k in "cde":
        torch.testing.assert_close(runs[0].y[k], runs[1].y[k], rtol=1e-12, atol=1e-14)
