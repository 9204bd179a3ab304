"""A crosscoder's dashboard: trained on synthetic activations with planted shared and
model-only features, its index filters exactly the planted classes and sorts by relative
decoder norm, and its latent pages name each latent's class; in a real headless Chromium (as
tests/analysis/test_dashboard.py, and skipped where that test is)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_dashboard import _errors, _rows, _wait

from saekit import SAE
from saekit.analysis.crosscoder_norms import CrosscoderNorms
from saekit.analysis.dashboard import write_dashboard
from saekit.analysis.stats import FeatureStats, FeatureStatsAccumulator
from saekit.saes.base import LossSettings
from saekit.saes.crosscoder import MODELS_KEY, SITE_HOOKS_KEY, Crosscoder

N_SHARED, N_A, N_B, WIDTH, D_SAE = 6, 5, 5, 16, 32
PLANTED = ["shared"] * N_SHARED + ["a_only"] * N_A + ["b_only"] * N_B
LABELS = {"a_only": "base only", "shared": "shared", "b_only": "chat only"}


def planted_directions() -> torch.Tensor:
    """[features, 2, WIDTH] unit directions per site; the a-only features write nothing at
    site b (the "chat" model), the b-only nothing at site a (the "base" model)."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(len(PLANTED), 2, WIDTH, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    dirs[N_SHARED:N_SHARED + N_A, 1] = 0
    dirs[N_SHARED + N_A:, 0] = 0
    return dirs


