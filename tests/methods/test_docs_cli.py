"""The tutorials and the code in the method pages run and print what they claim; the
``tallskinny`` command line works; the MkDocs site builds with ``--strict``."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tallskinny import cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def run_script(path: Path, capsys) -> str:
    previous = torch.get_default_dtype()
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        torch.set_default_dtype(previous)
    return capsys.readouterr().out


def test_trust_region_tutorial(capsys):
    out = run_script(DOCS / "tutorials" / "trust_region.py", capsys)
    lam, lam_dense = map(float, re.search(r"λ = ([0-9.e+-]+) \(dense eigendecomposition ([0-9.e+-]+)\)", out).groups())
    assert abs(lam - lam_dense) <= 1e-6 * lam_dense
    ratio = float(re.search(r"‖s‖/Δ = ([0-9.]+)", out).group(1))
    assert abs(ratio - 1.0) <= 1e-8
    assert float(re.search(r"final loss ([0-9.e+-]+)", out).group(1)) < 0.05  # started at 0.5
    assert int(re.search(r"(\d+) negative", out).group(1)) > 0  # the Hessian is indefinite


def test_influence_tutorial(capsys):
    out = run_script(DOCS / "tutorials" / "influence.py", capsys)
    assert "flipped examples among the 3 most self-influential: 2 of 2" in out


def test_laplace_tutorial(capsys):
    out = run_script(DOCS / "tutorials" / "laplace.py", capsys)
    assert "predictive std grows away from the data: True" in out
    alpha = float(re.search(r"optimal prior precision α = ([0-9.e+-]+)", out).group(1))
    values = [float(v) for v in re.findall(r"log evidence at α = +[0-9.e+-]+: +([0-9.e+-]+)", out)]
    best = float(re.search(r"α = [0-9.e+-]+, log evidence ([0-9.e+-]+)", out).group(1))
    assert 1e-4 < alpha < 1e4 and all(best >= v for v in values)


@pytest.mark.parametrize("page", ["optim.md", "influence.md", "laplace.md"])
def test_method_page_code_runs(page):
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), flags=re.S)
    assert blocks
    namespace: dict = {"__name__": f"docs_{page}"}
    previous = torch.get_default_dtype()
    try:
        for code in blocks:
            exec(compile(code, page, "exec"), namespace)
    finally:
        torch.set_default_dtype(previous)
    if page == "influence.md":
        assert namespace["scores"].shape == (2, 12)
    if page == "laplace.md":
        assert namespace["var"].shape == (3, 2) and bool((namespace["var"] > 0).all())
    if page == "optim.md":
        assert namespace["opt"].last_step is not None


class _SteppedClock:
    """A ``time`` module whose ``perf_counter`` advances by ``tick`` seconds a call: the
    demo's wall-clock budget becomes a fixed number of steps (the same on a loaded machine:
    with the real clock a slow run could make one rejected trust-region step, or a few
    Adam steps that raise the full training loss, and fail "it trained")."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_demo_runs_and_writes_the_plot(tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(cli, "time", _SteppedClock(0.0625))  # a step counts 0.0625 s: 24 in 1.5 s
    argv = ["demo", "--budget", "1.5", "--depth", "4", "--width", "8", "--exact-batch", "4",
            "--gradient-batch", "32", "--out", str(tmp_path), "--check-batch", "2", "--batch", "4"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Adam" in out and "exact GGN trust region" in out
    png = tmp_path / "demo_loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "demo_results.json").read_text())
    for key in ("adam", "exact"):
        r = results[key]
        assert r["steps"] == 24 and 0 < r["train_loss"] < 10 and 0 <= r["test_acc"] <= 1
        assert r["history"][0][1] > r["train_loss"]  # it trained
    assert results["exactness"]["relative_error"] < 1e-9
    error = float(re.search(r"to a dense solve = ([0-9.e+-]+)", out).group(1))
    assert error < 1e-9
    spec = results["spectrum"]  # the demo ends with the exact histogram next to SLQ
    assert sum(spec["counts"]) + spec["zeros"] + spec["below"] + spec["above"] == spec["parameters"]
    assert (tmp_path / "demo_spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _small_trained_model():
    torch.manual_seed(0)
    model = cli.deep_mlp(4, 6, 64, 10, 0, torch.float64)
    with torch.no_grad():  # away from the orthogonal initialisation
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    (X, y), _ = cli.load_digits_data(0, torch.float64)
    return model, X[:3], y[:3]


def test_spectrum_checkpoint_and_picture_match_dense():
    pytest.importorskip("sklearn")
    import tallskinny as ts
    from tallskinny.testing import dense_hessian

    model, X, y = _small_trained_model()
    ev = torch.linalg.eigvalsh(dense_hessian(ts.Chain.from_sequential(model, torch.nn.CrossEntropyLoss()), X, y))
    rho = float(ev.abs().max())
    point = cli.checkpoint_spectrum(model, X, y, 1e-4)
    assert abs(point["top"] - float(ev[-1])) <= 1e-10 * rho and abs(point["bottom"] - float(ev[0])) <= 1e-10 * rho
    assert point["zero"] == pytest.approx(1e-4 * rho, rel=1e-9)
    assert point["negative"] == int((ev < -point["zero"]).sum()) > 0
    args = cli._parser().parse_args(["spectrum", "--bins", "20", "--slq-steps", "30"])
    pic = cli.spectrum_picture(model, X, y, args, progress=False)
    delta = pic["zero"]
    edges = torch.tensor(pic["edges"], dtype=torch.float64)
    zero = (ev >= -delta) & (ev < delta)
    assert pic["zeros"] == int(zero.sum()) > 0 and len(pic["counts"]) == 20
    assert pic["counts"] == torch.histogram(ev[~zero], bins=edges).hist.long().tolist()
    assert sum(pic["counts"]) + pic["zeros"] == pic["parameters"] == len(ev) and pic["below"] == pic["above"] == 0
    assert pic["negative"] == point["negative"]
    assert 0.99 * len(ev) <= sum(pic["slq"]["counts"]) <= len(ev)  # (its broadening leaks past the ends)


def test_spectrum_command_writes_json_and_pngs(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    argv = ["spectrum", "--steps", "5", "--every", "3", "--depth", "3", "--width", "6", "--batch", "2",
            "--exact-batch", "4", "--gradient-batch", "16", "--bins", "12", "--slq-steps", "20", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "spectrum [" in captured.err and "histogram [" in captured.err  # the progress bars
    results = json.loads((tmp_path / "spectrum.json").read_text())
    assert set(results) == {"model", "checkpoints", "histogram", "seconds"}
    points = results["checkpoints"]
    assert [c["step"] for c in points] == [0, 3, 5]
    for c in points:
        assert set(c) >= {"step", "time", "train_loss", "negative", "top", "bottom", "zero"}
        assert c["bottom"] < 0 < c["top"] and 0 <= c["negative"] < results["model"]["parameters"]
    hist = results["histogram"]
    assert sum(hist["counts"]) + hist["zeros"] + hist["below"] + hist["above"] == results["model"]["parameters"]
    assert hist["negative"] == points[-1]["negative"]  # same model, same batch, same cut
    for name in ("spectrum_training.png", "spectrum_histogram.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="budget"):
        cli.main(["demo", "--budget", "-1"])
    with pytest.raises(SystemExit, match="depth"):
        cli.main(["demo", "--depth", "2"])
    with pytest.raises(SystemExit, match="every"):
        cli.main(["spectrum", "--every", "0"])
    with pytest.raises(SystemExit, match="steps"):
        cli.main(["spectrum", "--steps", "0"])
    with pytest.raises(SystemExit, match="bins"):
        cli.main(["spectrum", "--bins", "2"])
    with pytest.raises(SystemExit, match="zero"):
        cli.main(["spectrum", "--zero", "0.7"])


def test_bench_runs_the_script_or_says_where_it_looked(tmp_path, capsys):
    script = tmp_path / "bench" / "chain.py"
    script.parent.mkdir()
    script.write_text("CALLS = []\ndef main(argv):\n    print('bench argv', argv)\n    return 0\n")
    assert cli.run_bench(["--quick"], candidates=[script]) == 0
    assert "bench argv ['--quick']" in capsys.readouterr().out
    missing = tmp_path / "nowhere" / "chain.py"
    assert cli.run_bench([], candidates=[missing]) == 2
    err = capsys.readouterr().err
    assert "bench/chain.py was not found" in err and str(missing) in err


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "index.html").read_text(encoding="utf-8")
    assert "solve_subproblem" in reference and "TrustRegion" in reference and "Laplace" in reference
    assert (tmp_path / "site" / "tutorials" / "trust_region.py").is_file()


def test_main_passes_everything_after_bench_on(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "run_bench", lambda argv, candidates=None: seen.append(list(argv)) or 0)
    assert cli.main(["bench", "--help", "--quick"]) == 0
    assert seen == [["--help", "--quick"]]
