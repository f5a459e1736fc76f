"""The tensorattn console script: check's exit codes and messages, and a tiny bench run."""

import json

import numpy as np
import pytest

from tensorattn.cli import EXIT_ERROR, EXIT_OK, EXIT_REFUSED, main


@pytest.mark.parametrize(
    "spec, B, code",
    [("pairwise", 2.5, EXIT_OK), ("pairwise", 3.0, EXIT_REFUSED),
     ("triple", 1.9, EXIT_OK), ("triple", 2.1, EXIT_REFUSED)],
)
def test_check_verdict_at_the_threshold(spec, B, code, capsys):
    # entries in [-B, B] with scale 1/d: B is the papers' entry bound; tau_2(4096) = 2.884, tau_3 = 2.026
    assert main(["check", "--spec", spec, "--n", "4096", "--d", "8", "--B", str(B), "--scale", "1/d"]) == code
    out = capsys.readouterr().out
    assert "Plan(" in out and "threshold tau_" in out
    if code == EXIT_REFUSED:
        assert "poly: REFUSED" in out and "SETH" in out
    else:
        assert "poly: allowed" in out and "degree" in out


def test_check_refuses_when_no_degree_certifies(capsys):
    argv = ["check", "--n", "1024", "--d", "8", "--B", "1", "--scale", "0.125", "--tol", "1e-6", "--max-degree", "2"]
    assert main(argv) == EXIT_REFUSED
    assert "No degree <= max_degree = 2" in capsys.readouterr().out


def test_check_npz(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "inputs.npz"
    q, k1, k2 = (rng.uniform(-1, 1, (256, 8)) for _ in range(3))
    np.savez(path, q=q, k1=k1, k2=k2)
    assert main(["check", "--npz", str(path), "--spec", "triple", "--scale", "1/d"]) == EXIT_OK
    assert "Scale:              0.125" in capsys.readouterr().out
    np.savez(path, q=q, k1=k1 * 3, k2=k2 * 3)
    assert main(["check", "--npz", str(path), "--spec", "triple", "--scale", "1/d"]) == EXIT_REFUSED
    np.savez(path, q=q, k=k1)
    assert main(["check", "--npz", str(path), "--spec", "pairwise"]) == EXIT_OK
    assert main(["check", "--npz", str(path), "--spec", "triple"]) == EXIT_ERROR
    assert "needs 'k1' and 'k2'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["check", "--n", "100", "--B", "1"], "needs --d"),
        (["check", "--spec", "pairwize", "--n", "100", "--d", "4", "--B", "1"], "unknown spec 'pairwize'"),
        (["check", "--npz", "/nonexistent.npz"], "/nonexistent.npz"),
        (["bench", "--suite", "huge"], "argument --suite: invalid choice: 'huge'"),
        (["bench", "--suite", "micro", "--parts", "everything"], "argument --parts: invalid choice: 'everything'"),
    ],
)
def test_errors_exit_2_with_message(argv, message, capsys):
    assert main(argv) == EXIT_ERROR
    assert message in capsys.readouterr().err


def test_usage_errors_and_help(capsys):
    assert main(["check", "--scale", "lots"]) == 2
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "bench" in capsys.readouterr().out


def test_bench_with_overrides(tmp_path, capsys):
    out = tmp_path / "res"
    argv = ["bench", "--suite", "micro", "--out", str(out), "--no-progress", "--no-plots", "--spec", "pairwise",
            "--backend", "poly", "exact", "--n", "32", "48", "--causal", "false", "true"]
    assert main(argv) == EXIT_OK
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == 8
    assert {(r["n"], r["backend"], r["causal"]) for r in results["rows"]} == {
        (n, b, c) for n in (32, 48) for b in ("poly", "exact") for c in (False, True)}
    assert results["command"].startswith("tensorattn bench --suite micro")
    assert (out / "report.md").exists() and (out / "results.csv").exists()
    assert "wrote" in capsys.readouterr().out


def test_bench_help_names_every_part():
    from tensorattn.bench import PARTS
    from tensorattn.cli import build_parser

    bench = next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("bench"))
    text = next(a.help for a in bench._actions if "--parts" in a.option_strings)
    assert text.split(": ", 1)[1].split() == list(PARTS)
