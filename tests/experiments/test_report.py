"""The report: built from run dirs alone, self-contained, escaped, valid HTML; reproduce reuses runs."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from markupsafe import escape

from bnlab.cli import main
from bnlab.experiments import EXPERIMENTS
from bnlab.report import build
from bnlab.reproduce import reproduce
from bnlab.runs import RunDir

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def tiny_runs(tiny_reproduce):
    return tiny_reproduce


def test_report_lists_every_claim_and_embeds_its_figures(tiny_runs):
    out, report, rows = tiny_runs
    html = report.read_text()
    assert [(r["experiment"], r["id"]) for r in rows] == [(n, c.id) for n in sorted(EXPERIMENTS) for c in EXPERIMENTS[n].claims]
    for name, exp in EXPERIMENTS.items():
        for c in exp.claims:
            assert f'data-claim="{name}/{c.id}"' in html and str(escape(c.statement)) in html
        n_figs = len(list(next((out / name).iterdir()).glob("figures/*.png")))
        assert n_figs >= 1
    assert html.count("data:image/png;base64,") >= len(EXPERIMENTS)
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere
    for status in ("holds", "fails", "inconclusive"):
        n = sum(r["status"] == status for r in rows)
        assert f'<span class="badge {status}">{status}</span> {n}' in html


def test_report_is_valid_html(tiny_runs):
    html5lib = pytest.importorskip("html5lib")
    _, report, _ = tiny_runs
    parser = html5lib.HTMLParser(strict=True)
    parser.parse(report.read_text())  # raises on any parse error
    assert not parser.errors


def test_report_rebuilds_from_run_dirs_alone(tiny_runs, tmp_path, capsys):
    out, report, _ = tiny_runs
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "report.html").unlink()
    assert main(["report", str(copy)]) == 0
    assert "report:" in capsys.readouterr().out
    assert (copy / "report.html").read_text().count("claim-row") == report.read_text().count("claim-row")


def test_user_strings_are_escaped(tiny_runs, tmp_path):
    out, _, _ = tiny_runs
    copy = tmp_path / "hostile"
    shutil.copytree(out, copy)
    (run_path,) = [p for p in (copy / "large-lr").iterdir() if (p / "complete").exists()]
    run = RunDir(run_path)
    verdicts = run.read_json("verdicts.json")
    verdicts["verdicts"][0]["detail"] = "<script>alert('x')</script> & <b>bold</b>"
    verdicts["verdicts"][1]["rule"] = "<i>rule</i>"
    run.write_json("verdicts.json", verdicts)
    cfg = run.read_json("config.json")
    cfg["config"]["data"] = '"><img src=x onerror=alert(1)>'
    run.write_json("config.json", cfg)
    html = build(copy).read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html
    assert "<i>rule</i>" not in html and "&lt;i&gt;rule&lt;/i&gt;" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


def test_report_reads_run_dirs_only_and_imports_no_experiment(tiny_runs, tmp_path):
    out, report, _ = tiny_runs
    code = ("import sys, bnlab.report as r; r.build(sys.argv[1], sys.argv[2]); "
            "bad = sorted(m for m in sys.modules if m.startswith('bnlab.experiments')); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "r.html")], check=True)
    strip = lambda h: h.split("<p class=\"muted\">Generated", 1)[1].split("</p>", 1)[1]
    assert strip((tmp_path / "r.html").read_text()) == strip(report.read_text())


def test_report_shows_each_rule_with_its_numbers(tiny_runs):
    _, report, rows = tiny_runs
    html = report.read_text()
    for r in rows:
        assert r["rule"] and str(escape(r["rule"])) in html


def test_report_of_an_empty_dir_is_a_user_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no complete experiment runs" in capsys.readouterr().err


def test_reproduce_reuses_complete_runs(tiny_runs, capsys):
    out, _, rows = tiny_runs
    report, again = reproduce(profile="tiny", out=out, device="cpu", progress=False)
    assert all(r["reused"] for r in again)
    assert [(r["id"], r["status"], r["value"]) for r in again] == [(r["id"], r["status"], r["value"]) for r in rows]


def test_reproduce_rejects_unknown_names(tmp_path, capsys):
    assert main(["reproduce", "--only", "large-lr,nope", "--out", str(tmp_path / "r")]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (make test installs it)")
def test_report_renders_in_headless_chromium(tiny_runs):
    playwright = pytest.importorskip("playwright.sync_api")
    _, report, rows = tiny_runs
    ARTIFACTS.mkdir(exist_ok=True)
    problems = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        page.goto(report.resolve().as_uri())
        page.wait_for_load_state("load")
        claims = page.eval_on_selector_all("tr.claim-row", "rows => rows.map(r => r.dataset.claim)")
        images_ok = page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        n_images = page.evaluate("document.images.length")
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()
    assert problems == []
    assert claims == [f"{r['experiment']}/{r['id']}" for r in rows]
    assert n_images >= 1 and images_ok
