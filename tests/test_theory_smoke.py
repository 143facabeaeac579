"""Smoke run of the toy checks in reduced size, through the command line entry point."""
import json
import os

from theory_checks.__main__ import main

VERDICTS = {"holds", "fails", "inconclusive"}


def test_toy_checks_quick(tmp_path):
    out = str(tmp_path / "report")
    assert main(["--problem", "toy", "--checks", "paper", "--quick", "--device", "cpu", "--out", out]) == 0
    for f in ("report.md", "report.json", "toy-matrix-euclidean.png"):
        assert os.path.exists(os.path.join(out, f)), f
    doc = json.load(open(os.path.join(out, "report.json")))
    rows = doc["rows"]
    checks = {r["check"] for r in rows}
    assert {"Thm 4.1", "Assumption 6.1", "Lipschitz M", "Thm 6.2", "Thm 6.5"} <= checks
    assert all(r["verdict"] in VERDICTS and r["criterion"] for r in rows)
    assert not any(r["quantity"] == "check raised an error" for r in rows)
    by_q = {r["quantity"]: r for r in rows}
    # the reference hypergradient is verified against CG and finite differences on the toy
    ref = by_q["reference ∇F: converged CG and FD vs dense exact"]
    assert ref["verdict"] == "holds"
    # the problem is debora's adapters, and the library estimator is the one measured
    lib = next(r for q, r in by_q.items() if q.startswith("debora adapters: "))
    assert lib["verdict"] == "holds"
    assert lib["data"]["dense_types"] == ["MatrixAdapter"]
    # K on the quadratic toy equals its closed form (λ_max of XᵀX/N)
    from theory_checks.problems.toy import analytic_K, make_toy
    K = next(r for r in rows if r["quantity"].startswith("K = "))["data"]["K"]
    assert abs(K - analytic_K(make_toy("matrix", "euclidean"))) < 1e-8 * K
    md = open(os.path.join(out, "report.md")).read()
    assert "| check | instance | quantity | measured | verdict |" in md


def test_cut_check_through_the_command_line(tmp_path):
    """`--checks cut` runs only the default's SVD-cut check, with its rows, report and scatter plot."""
    out = str(tmp_path / "cut")
    assert main(["--problem", "toy", "--checks", "cut", "--device", "cpu", "--out", out]) == 0
    doc = json.load(open(os.path.join(out, "report.json")))
    assert {r["check"] for r in doc["rows"]} == {"SVD cut [default]"}
    assert all(r["verdict"] in VERDICTS and r["criterion"] for r in doc["rows"])
    assert os.path.exists(os.path.join(out, "toy-matrix-cut.png"))
