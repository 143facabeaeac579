"""The envelope theorem behind the default preset (D1 = D2 + first-order), and the regime checks' helpers.

With f1 = f2 = f and y*(x) = argmin_y f(x, y): ∇F(x) = ∂_x f(x, y*) − ∂²_xy f [∂²_yy f]⁻¹ ∂_y f(x, y*)
= ∂_x f(x, y*), since ∂_y f(x, y*) = 0. At an inexact lower solution y (residual r = ∂_y f(x, y)),
for f quadratic in y with a Hessian A independent of x and ∂_x f linear in y, exactly

    ∂_x f(x, y) − ∇F(x) = ∂²_xy f · (y − y*) = ∂²_xy f · A⁻¹ r,   so   ‖fo − ∇F‖ ≤ ‖∂²_xy f‖ ‖A⁻¹‖ ‖r‖.
"""
import copy

import pytest
import torch

import bilevel
import debora
from theory_checks import constants as C
from theory_checks import solvers
from theory_checks.checks import regime
from theory_checks.problems.base import cosine, rel_error
from theory_checks.problems.toy import make_toy

D = torch.float64


def _closed_form_problem(seed=0, n=6, m=3):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    A = Q @ torch.diag(torch.linspace(0.5, 4.0, n, dtype=D)) @ Q.T            # ∂²_yy f, SPD
    M = torch.randn(n, m, generator=g, dtype=D)
    c = torch.randn(m, generator=g, dtype=D)

    def b(x):
        return M @ x + torch.sin(M @ x)

    def f(x, y, batch=None):
        x, y = x["x"], y["y"]
        return 0.5 * y @ A @ y - b(x) @ y + torch.log(torch.cosh(x - c)).sum()

    def F(x):   # F(x) = f(x, y*(x)), y* = A⁻¹ b(x): exact, differentiable
        ys = torch.linalg.solve(A, b(x))
        return f({"x": x}, {"y": ys})

    return A, b, f, F


def test_envelope_identity_closed_form():
    """upper == lower: first-order == ∇F at y*, and within ‖∂²_xy f‖‖A⁻¹‖‖r‖ at an inexact y."""
    A, b, f, F = _closed_form_problem()
    x = {"x": torch.tensor([0.3, -0.7, 1.1], dtype=D)}
    grad_F = torch.func.grad(F)(x["x"])
    problem = bilevel.BilevelProblem(f, f)
    fo = bilevel.estimators.get("first-order")
    exact = bilevel.estimators.get("exact")
    y_star = {"y": torch.linalg.solve(A, b(x["x"]))}
    # the reference estimator agrees with the analytic ∇F (so the comparison below is meaningful)
    assert torch.allclose(exact(problem, x, y_star, None, None).grad["x"], grad_F, rtol=1e-12, atol=1e-12)
    g_star = fo(problem, x, y_star, None, None).grad["x"]
    assert torch.allclose(g_star, grad_F, rtol=1e-12, atol=1e-13)
    # inexact lower solutions: error bounded by ‖∂²_xy f‖‖A⁻¹‖‖r‖ (and of that order)
    Jxy = torch.func.jacrev(lambda xx, yy: torch.func.grad(f, argnums=0)({"x": xx}, {"y": yy})["x"],
                            argnums=1)(x["x"], y_star["y"])                    # (m, n)
    bound_factor = float(torch.linalg.matrix_norm(Jxy, 2)) / float(torch.linalg.eigvalsh(A)[0])
    gen = torch.Generator().manual_seed(1)
    for scale in (1e-2, 1e-5, 1e-8):
        y = {"y": y_star["y"] + scale * torch.randn(6, generator=gen, dtype=D)}
        r = torch.func.grad(f, argnums=1)(x, y)["y"]
        err = float((fo(problem, x, y, None, None).grad["x"] - grad_F).norm())
        assert err <= bound_factor * float(r.norm()) * (1 + 1e-9) + 1e-14
        # the implicit term is exactly what first-order drops
        impl = exact(problem, x, y, None, None).grad["x"]
        assert torch.allclose(impl, grad_F, rtol=0, atol=1e-12 + 10 * float(r.norm()) ** 2)


