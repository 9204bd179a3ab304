"""The dashboard site: its data files, the CLI, and the pages in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from analysis_helpers import make_sae

from saekit.analysis.collect import feature_statistics
from saekit.analysis.dashboard import write_dashboard
from saekit.analysis.explanations import Explanation, append_explanations
from saekit.analysis.stats import FeatureStats
from saekit.evals.api import heldout_token_batches
from saekit.models.tiny import TINY_TEXTS

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
HOOK = "blocks.1.hook_resid_pre"
LEFT, RIGHT = 16, 6  # wider than the 12 + 4 a page shows first, so that it can widen
BYTE_TOKEN, NEWLINE_TOKEN = 100, 201  # the tiny tokenizer's "¤" (byte 0xA4) and "Ċ" ("\n")


def read_js(path: Path, name: str):
    """The JSON inside `window.NAME(...);`."""
    text = path.read_text()
    match = re.fullmatch(rf"window\.{name}\((.*)\);\n", text, re.DOTALL)
    assert match, f"{path} is not a {name} script"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def site(tmp_path_factory, hf_backend) -> tuple[Path, FeatureStats, dict[int, Explanation]]:
    sae = make_sae(HOOK)
    batches = heldout_token_batches(
        hf_backend.tokenizer, 1500, dataset=list(TINY_TEXTS) * 10, context_size=24
    )
    stats = feature_statistics(sae, hf_backend, batches, top_k=6, left=LEFT, right=RIGHT)
    # One latent promotes a lone byte and a newline first: how the pages spell them is tested.
    odd = int(stats.max_act.argmin())
    stats.logit_top[0][odd, :2] = torch.tensor([BYTE_TOKEN, NEWLINE_TOKEN])
    best = int(stats.fire_count.argmin())
    explanations = {
        3: Explanation(3, "the letter <e>", {"detection": {"balanced_accuracy": 0.6}}, "m1"),
        best: Explanation(best, "commas", {"detection": {"balanced_accuracy": 0.9},
                                           "fuzzing": {"balanced_accuracy": 0.7}}, "m1"),
        40: Explanation(40, "unscored"),
    }
    out = tmp_path_factory.mktemp("site")
    write_dashboard(stats, hf_backend.tokenizer, out, title="tiny <test>", sae_name="tiny-sae",
                    model_name="tiny-gpt2", hook_name=HOOK, explanations=explanations,
                    shard_size=16)
    return out, stats, explanations


def test_site_reads_the_saved_statistics(site) -> None:
    out, stats, _ = site
    loaded = FeatureStats.load(out)  # the very files the pages load: no second copy
    assert torch.equal(loaded.fire_count, stats.fire_count)
    latent = int(stats.max_act.argmax())
    assert [e[1] for e in loaded.top_examples(latent)] == [
        e[1] for e in stats.top_examples(latent)]
    assert len(list((out / "feature_stats").glob("*.js"))) == 4  # 64 latents, 16 a shard
    vocab = {int(k): v for k, v in read_js(out / "data" / "vocab.js", "SAEKIT_VOCAB").items()}
    shown = {t for e in stats.top_examples(latent) for t in e[1] if t >= 0}
    shown |= set(stats.logit_top[0][latent].tolist()) | set(stats.logit_bottom[0][latent].tolist())
    assert shown <= set(vocab)
    assert vocab[BYTE_TOKEN] == "\\xa4" and vocab[NEWLINE_TOKEN] == "\n"
    site_info = read_js(out / "data" / "site.js", "SAEKIT_SITE")
    assert (site_info["sae"], site_info["model"], site_info["hook"]) == (
        "tiny-sae", "tiny-gpt2", HOOK)
    assert not list(out.rglob("*.json"))  # nothing a file:// page would have to fetch


def test_cli_writes_the_site(tmp_path, tokenizer) -> None:
    from saekit.cli import main
    from saekit.models.tiny import tiny_gpt2

    model_dir = tmp_path / "model"
    tiny_gpt2(300).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    sae = make_sae(HOOK)
    sae.cfg.metadata.model_name = str(model_dir)
    sae.save(tmp_path / "sae")
    append_explanations(tmp_path / "sae", [Explanation(5, "fives")])  # found beside the SAE
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TINY_TEXTS * 5))
    out = tmp_path / "dash"
    args = ["--dataset", str(texts), "--tokens", "600", "--context-size", "20", "--top-k", "4"]

    code = main(["dashboard", str(tmp_path / "sae"), "--out", str(out), *args,
                 "--left", "3", "--right", "1"])
    assert code == 0
    assert (out / "index.html").is_file()
    stats = FeatureStats.load(out)
    assert stats.d_sae == 64 and stats.left == 3 and stats.top.tokens.shape[1:] == (4, 5)
    site_info = read_js(out / "data" / "site.js", "SAEKIT_SITE")
    assert site_info["hook"] == HOOK and site_info["model"] == str(model_dir)
    assert site_info["explained_shards"] == [0]
    assert read_js(out / "data" / "explanations" / "000000.js",
                   "SAEKIT_EXPLANATIONS")["items"]["5"]["explanation"] == "fives"

    assert main(["dashboard", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert main(["dashboard", str(tmp_path / "sae"), "--out", str(tmp_path / "o2"),
                 "--explanations", str(tmp_path / "missing.jsonl"), *args]) == 2
    wrong = tmp_path / "wrong.jsonl"
    append_explanations(wrong, [Explanation(64, "beyond the last latent")])
    assert main(["dashboard", str(tmp_path / "sae"), "--out", str(tmp_path / "o3"),
                 "--explanations", str(wrong), *args]) == 2
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


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


def _errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def _rows(driver) -> list[int]:
    from selenium.webdriver.common.by import By

    return [int(tr.get_attribute("data-latent"))
            for tr in driver.find_elements(By.CSS_SELECTOR, "#latents tbody tr")]


def _wait(driver, condition, timeout: float = 10):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def _type(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "search")
    box.clear()
    box.send_keys(text)


def test_index_sorts_and_searches(site, browser, tokenizer) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    out, stats, explanations = site
    browser.get((out / "index.html").as_uri())
    _wait(browser, lambda d: len(_rows(d)) == stats.d_sae)
    assert browser.find_element(By.ID, "title").text == "tiny <test>"
    source = browser.find_element(By.ID, "source").text
    assert "SAE tiny-sae" in source and "model tiny-gpt2" in source and HOOK in source
    # By latent number by default: the order every other tool numbers latents in.
    assert _rows(browser) == list(range(stats.d_sae))
    browser.find_element(By.CSS_SELECTOR, "th[data-key='max']").click()
    assert _rows(browser)[0] == int(stats.max_act.argmax())
    browser.find_element(By.CSS_SELECTOR, "th[data-key='density']").click()
    densities = [float(stats.density[i]) for i in _rows(browser)]
    assert densities == sorted(densities, reverse=True)
    browser.find_element(By.ID, "order").click()  # lowest first
    assert _rows(browser)[0] == int(stats.fire_count.argmin())

    # Explanation score: best first, unexplained latents last; the text shows in the row.
    Select(browser.find_element(By.ID, "sort")).select_by_value(
        "score:detection.balanced_accuracy")
    best = max(explanations, key=lambda i: explanations[i].score())
    rows = _rows(browser)
    assert rows[:2] == [best, 3] and set(rows) == set(range(stats.d_sae))
    cell = f"#latents tbody tr[data-latent='{best}'] td.explanation"
    _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, cell).text.startswith("commas"))
    assert "(0.900)" in browser.find_element(By.CSS_SELECTOR, cell).text

    # Search by latent number, and by token: latents that fire on, or promote, a token
    # whose text contains the query.
    _type(browser, "7")
    assert _rows(browser) == [7]
    _type(browser, "#12")
    assert _rows(browser) == [12]
    query = "th"
    expected = set()
    for latent in range(stats.d_sae):
        ids = [e[1][LEFT] for e in stats.top_examples(latent)]
        ids += stats.logit_top[0][latent].tolist()
        if any(query in tokenizer.decode([t]).lower() for t in ids):
            expected.add(latent)
    assert 0 < len(expected) < stats.d_sae
    _type(browser, query.upper())
    assert set(_rows(browser)) == expected
    _type(browser, "zzzz-no-such-token")
    assert _rows(browser) == []
    assert "0 shown" in browser.find_element(By.ID, "shown").text
    # The state is in the address: a reload keeps sort order and search.
    browser.refresh()
    _wait(browser, lambda d: d.find_element(By.ID, "search").get_attribute("value")
          == "zzzz-no-such-token")
    assert Select(browser.find_element(By.ID, "sort")).first_selected_option.get_attribute(
        "value") == "score:detection.balanced_accuracy"
    # The overview histogram of log10 densities has counts on its axis.
    browser.find_element(By.CSS_SELECTOR, "#overview summary").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#density-histogram rect.bar")
    assert browser.find_elements(By.CSS_SELECTOR, "#density-histogram .y-tick")
    assert _errors(browser) == []


def test_latent_page(site, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    out, stats, explanations = site
    loaded = FeatureStats.load(out)
    latent = int(stats.max_act.argmax())
    browser.get((out / "latent.html").as_uri() + f"#{latent}")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#top .tok.active"))
    assert browser.find_element(By.ID, "title").text == f"Latent {latent}"
    source = browser.find_element(By.ID, "source").text
    assert "SAE tiny-sae" in source and "model tiny-gpt2" in source and HOOK in source
    active = browser.find_elements(By.CSS_SELECTOR, "#top .tok.active")
    assert "activation " in active[0].get_attribute("title")
    assert "rgba(232, 119, 28" in active[0].get_attribute("style")
    top = loaded.top_examples(latent)
    centers = browser.find_elements(By.CSS_SELECTOR, "#top .example .tok.center")
    assert len(centers) == len(top)
    assert [float(v.text) for v in browser.find_elements(By.CSS_SELECTOR, "#top .value")] == (
        pytest.approx([e[0] for e in top], rel=5e-3))  # 3 significant digits
    assert not browser.find_element(By.ID, "explanation").is_displayed()

    # Context: 12 before and 4 after at first, all that was kept when widened.
    def shown_tokens() -> int:
        first = browser.find_element(By.CSS_SELECTOR, "#top .example")
        return len(first.find_elements(By.CSS_SELECTOR, ".tok"))

    window = top[0][1]
    assert shown_tokens() == sum(t >= 0 for t in window[LEFT - 12:LEFT + 5])
    Select(browser.find_element(By.ID, "context")).select_by_index(1)
    assert shown_tokens() == sum(t >= 0 for t in window)

    # Quantile bands drawn from the random sample as FeatureStats.quantile_samples draws them.
    bands = [b for b in reversed(loaded.quantile_samples(latent, 4, 5)) if b]
    shown = browser.find_elements(By.CSS_SELECTOR, "#bands .band")
    assert len(shown) == len(bands)
    for band, element in zip(bands, shown, strict=True):
        values = [float(v.text) for v in element.find_elements(By.CSS_SELECTOR, ".value")]
        assert values == pytest.approx([e[0] for e in band], rel=5e-3)

    # Histogram: counts on the y axis, and a log view with powers of ten.
    peak = int(stats.hist_counts[latent].max())
    ticks = [int(t.text.replace(",", "")) for t in
             browser.find_elements(By.CSS_SELECTOR, "#histogram .y-tick")]
    assert ticks[0] == 0 and peak / 2 <= ticks[-1] <= peak and len(ticks) >= 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "#histogram .x-tick")) >= 3
    browser.find_element(By.ID, "hist-log").click()
    ticks = [int(t.text.replace(",", "")) for t in
             browser.find_elements(By.CSS_SELECTOR, "#histogram .y-tick")]
    assert ticks == [10**e for e in range(len(ticks))] and ticks[-1] <= peak
    assert len(browser.find_elements(By.CSS_SELECTOR, "#histogram rect.bar")) == 32
    assert len(browser.find_elements(By.CSS_SELECTOR, "#promoted li")) == 10

    # Following "next" (or "previous" from the last latent) loads that latent in place.
    step, other = ("next", latent + 1) if latent + 1 < stats.d_sae else ("prev", latent - 1)
    browser.find_element(By.ID, step).click()
    _wait(browser, lambda d: d.find_element(By.ID, "title").text == f"Latent {other}")

    # An explained latent shows its explanation and every score.
    best = max(explanations, key=lambda i: explanations[i].score())
    browser.get((out / "latent.html").as_uri() + f"#{best}")
    _wait(browser, lambda d: d.find_element(By.ID, "explanation").is_displayed())
    text = browser.find_element(By.ID, "explanation").text
    assert "commas" in text and "detection balanced accuracy 0.900" in text
    assert "fuzzing balanced accuracy 0.700" in text and "m1" in text

    # A lone byte shows as its bytes and a newline as a symbol, in one line.
    odd = int(stats.max_act.argmin())
    browser.get((out / "latent.html").as_uri() + f"#{odd}")
    _wait(browser, lambda d: d.find_element(By.ID, "title").text == f"Latent {odd}")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#promoted li"))
    promoted = browser.find_elements(By.CSS_SELECTOR, "#promoted li .tok")
    assert [p.text for p in promoted[:2]] == ["\\xa4", "\u23ce"]
    assert "\ufffd" not in browser.find_element(By.ID, "promoted").text
    assert _errors(browser) == []


def test_python_module_runs_as_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "saekit.cli", "dashboard", "--help"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0 and "--out" in result.stdout and "--explanations" in (
        result.stdout)
