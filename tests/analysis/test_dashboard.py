"""The dashboard site: its data files, the CLI, and the pages in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from analysis_helpers import make_sae

from saekit.analysis.collect import feature_statistics
from saekit.analysis.dashboard import write_dashboard
from saekit.evals.api import heldout_token_batches
from saekit.models.tiny import TINY_TEXTS

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
HOOK = "blocks.1.hook_resid_pre"


def read_js(path: Path, name: str):
    """The JSON inside `window.NAME=...;` or `window.NAME(...);`."""
    text = path.read_text()
    match = re.fullmatch(rf"window\.{name}[=(](.*?)\)?;\n", text, re.DOTALL)
    assert match, f"{path} is not a {name} script"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def site(tmp_path_factory, hf_backend) -> tuple[Path, object]:
    sae = make_sae(HOOK)
    batches = heldout_token_batches(
        hf_backend.tokenizer, 1500, dataset=list(TINY_TEXTS) * 10, context_size=24
    )
    stats = feature_statistics(sae, hf_backend, batches, top_k=6)
    out = tmp_path_factory.mktemp("site")
    write_dashboard(stats, hf_backend.tokenizer, out, title="tiny <test>")
    return out, stats


def test_site_files_hold_the_statistics(site) -> None:
    out, stats = site
    index = read_js(out / "data" / "index.js", "SAEKIT_INDEX")
    assert index["d_sae"] == stats.d_sae == len(index["rows"])
    vocab = {int(k): v for k, v in read_js(out / "data" / "vocab.js", "SAEKIT_VOCAB").items()}
    latent = int(stats.max_act.argmax())
    data = read_js(out / "data" / "latents" / f"{latent}.js", "SAEKIT_LATENT")
    assert data["max"] == pytest.approx(float(stats.max_act[latent]), rel=1e-3)
    assert data["density"] == pytest.approx(float(stats.density[latent]))
    assert [e[0] for e in data["top"]] == pytest.approx(
        [e[0] for e in stats.top_examples(latent)], rel=1e-3
    )
    assert data["hist"]["counts"] == stats.hist_counts[latent].tolist()
    assert len(data["promoted"]) == 10 and len(data["suppressed"]) == 10
    # Every token a page shows has its string.
    shown = {t for e in data["top"] for t in e[1] if t >= 0} | {t for t, _ in data["promoted"]}
    assert shown <= set(vocab)
    assert not list(out.rglob("*.json"))  # nothing a file:// page would have to fetch


def test_cli_writes_the_site(tmp_path, tokenizer) -> None:
    from saekit.models.tiny import tiny_gpt2

    model_dir = tmp_path / "model"
    tiny_gpt2(300).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    sae = make_sae(HOOK)
    sae.cfg.metadata.model_name = str(model_dir)
    sae.save(tmp_path / "sae")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TINY_TEXTS * 5))
    out = tmp_path / "dash"
    from saekit.cli import main

    code = main(["dashboard", str(tmp_path / "sae"), "--out", str(out), "--dataset",
                 str(texts), "--tokens", "600", "--context-size", "20", "--top-k", "4"])
    assert code == 0
    assert (out / "index.html").is_file() and (out / "feature_stats.safetensors").is_file()
    assert len(list((out / "data" / "latents").glob("*.js"))) == 64
    assert main(["dashboard", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def _driver(profile: Path):
    if not CHROMIUM.exists() or not Path(CHROMEDRIVER).exists():
        pytest.skip(
            "needs Debian's chromium and chromium-driver (/usr/bin/chromium, "
            "/usr/bin/chromedriver): apt-get install -y chromium chromium-driver"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (dev extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


@pytest.fixture(scope="module")
def browser(tmp_path_factory, monkeypatch_module):
    # Selenium would otherwise try to report usage statistics over the network.
    monkeypatch_module.setenv("SE_AVOID_STATS", "true")
    driver = _driver(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def test_pages_load_in_a_browser_with_highlighted_tokens(site, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out, stats = site
    browser.get((out / "index.html").as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#latents tbody tr")
    assert len(rows) == stats.d_sae
    assert browser.find_element(By.ID, "title").text == "tiny <test>"
    # Sorted by density, highest first, by default; a click on "max act" sorts by max.
    browser.find_element(By.CSS_SELECTOR, "th[data-key='2']").click()
    first = browser.find_element(By.CSS_SELECTOR, "#latents tbody tr").get_attribute(
        "data-latent"
    )
    assert int(first) == int(stats.max_act.argmax())
    # Search narrows the table to latents whose top tokens match.
    box = browser.find_element(By.ID, "search")
    box.send_keys("zzzz-no-such-token")
    assert not browser.find_elements(By.CSS_SELECTOR, "#latents tbody tr")
    assert _errors(browser) == []

    latent = int(stats.max_act.argmax())
    browser.get((out / "latent.html").as_uri() + f"#{latent}")
    WebDriverWait(browser, 10).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#top .tok.active")
    )
    assert browser.find_element(By.ID, "title").text == f"Latent {latent}"
    active = browser.find_elements(By.CSS_SELECTOR, "#top .tok.active")
    assert active[0].get_attribute("title").startswith("activation ")
    assert "rgba(232, 119, 28" in active[0].get_attribute("style")
    centers = browser.find_elements(By.CSS_SELECTOR, "#top .example .tok.center")
    assert len(centers) == len(stats.top_examples(latent))
    assert browser.find_elements(By.CSS_SELECTOR, "#histogram rect.bar")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#promoted li")) == 10
    assert browser.find_elements(By.CSS_SELECTOR, "#bands .band")
    # Following "next" (or "previous" from the last latent) loads that latent in place.
    step, other = ("next", latent + 1) if latent + 1 < stats.d_sae else ("prev", latent - 1)
    browser.find_element(By.ID, step).click()
    WebDriverWait(browser, 10).until(
        lambda d: d.find_element(By.ID, "title").text == f"Latent {other}"
    )
    assert _errors(browser) == []


def test_python_module_runs_as_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "saekit.cli", "dashboard", "--help"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0 and "--out" in result.stdout
