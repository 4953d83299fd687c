"""`fedprop report`: files, tables, figures, and that the HTML renders in headless Chromium."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from simulations.cli import main as fedprop
from simulations.report import ReportError, write_report

# 1 round-curve figure + per head: AUC bars, lift bars, lift chart, reliability diagram
RUN_FIGURES = 1 + 2 * 4
CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p and Path(p).exists()), None)
PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.filter.call(document.images, function (i) { return i.src.indexOf('data:image/png;base64,') === 0; });
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 100 && i.naturalHeight > 100; });
  document.title = 'FIGURES ' + imgs.length + ' RENDERED ' + ok.length;
});
</script>"""


def _pngs(html: str) -> int:
    return len(re.findall(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', html))


def test_run_report_files_tables_and_figures(run_dir):
    paths = write_report(run_dir)
    assert sorted(p.name for p in paths.values()) == ["report.html", "report.json", "report.md"]
    assert not list(Path(run_dir).glob(".report.*.tmp"))  # atomic writes leave no temp files
    html = (run_dir / "report.html").read_text()
    assert _pngs(html) == RUN_FIGURES
    assert "http://" not in html and "https://" not in html  # self-contained
    for text in ("Federation value per partner", "Configuration", "Privacy", "model_card_churn.md",
                 "churn: reliability diagram", "churn: lift chart", "Metric curves per round"):
        assert text in html, text
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["kind"] == "run" and len(rep["figures"]) == RUN_FIGURES
    assert sorted(rep["federation_value"]) == ["churn", "propensity"]
    assert sorted(rep["federation_value"]["churn"], key=int) == ["0", "1", "2"]
    assert rep["rounds"]["churn"]["round"] == [1, 2, 3]
    assert rep["config"]["privacy"]["epsilon"] == 3.0
    md = (run_dir / "report.md").read_text()
    assert "| churn | 2 |" in md and "gain AUC" in md and "data:image" not in md
    # the headline compares pooled with pooled (it put a per-partner mean of local-only AUCs beside pooled ones)
    summ = json.loads((run_dir / "summary.json").read_text())["tasks"]["churn"]
    assert rep["headline"]["churn"]["local_only_auc_pooled"] == summ["local_only_auc_pooled"] is not None
    assert "| fed-DP AUC | centralized AUC | local-only AUC | personalised AUC |" in md and "AUC (mean)" not in md
    # the accountant named is the run's own (the report once said "Opacus RDP" for every run, tight ones included)
    acc = rep["config"]["privacy"]["accountant"]
    assert f"accountant: {acc}: every DP-SGD round" in md and ("Opacus RDP" in md) == (acc == "opacus")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package `chromium`; .ci/run installs it)")
def test_report_html_renders_in_headless_chromium(run_dir, tmp_path):
    write_report(run_dir)
    page = tmp_path / "probe.html"
    page.write_text((run_dir / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    profile = tmp_path / "chromium-profile"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--run-all-compositor-stages-before-draw",
            "--virtual-time-budget=5000"]
    dom = subprocess.run(args + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(.*?)</title>", dom.stdout)
    assert title, f"no DOM from chromium (rc {dom.returncode}): {dom.stderr[-2000:]}"
    assert title.group(1) == f"FIGURES {RUN_FIGURES} RENDERED {RUN_FIGURES}"
    shot = tmp_path / "shot.png"
    subprocess.run(args + ["--window-size=1000,1400", f"--screenshot={shot}", (run_dir / "report.html").as_uri()],
                   capture_output=True, text=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as im:
        colors = im.convert("RGB").resize((100, 140)).getcolors(maxcolors=100_000)
    assert colors is not None and len(colors) > 20, "the screenshot is blank"


def test_sweep_report_has_privacy_utility_curve(sweep_dir):
    write_report(sweep_dir)
    rep = json.loads((sweep_dir / "report.json").read_text())
    assert rep["kind"] == "sweep" and [Path(r["dir"]).name for r in rep["runs"]] == ["0", "1", "2"]
    pts = rep["points"]["churn"]
    assert [p["target_epsilon"] for p in pts] == [0.5, 2.0, 8.0]
    assert all(p["centralized_auc"] is not None and p["local_only_auc_mean"] is not None for p in pts)
    assert rep["figures"][:2] == ["churn: privacy-utility curve", "propensity: privacy-utility curve"]
    html = (sweep_dir / "report.html").read_text()
    assert _pngs(html) == 2 + 3 * RUN_FIGURES
    assert "| churn | 2 | 8.00 |" in (sweep_dir / "report.md").read_text()


def test_report_command_and_refusal(run_dir, tmp_path, capsys):
    assert fedprop(["report", str(run_dir)]) == 0
    assert str(run_dir / "report.html") in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="neither a fedprop run directory"):
        write_report(tmp_path / "empty")
    assert fedprop(["report", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "fedprop report:" in err and "Traceback" not in err
