"""bilevel.custom_root: implicit differentiation inside autograd, against closed forms, finite
differences and torchopt (float64)."""
import math
import random
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchopt.diff.implicit import custom_root as torchopt_custom_root
import torchopt

import bilevel
from bilevel import pytree as pt
from bilevel.testing import QuadraticBilevel, relative_error

warnings.filterwarnings("ignore", category=FutureWarning, module="torchopt")
D = torch.float64


def _ridge(seed=0, n=40, d=6):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, generator=gen, dtype=D)
    t = torch.randn(n, generator=gen, dtype=D)
    Av, tv = torch.randn(n, d, generator=gen, dtype=D), torch.randn(n, generator=gen, dtype=D)
    return A, t, Av, tv


def _ridge_solution(A, t, lam):
    d = A.shape[1]
    return torch.linalg.solve(A.T @ A + lam * torch.eye(d, dtype=D), A.T @ t)


@pytest.mark.parametrize("solve", ["cg", "dense", bilevel.linear_solvers.get("cg", tol=1e-13)])
def test_scalar_x_ridge_against_closed_form(solve):
    # y*(λ) = (AᵀA + λI)⁻¹Aᵀt, λ = exp(x) with x a 0-dim tensor; dy*/dλ = −(AᵀA + λI)⁻¹ y*, so
    # d/dx ½‖A_v y* − t_v‖² = −λ (A_vᵀ(A_v y* − t_v))ᵀ (AᵀA + λI)⁻¹ y*. (torchopt#222 gives 0 here.)
    A, t, Av, tv = _ridge()

    def optimality(y, x):
        return A.T @ (A @ y - t) + torch.exp(x) * y

    @bilevel.custom_root(optimality, argnums=1, solve=solve)
    def solver(y0, x):
        return _ridge_solution(A, t, torch.exp(x))

    x = torch.tensor(0.3, dtype=D, requires_grad=True)
    y = solver(torch.zeros(6, dtype=D), x)
    assert y.requires_grad and y.shape == (6,)
    loss = 0.5 * ((Av @ y - tv) ** 2).sum()
    loss.backward()
    lam = math.exp(0.3)
    ys = _ridge_solution(A, t, lam)
    M = A.T @ A + lam * torch.eye(6, dtype=D)
    want = -lam * (Av.T @ (Av @ ys - tv)) @ torch.linalg.solve(M, ys)
    # CG to 1e-10 relative residual on κ(M) ~ 1e2: error ≲ κ·1e-10 relative
    torch.testing.assert_close(x.grad, want, rtol=1e-8, atol=0)
    assert x.grad.shape == ()


def _quadratic_root(q, solve="cg"):
    def optimality(y, x):                    # ∂_y g = H y + C x + d (dicts)
        return {k: v for k, v in q.tree_y(q.H @ q.vec_y(y) + q.C @ q.vec_x(x) + q.d).items()}

    @bilevel.custom_root(optimality, argnums=1, solve=solve)
    def solver(y0, x):
        return q.y_star(x)
    return solver


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_outer=st.integers(1, 8), n_inner=st.integers(1, 10),
       kappa=st.floats(1.0, 100.0), x_parts=st.integers(1, 3), y_parts=st.integers(1, 3),
       order=st.integers(0, 100))
def test_dict_x_dict_y_gives_the_hypergradient(seed, n_outer, n_inner, kappa, x_parts, y_parts, order):
    # F(x) = f(x, y*(x)) by autograd through custom_root equals ∂_x f − Cᵀ H⁻¹ ∂_y f, also when x is
    # handed over with its keys in a shuffled order. Dense solve: rounding only (κ ≤ 100).
    q = QuadraticBilevel.random(n_outer, n_inner, kappa=kappa, x_parts=x_parts, y_parts=y_parts, seed=seed)
    x0 = q.random_x()
    keys = list(x0)
    random.Random(order).shuffle(keys)
    x = {k: x0[k].clone().requires_grad_(True) for k in keys}
    y = _quadratic_root(q, solve="dense")(q.y_star(x0), x)
    assert isinstance(y, dict) and list(y) == list(q.y_shapes) and all(v.requires_grad for v in y.values())
    q.upper_loss(x, y).backward()
    grad = {k: x[k].grad for k in q.x_shapes}
    assert relative_error(grad, q.hypergradient(x0), q.scale(x0)) <= 1e-10