def test_first_order_is_not_exact_when_upper_differs():
    """Contrast: a different upper loss (D1 ≠ D2) keeps the implicit term."""
    A, b, f, _ = _closed_form_problem()
    w = torch.linspace(-1.0, 1.0, 6, dtype=D)

    def f1(x, y, batch=None):
        return f(x, y) + w @ y["y"]

    x = {"x": torch.tensor([0.3, -0.7, 1.1], dtype=D)}
    y_star = {"y": torch.linalg.solve(A, b(x["x"]))}
    problem = bilevel.BilevelProblem(f1, f)
    ref = bilevel.estimators.get("exact")(problem, x, y_star, None, None).grad["x"]
    fo = bilevel.estimators.get("first-order")(problem, x, y_star, None, None).grad["x"]
    assert rel_error(fo, ref) > 1e-2


def test_envelope_on_oblique_adapter_problem():
    """The regime of the default preset on the toy (oblique bases, init_s, D1 = D2): at the
    Newton-converged lower solution (Riemannian ‖∂_B g‖ tiny, debora.manifolds.project), first-order
    equals the dense implicit hypergradient."""
    ap = make_toy("matrix", "oblique", rank=4, n=128, split="same", s0=0.01, scaling=4.0, tau=1.0,
                  weight_decay=1e-3)
    assert ap.D1 is ap.D2
    s = ap.x0["s"]
    low = solvers.converge_lower(ap, {"s": s}, ap.y_init, gtol=1e-12, max_iter=300)
    resid = float(torch.cat([v.reshape(-1) for v in ap.riemannian_lower_grad({"s": s}, low.y).values()]).norm())
    assert resid < 1e-10
    ref, _, _ = solvers.reference_hypergradient(ap, {"s": s}, low.y, method="exact")
    fo = regime.first_order(ap, s, low.y, ap.D1)
    assert cosine(fo, ref) > 1 - 1e-12
    assert rel_error(fo, ref) < 1e-8


# -- theory_checks' problems are debora's adapters ------------------------------------------------------
@pytest.mark.parametrize("kind,cls", [("matrix", debora.MatrixAdapter), ("cp", debora.CPConv2dAdapter)])
@pytest.mark.parametrize("basis", ["euclidean", "oblique", "stiefel"])
def test_problem_layers_are_debora_adapters(kind, cls, basis):
    ap = make_toy(kind, basis)
    layers = debora.adapter_layers(ap.model)
    assert list(layers) == ["layer"] and isinstance(layers["layer"], cls)
    assert ap.adapters["layer"] is layers["layer"]
    # the problem's variables are debora's parameter names
    assert set(ap.x_debora(ap.x0)) == set(debora.upper_parameters(ap.model))
    assert set(ap.y_init) == set(debora.lower_parameters(ap.model))
    # a point away from the start: the problem's loss == the live adapted model == the merged model
    gen = torch.Generator().manual_seed(3)
    s = ap.x0["s"] * (1 + 0.5 * torch.rand(ap.r_total, generator=gen, dtype=D))
    y = {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=D) for k, v in ap.y_init.items()}
    ap.write({"s": s}, y)
    X = ap.D1["x"][:16]
    with torch.no_grad():
        out = ap.model(X)
        merged = debora.merge_and_unload(copy.deepcopy(ap.model))
        out_merged = merged(X)
    assert not debora.adapter_layers(merged)
    assert torch.allclose(out, out_merged, rtol=1e-12, atol=1e-12)
    batch = {"x": X, "y": ap.D1["y"][:16]}
    assert float(ap.task_loss({"s": s}, y, batch)) == pytest.approx(float(ap.loss_fn(out, batch)), rel=1e-13)
    # ΔW of the problem == the layer's delta_weight (the retracted bases were written into it)
    delta = ap.deltas_from(s, ap.factors(y))["layer"]
    assert torch.allclose(delta, layers["layer"].delta_weight().detach(), rtol=1e-12, atol=1e-14)
    # base weight is W0: the fold of oblique/Stiefel initial updates was undone
    assert torch.equal(layers["layer"].base.weight.detach(), ap.frozen["layer"])
    # bases written into the model are on debora's manifolds
    for k in ap.basis_keys():
        U = dict(ap.model.named_parameters())[k].detach()
        kind_k = ap.kinds[k]
        assert torch.allclose(U, debora.manifolds.retraction(kind_k, U), atol=1e-12)