def planted_batch(dirs: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """[n, 2, WIDTH]: sparse sums of planted features (each on 6% of tokens, at 1 to 2)."""
    on = torch.rand(n, dirs.shape[0], generator=g) < 0.06
    size = 1 + torch.rand(n, dirs.shape[0], generator=g)
    return torch.einsum("bf,fsd->bsd", on * size, dirs)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, FeatureStats, list[str], Crosscoder]:
    """(site folder, statistics, each latent's Python class, the trained crosscoder)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest
    try:
        torch.manual_seed(0)
        dirs = planted_directions()
        cc = SAE.create("crosscoder", WIDTH, D_SAE, n_layers=2, activation_fn="relu")
        assert isinstance(cc, Crosscoder)
        cc.cfg.metadata.extra.update({SITE_HOOKS_KEY: ["h", "h"], MODELS_KEY: ["base", "chat"]})
        opt = torch.optim.Adam(cc.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(600):
            out = cc.training_forward(planted_batch(dirs, 256, g),
                                      settings=LossSettings(sparsity_coefficient=0.3))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        # Statistics of held-out planted activations, with stand-in token ids.
        acc = FeatureStatsAccumulator(D_SAE, top_k=5, n_samples=8, left=3, right=1)
        with torch.no_grad():
            for _ in range(4):
                x = planted_batch(dirs, 8 * 64, g).reshape(8, 64, 2, WIDTH)
                acc.update(torch.randint(0, 50, (8, 64), generator=g), cc.encode(x))
        stats = acc.result()
        stats.crosscoder = CrosscoderNorms.of(cc)
        out_dir = tmp_path_factory.mktemp("xc-site")
        write_dashboard(stats, None, out_dir, sae_name="planted", shard_size=8)
        return out_dir, stats, stats.crosscoder.classes, cc
    finally:
        torch.set_num_threads(before)


def test_every_firing_latent_has_its_planted_feature_class(planted) -> None:
    _, stats, classes, cc = planted
    decoders = cc.W_dec.detach().flatten(1)
    decoders = decoders / decoders.norm(dim=1, keepdim=True)
    features = planted_directions().flatten(1)
    features = features / features.norm(dim=1, keepdim=True)
    cosine = decoders @ features.T  # [latent, feature]
    firing = (stats.fire_count > 0).nonzero().flatten().tolist()
    assert len(firing) > 20
    for latent in firing:
        feature = int(cosine[latent].argmax())
        assert classes[latent] == PLANTED[feature], (latent, float(cosine[latent, feature]))
    # Each planted feature has a latent along it, of its class.
    best = cosine.max(dim=0)
    assert bool((best.values > 0.95).all())
    assert [classes[i] for i in best.indices.tolist()] == PLANTED
    assert {name for name, n in stats.crosscoder.counts().items() if n} == set(LABELS)


def _choose_class(driver, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "class-filter")).select_by_value(value)


def test_index_filters_by_class_and_sorts_by_relative_norm(planted, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    out, stats, classes, _ = planted
    browser.get((out / "index.html").as_uri())
    _wait(browser, lambda d: len(_rows(d)) == D_SAE)
    assert browser.find_element(By.ID, "class-control").is_displayed()
    options = [o.get_attribute("value") for o in
               browser.find_elements(By.CSS_SELECTOR, "#class-filter option")]
    assert options == ["", "a_only", "shared", "b_only"]  # no "neither": none has no decoder
    for name, label in LABELS.items():
        _choose_class(browser, name)
        expected = [i for i in range(D_SAE) if classes[i] == name]
        assert _rows(browser) == expected, name
        cells = browser.find_elements(By.CSS_SELECTOR, "#latents tbody td.norm-class")
        assert {c.text for c in cells} == {label}
        assert browser.find_element(By.ID, "shown").text == f"{len(expected)} shown"
    # The class filter and the search narrow together.
    first_b = classes.index("b_only")
    browser.find_element(By.ID, "search").send_keys(f"#{first_b}")
    assert _rows(browser) == [first_b]
    _choose_class(browser, "a_only")
    assert _rows(browser) == []
    browser.find_element(By.ID, "search").clear()
    browser.find_element(By.ID, "search").send_keys(" ")
    # The state is in the address: a reload keeps the class.
    browser.refresh()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#latents tbody tr"))
    assert _rows(browser) == [i for i in range(D_SAE) if classes[i] == "a_only"]
    _choose_class(browser, "")
    assert len(_rows(browser)) == D_SAE

    # Sorted by relative norm: a-only latents first, then shared, then b-only.
    Select(browser.find_element(By.ID, "sort")).select_by_value("relative")
    relative = stats.relative_norm.tolist()
    assert _rows(browser) == sorted(range(D_SAE), key=lambda i: (relative[i], i))
    shown = [float(td.text) for td in browser.find_elements(
        By.CSS_SELECTOR, "#latents tbody tr td:nth-child(5)")]
    assert shown == pytest.approx(sorted(relative), rel=5e-3, abs=1e-6)
    browser.find_element(By.ID, "order").click()
    assert _rows(browser)[0] == max(range(D_SAE), key=lambda i: (relative[i], -i))

    # The overview counts the classes.
    browser.find_element(By.CSS_SELECTOR, "#relative-overview summary").click()
    text = browser.find_element(By.ID, "class-counts").text
    counts = stats.crosscoder.counts()
    for name, label in LABELS.items():
        assert f"{label}: {counts[name]}" in text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#relative-histogram rect.bar")) == 20
    assert _errors(browser) == []


def test_latent_pages_name_the_class(planted, browser) -> None:
    from selenium.webdriver.common.by import By

    out, stats, classes, _ = planted
    relative = stats.relative_norm.tolist()
    for name in LABELS:
        latent = classes.index(name)
        browser.get((out / "latent.html").as_uri() + f"#{latent}")
        _wait(browser, lambda d, i=latent: d.find_element(By.ID, "title").text == f"Latent {i}")
        _wait(browser, lambda d: d.find_element(By.ID, "sites").is_displayed())
        label = browser.find_element(By.ID, "norm-class")
        assert label.get_attribute("data-cls") == name and label.text == LABELS[name]
        shown = float(browser.find_element(By.ID, "relative-norm").text)
        assert shown == pytest.approx(relative[latent], rel=5e-3, abs=1e-6)
        norms = browser.find_element(By.ID, "site-norms").text
        assert norms.startswith("base ") and " · chat " in norms
    assert _errors(browser) == []


def test_pages_and_python_agree_at_the_band_edges(tmp_path, browser) -> None:
    """Relative norms on and beside the band's edges: the latent page's class (computed in
    the browser) and the index's (stored by Python) are Python's."""
    from selenium.webdriver.common.by import By

    acc = FeatureStatsAccumulator(8, top_k=2, n_samples=2, left=1, right=1)
    acc.update(torch.randint(0, 20, (2, 6)), torch.rand(2, 6, 8))
    stats = acc.result()
    norms = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.45, 0.05], [0.05, 0.45], [0.0, 0.0],
                          [1e-3, 0.0], [0.899999, 0.100001], [0.0, 0.3]])
    stats.crosscoder = CrosscoderNorms(norms, ["layer 1", "layer 2"])
    write_dashboard(stats, None, tmp_path, shard_size=4)
    classes = stats.norm_classes
    assert len(set(classes)) == 4  # every class, "neither" too
    browser.get((tmp_path / "index.html").as_uri())
    _wait(browser, lambda d: len(_rows(d)) == 8)
    cells = browser.find_elements(By.CSS_SELECTOR, "#latents tbody td.norm-class")
    assert [c.get_attribute("data-cls") for c in cells] == classes
    for latent in range(8):
        browser.get((tmp_path / "latent.html").as_uri() + f"#{latent}")
        _wait(browser, lambda d, i=latent: d.find_element(By.ID, "title").text == f"Latent {i}")
        _wait(browser, lambda d: d.find_element(By.ID, "norm-class").get_attribute("data-cls"))
        assert browser.find_element(By.ID, "norm-class").get_attribute(
            "data-cls") == classes[latent], latent
    assert _errors(browser) == []