def test_matches_torchopt_on_tensors_and_two_argnums():
    # y*(a, b) = argmin_y ½ yᵀ H y − yᵀ(B a) + ½ b ‖y‖²: gradients to a (a vector) and b (a 1-vector,
    # since torchopt returns 0 for 0-dim inputs) against torchopt's custom_root and finite differences.
    gen = torch.Generator().manual_seed(1)
    m, n = 7, 4
    G = torch.randn(m, m, generator=gen, dtype=D)
    H = G @ G.T + torch.eye(m, dtype=D)
    B = torch.randn(m, n, generator=gen, dtype=D)
    c = torch.randn(m, generator=gen, dtype=D)

    def optimality(y, a, b):
        return H @ y - B @ a + b * y

    def inner(a, b):
        return torch.linalg.solve(H + b * torch.eye(m, dtype=D), B @ a)

    def ours_solver(y0, a, b):
        return inner(a, b)

    results = []
    for deco in (bilevel.custom_root(optimality, argnums=(1, 2), solve="cg"),
                 torchopt_custom_root(optimality, argnums=(1, 2),
                                      solve=torchopt.linear_solve.solve_cg(rtol=1e-12, maxiter=100))):
        a = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=D).requires_grad_(True)
        b = torch.tensor([0.7], dtype=D, requires_grad=True)
        y = deco(ours_solver)(torch.zeros(m, dtype=D), a, b)
        (((y - c) ** 2).sum() * 0.5).backward()
        results.append((a.grad.clone(), b.grad.clone()))
    (ga, gb), (ta, tb) = results
    torch.testing.assert_close(ga, ta, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(gb, tb, rtol=1e-8, atol=1e-12)
    # central finite differences in b: error O(h²)
    a0 = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=D)
    h = 1e-5
    F = lambda bb: 0.5 * ((inner(a0, bb) - c) ** 2).sum()
    fd = (F(torch.tensor([0.7 + h], dtype=D)) - F(torch.tensor([0.7 - h], dtype=D))) / (2 * h)
    torch.testing.assert_close(gb[0], fd, rtol=1e-7, atol=0)


def test_scalar_x_against_torchopt_and_closed_form():
    # 0-dim x (torchopt#222 reported zero gradients for scalars; torchopt 0.7.3 gets this case right):
    # ours, torchopt's and the closed form agree.
    A, t, Av, tv = _ridge(seed=3)

    def optimality(y, x):
        return A.T @ (A @ y - t) + torch.exp(x) * y

    def solver(y0, x):
        return _ridge_solution(A, t, torch.exp(x))
    grads = []
    for deco in (bilevel.custom_root(optimality, argnums=1),
                 torchopt_custom_root(optimality, argnums=1,
                                      solve=torchopt.linear_solve.solve_cg(rtol=1e-12, maxiter=100))):
        x = torch.tensor(-0.5, dtype=D, requires_grad=True)
        y = deco(solver)(torch.zeros(6, dtype=D), x)
        (0.5 * ((Av @ y - tv) ** 2).sum()).backward()
        grads.append(x.grad)
    lam = math.exp(-0.5)
    ys = _ridge_solution(A, t, lam)
    want = -lam * (Av.T @ (Av @ ys - tv)) @ torch.linalg.solve(A.T @ A + lam * torch.eye(6, dtype=D), ys)
    torch.testing.assert_close(grads[0], want, rtol=1e-8, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=0)


@pytest.mark.parametrize("solve,bound", [
    (bilevel.linear_solvers.get("neumann", eta=0.05, terms=600), 1e-9),
    (bilevel.linear_solvers.get("fixed-point", eta=0.05, tol=1e-12, maxiter=4000), 1e-9),
    (bilevel.linear_solvers.get("dense", symmetric=False), 1e-11),
    (lambda matvec, b: bilevel.linear_solvers.conjugate_gradient(matvec, b, tol=1e-13)[0], 1e-10)])