# -- the regime checks' helpers ------------------------------------------------------------------------
def test_product_vertices_and_topk():
    V = regime.product_vertices([2, 3], 1.0, 1e-3)
    assert V.shape == (3 * 4, 5)
    for v in V:   # every row is a vertex of each block's floored simplex
        for blk, r in ((v[:2], 2), (v[2:], 3)):
            W = C.floored_simplex_vertices(r, 1.0, 1e-3)
            assert bool(((W - blk).abs().max(1).values < 1e-15).any())
    hist = {"s": [torch.tensor(t, dtype=D) for t in ([3., 2., 1.], [1., 2., 3.], [1., 2.5, 3.], [1., 2.5, 3.])]}
    ts = regime.topk_stats(hist, 2)
    assert ts["overlap"] == [0.5, 1.0, 1.0] and ts["changes"] == 1 and ts["n_id"] == 1
    assert ts["final"] == [1, 2]


def test_regime_checks_run_on_a_small_toy():
    """The default-preset regime checks end to end on a reduced toy (rank 4, 128 examples, 20 iterations)."""
    import copy as _copy

    from theory_checks.problems.base import split_halves
    from theory_checks.study import Study, StudyConfig
    ap = make_toy("matrix", "oblique", rank=4, n=128, split="same", s0=0.01, scaling=4.0, tau=1.0,
                  weight_decay=1e-3, name="toy-default-small")
    cfg = StudyConfig(lbfgs_iter=300, lbfgs_gtol=1e-10, cg_tol=1e-10)
    st = Study(ap, cfg, log=lambda *a: None)
    ap_h = _copy.copy(ap)
    ap_h.D1, ap_h.D2 = split_halves(ap.D1, torch.randperm(128, generator=torch.Generator().manual_seed(0)))
    ap_h.problem = bilevel.BilevelProblem(ap_h.upper_loss, ap_h.lower_loss)
    regime.run(st, Study(ap_h, cfg, log=lambda *a: None), dict(T_outer=20, n_ref=2, chi_samples=2))
    by_check = {}
    for r in st.rows:
        by_check.setdefault(r["check"], []).append(r)
        assert r["verdict"] in ("holds", "fails", "inconclusive") and r["criterion"]
    assert set(by_check) == {regime.NAME_ENV, regime.NAME_CHI, regime.NAME_ID}
    env = next(r for r in by_check[regime.NAME_ENV] if r["quantity"].endswith("upper = lower (f1 = g)"))
    assert env["verdict"] == "holds" and env["data"]["rel"] < 1e-8
    lower = next(r for r in by_check[regime.NAME_ENV] if r["quantity"].startswith("B*(s0)"))
    assert lower["verdict"] == "holds" and 0.0 <= lower["data"]["coherence"]["layer"] <= 1.0 + 1e-12
    assert len(by_check[regime.NAME_ID]) == 2


def test_regime_run_follows_the_trainers_lr_and_fw_step_schedules(monkeypatch):
    """fw_run models the trainer's loop: each lower Adam step at lr × lr_factor of that step (the
    default's lr_schedule), and with fw_step_schedule="lr" the FW step γ × the iteration's factor."""
    from debora.train.lr_schedule import lr_factor
    from theory_checks.study import Study, StudyConfig
    ap = make_toy("matrix", "oblique", rank=3, n=64, split="same", s0=0.01, scaling=4.0, tau=1.0,
                  weight_decay=1e-3, name="toy-schedule")
    st = Study(ap, StudyConfig(lbfgs_iter=50), log=lambda *a: None)
    lrs, gammas = [], []
    lower = solvers.lower_steps

    def record_lower(*a, lr, **k):
        lrs.append(lr)
        return lower(*a, lr=lr, **k)

    step = bilevel.frank_wolfe.AwayStepFW.step

    def record_fw(self, *a, **k):
        gammas.append(self.rule.gamma)
        return step(self, *a, **k)

    monkeypatch.setattr(solvers, "lower_steps", record_lower)
    monkeypatch.setattr(bilevel.frank_wolfe.AwayStepFW, "step", record_fw)
    P = dict(regime.PRESET, lr_schedule="linear", warmup=0.1, fw_step_schedule="lr", T_max=2)
    monkeypatch.setattr(regime, "PRESET", P)
    T = 10
    regime.fw_run(st, T, n_ref=0, budget=False)
    want = [P["lr"] * lr_factor("linear", t, 2 * T, 0.1) for t in range(2 * T)]
    assert lrs == pytest.approx(want, rel=1e-12, abs=1e-18)
    assert gammas == pytest.approx([P["gamma"] * w / P["lr"] for w in want[1::2]], rel=1e-12, abs=1e-18)
