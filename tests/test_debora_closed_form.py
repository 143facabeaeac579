"""The closed-form hypergradient equals its definition (autograd), and bilevel_problem runs estimators."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel
import debora

D = torch.float64


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 6)
        self.classifier = nn.Linear(6, 3)

    def forward(self, pixel_values):
        h = torch.tanh(self.conv(pixel_values)).flatten(1)
        return self.classifier(torch.tanh(self.fc(h)))


def _model(basis="euclidean", seed=0):
    torch.manual_seed(seed)
    model = Tiny().to(D)
    debora.inject(model, debora.DeboraConfig(target_modules=["conv", "fc"], init_rank=3, basis=basis,
                                             modules_to_save=["classifier"]))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move away from the ΔW = 0 start so every term is non-trivial
        for n, p in debora.lower_parameters(model).items():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=D))
        for p in debora.upper_parameters(model).values():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=D) + 0.2)
    debora.retract(model)
    return model


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(5, 3, 4, 4, generator=gen, dtype=D),
            "labels": torch.randint(0, 3, (5,), generator=gen)}


def loss_fn(out, batch):
    return F.cross_entropy(out, batch["labels"])


def _definition(model, batch, project=False):
    """G(s) = ∂_s f1 − diag(Σ_k U_kᵀ ∂_{U_k} f1) ⊙ s⁻¹ by plain autograd on the live module."""
    up = debora.upper_parameters(model)
    low = debora.lower_parameters(model)
    for p in up.values():
        p.requires_grad_(True)
    loss = loss_fn(model(batch["pixel_values"]), batch)
    names = list(up) + list(low)
    grads = dict(zip(names, torch.autograd.grad(loss, [up.get(n, low.get(n)) for n in names])))
    for p in up.values():
        p.requires_grad_(False)
    kinds = debora.manifolds.basis_kinds(model)
    out = {}
    for k, s in up.items():
        layer = k[:-2]
        corr = 0
        for b in "UVABCD":
            key = f"{layer}.{b}"
            if key in low:
                g = grads[key]
                if project:
                    g = debora.manifolds.project(kinds[key], low[key].detach(), g)
                corr = corr + torch.diagonal(low[key].detach().T @ g)
        out[k] = grads[k] - corr / s.detach()
    return out, grads


@pytest.mark.parametrize("basis", ["euclidean", "oblique", "stiefel"])
@pytest.mark.parametrize("basis_grad", ["euclidean", "riemannian"])
def test_closed_form_equals_definition(basis, basis_grad):
    model = _model(basis)
    batch = _batch()
    problem, x, y = debora.bilevel_problem(model, loss_fn)
    est = bilevel.estimators.get("debora-closed-form", basis_grad=basis_grad)
    res = est(problem, x, y, batch, batch)
    expected, _ = _definition(model, batch, project=basis_grad == "riemannian")
    assert list(res.grad) == list(expected)
    for k in expected:
        torch.testing.assert_close(res.grad[k], expected[k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.info.upper_value, loss_fn(model(batch["pixel_values"]), batch))


def test_homogeneity_identity():
    """f depends on component i only through s_i·u_i⊗v_i(⊗…), so diag(Uᵀ∂_U f) = s ⊙ ∂_s f for every
    basis: the Euclidean closed form is exactly (1 − d)·∂_s f1 (d = 2 matrix, 4 CP), and the Riemannian
    one on oblique/Stiefel bases is exactly ∂_s f1. Documented in debora.closed_form."""
    batch = _batch(3)
    for basis in ("euclidean", "oblique"):
        model = _model(basis, seed=4)
        problem, x, y = debora.bilevel_problem(model, loss_fn)
        first = bilevel.estimators.get("first-order")(problem, x, y, batch, batch).grad
        euc = bilevel.estimators.get("debora-closed-form")(problem, x, y, batch, batch).grad
        rie = bilevel.estimators.get("debora-closed-form", basis_grad="riemannian")(
            problem, x, y, batch, batch).grad
        for k, d in (("fc.s", 2), ("conv.s", 4)):
            torch.testing.assert_close(euc[k], (1 - d) * first[k], rtol=1e-9, atol=1e-12)
            if basis != "euclidean":
                torch.testing.assert_close(rie[k], first[k], rtol=1e-9, atol=1e-12)


def test_every_bilevel_estimator_runs_on_the_model():
    model = _model("oblique")
    batch = _batch()
    problem, x, y = debora.bilevel_problem(model, loss_fn)
    assert set(x) == {"conv.s", "fc.s"}
    assert set(y) == {f"conv.{b}" for b in "ABCD"} | {"fc.U", "fc.V", "classifier.weight", "classifier.bias"}
    named = dict(model.named_parameters())
    assert all(x[k].data_ptr() == named[k].data_ptr() and not x[k].requires_grad for k in x)
    # cheap settings: this test checks plumbing (names, shapes, finiteness), not accuracy
    # The factorised lower level is exactly singular (u_i → c·u_i, v_i → v_i/c leaves ΔW unchanged),
    # so the dense solve needs Tikhonov damping.
    opts = {"exact": dict(damping=1e-3), "cg": dict(maxiter=3), "fixed-point": dict(maxiter=3, eta=1e-3),
            "neumann": dict(terms=3, eta=1e-3), "stochastic-neumann": dict(terms=3, eta=1e-3),
            "unrolled": dict(steps=2, lr=1e-3)}
    ran = set()
    for name in bilevel.estimators.available():
        lower = bilevel.BatchStream([batch]) if name == "stochastic-neumann" else batch
        res = bilevel.estimators.get(name, **opts.get(name, {}))(problem, x, y, batch, lower)
        assert set(res.grad) == set(x) and all(torch.isfinite(v).all() for v in res.grad.values()), name
        ran.add(name)
    assert {"debora-closed-form", "first-order", "cg", "exact", "unrolled"} <= ran


def test_tuple_batch_convention_and_hf_dict():
    model = _model()
    b = _batch()
    problem, x, y = debora.bilevel_problem(model, lambda out, batch: F.cross_entropy(out, batch[1]))
    v1 = problem.f(x, y, (b["pixel_values"], b["labels"]))
    problem2, _, _ = debora.bilevel_problem(model, loss_fn)
    torch.testing.assert_close(v1, problem2.f(x, y, b))
    # HF model computing its own loss: keep labels in the inputs
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=8,
                                                    num_labels=2)).eval()
    debora.inject(bert, debora.DeboraConfig(target_modules=["query", "value"], init_rank=2,
                                            modules_to_save=["classifier"]))
    hb = {"input_ids": torch.randint(0, 30, (3, 5)), "attention_mask": torch.ones(3, 5, dtype=torch.long),
          "labels": torch.tensor([0, 1, 1])}
    p_own, xb, yb = debora.bilevel_problem(bert, lambda out, batch: out.loss, label_keys=())
    p_ext, _, _ = debora.bilevel_problem(bert, lambda out, batch: F.cross_entropy(out.logits, batch["labels"]))
    torch.testing.assert_close(p_own.f(xb, yb, hb), p_ext.f(xb, yb, hb))
    res = bilevel.estimators.get("debora-closed-form")(p_ext, xb, yb, hb, hb)
    assert set(res.grad) == set(xb)


def test_closed_form_bad_inputs():
    with pytest.raises(ValueError, match="basis_grad"):
        bilevel.estimators.get("debora-closed-form", basis_grad="natural")
    model = _model()
    problem, x, y = debora.bilevel_problem(model, loss_fn)
    b = _batch()
    est = bilevel.estimators.get("debora-closed-form")
    with pytest.raises(ValueError, match="no basis"):
        est(problem, x, {"classifier.weight": y["classifier.weight"], "fc.U": y["fc.U"]}, b, b)
    plain = bilevel.BilevelProblem(problem.upper_loss, problem.lower_loss)
    with pytest.raises(ValueError, match="basis_kinds"):
        bilevel.estimators.get("debora-closed-form", basis_grad="riemannian")(plain, x, y, b, b)
    with pytest.raises(ValueError, match="no dEBORA adapters"):
        debora.bilevel_problem(Tiny(), loss_fn)