def test_every_solve_and_a_plain_callable(solve, bound):
    # κ = 10, μ = 1 ⇒ L = 10 and η = 0.05: Neumann tail (1 − 0.05)^600 ≈ 4e-14.
    q = QuadraticBilevel.random(4, 6, kappa=10, mu=1.0, x_parts=2, y_parts=2, seed=5)
    x0 = q.random_x()
    x = {k: v.clone().requires_grad_(True) for k, v in x0.items()}
    fn = _quadratic_root(q, solve=solve)
    q.upper_loss(x, fn(None, x)).backward()
    assert relative_error({k: x[k].grad for k in q.x_shapes}, q.hypergradient(x0), q.scale(x0)) <= bound
    if not callable(getattr(solve, "__self__", None)) and fn.last_info is not None:
        assert fn.last_info.matvecs >= 1


def test_damping_solves_the_damped_system():
    q = QuadraticBilevel.random(3, 5, kappa=10, mu=1.0, seed=6)
    x0 = q.random_x()
    x = {k: v.clone().requires_grad_(True) for k, v in x0.items()}
    lam = 0.4
    fn = _quadratic_root(q, solve=bilevel.linear_solvers.get("cg", tol=1e-13, damping=lam))
    q.upper_loss(x, fn(None, x)).backward()
    ys = q.y_star(x0)
    want = q.grad_x_f(x0, ys) - q.C.T @ torch.linalg.solve(q.H + lam * torch.eye(5, dtype=D),
                                                           q.grad_y_f(x0, ys))
    assert relative_error({k: x[k].grad for k in q.x_shapes}, want, q.scale(x0)) <= 1e-10


def test_errors():
    opt = lambda y, x: y - x
    with pytest.raises(ValueError, match="argnums=0"):
        bilevel.custom_root(opt, argnums=0)
    with pytest.raises(ValueError, match="only 1 argument"):
        bilevel.custom_root(opt, argnums=2)(lambda y0, x: x)(None, torch.ones(2))
    with pytest.raises(TypeError, match="argument 1 of the solver"):
        bilevel.custom_root(opt)(lambda y0, x: torch.ones(2))(None, [1.0, 2.0])
    with pytest.raises(ValueError, match="unknown linear solver 'lu'"):
        bilevel.custom_root(opt, solve="lu")
    with pytest.raises(ValueError, match="eta"):
        bilevel.linear_solvers.get("neumann")
    with pytest.raises(ValueError, match="damping must be >= 0 and finite"):
        bilevel.linear_solvers.get("cg", damping=float("nan"))
    with pytest.raises(TypeError, match="does not take \\['eta'\\]"):
        bilevel.linear_solvers.get("cg", eta=0.1)
    x = torch.ones(3, dtype=D, requires_grad=True)
    y = bilevel.custom_root(lambda y, x: y[:2] - x[:2])(lambda y0, x: x.detach().clone())(None, x)
    with pytest.raises(ValueError, match="structure of y"):
        y.sum().backward()


def test_has_aux_and_y_in_a_bigger_graph():
    q = QuadraticBilevel.random(3, 4, kappa=5, seed=7)
    x0 = q.random_x()

    def optimality(y, x):
        return q.tree_y(q.H @ q.vec_y(y) + q.C @ q.vec_x(x) + q.d)

    @bilevel.custom_root(optimality, argnums=1, has_aux=True)
    def solver(y0, x):
        return q.y_star(x), {"iterations": 0}
    x = {k: v.clone().requires_grad_(True) for k, v in x0.items()}
    y, aux = solver(None, x)
    assert aux == {"iterations": 0}
    # y* used twice in a larger graph: gradients add up through autograd
    (2.0 * q.upper_loss(x, y) + pt.flatten(y).sum()).backward()
    Hinv = torch.linalg.inv(q.H)
    ys = q.y_star(x0)
    want = 2.0 * q.hypergradient(x0) - q.C.T @ Hinv @ torch.ones(4, dtype=D)
    assert relative_error({k: x[k].grad for k in q.x_shapes}, want, 3 * q.scale(x0)) <= 1e-9
