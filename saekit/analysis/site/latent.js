// One latent's page: latent.html#N loads the statistics shard holding latent N (and its
// explanations, if any), then draws examples, quantile bands, histogram and logit effects;
// for a crosscoder also its decoder norm at every site, relative norm and class.
(function () {
  "use strict";
  const S = window.SAEKIT;
  const site = S.site;
  const unpacked = {}; // shard -> Promise of its arrays
  let showing = -1; // the latent whose data the page is waiting for or showing

  document.getElementById("source").textContent = S.sourceLine(site);

  function clear(id) {
    const el = document.getElementById(id);
    el.replaceChildren();
    return el;
  }

  function shardData(shard) {
    if (!(shard in unpacked)) {
      unpacked[shard] = S.load(S.statsPath(shard)).then(async (packed) =>
        Object.assign(await S.unpack(packed), { first: packed.first }));
      unpacked[shard].catch(() => delete unpacked[shard]);
    }
    return unpacked[shard];
  }

  // Latent `id`'s statistics from its shard's arrays, as plain objects.
  function latentData(a, id) {
    const r = id - a.first;
    const k = a.tokens.shape[1], w = a.tokens.shape[2], topK = site.top_k;
    const scale = a.act_scale[r];
    const example = (slot) => {
      const base = (r * k + slot) * w;
      const tokens = [], acts = [];
      for (let j = 0; j < w; j++) {
        tokens.push(a.tokens[base + j] - 1);
        acts.push(a.acts[base + j] * scale);
      }
      return { value: acts[site.left], tokens, acts };
    };
    const kept = (from, n) =>
      Array.from({ length: n }, (_, j) => example(from + j)).filter((e) => e.value > 0);
    const nBins = a.hist_counts.shape[1];
    const out = {
      id, fireCount: a.fire_count[r], max: a.max_act[r],
      mean: a.fire_count[r] > 0 ? a.act_sum[r] / a.fire_count[r] : 0,
      top: kept(0, a.n_top[r]), sample: kept(topK, a.n_sample[r]),
      hist: { range: a.hist_range[r],
        counts: Array.from(a.hist_counts.slice(r * nBins, (r + 1) * nBins)) },
    };
    for (const [group, name] of [["logit_top", "promoted"], ["logit_bottom", "suppressed"]]) {
      const ids = a[group + ".ids"], values = a[group + ".values"];
      if (!ids) continue;
      const n = ids.shape[1];
      out[name] = Array.from({ length: n }, (_, j) => [ids[r * n + j], values[r * n + j]]);
    }
    if (a.site_norms) {
      const n = a.site_norms.shape[1];
      out.siteNorms = Array.from(a.site_norms.slice(r * n, (r + 1) * n));
    }
    return out;
  }

  // The random sample in bands by activation quantile, lowest band first: sorted by value,
  // cut into n_bands equal parts, up to per_band evenly spaced picks each, highest first
  // (the rule FeatureStats.quantile_samples follows).
  function bands(sample) {
    const sorted = sample.slice().sort((x, y) => x.value - y.value);
    if (!sorted.length) return [];
    const n = site.n_bands, out = [];
    for (let b = 0; b < n; b++) {
      const band = sorted.slice(Math.floor((sorted.length * b) / n),
        Math.floor((sorted.length * (b + 1)) / n));
      const step = Math.max(1, Math.floor(band.length / site.per_band));
      out.push(band.filter((_, j) => j % step === 0).slice(0, site.per_band).reverse());
    }
    return out;
  }

  // Context shown around each example's token: [before, after]; the widest is all kept.
  const contextSelect = document.getElementById("context");
  const contexts = [[Math.min(site.left, 12), Math.min(site.right, 4)], [site.left, site.right]];
  for (const [before, after] of contexts) {
    const value = before + "," + after;
    if (![...contextSelect.options].some((o) => o.value === value)) {
      contextSelect.add(new Option(before + " before, " + after + " after", value));
    }
  }
  contextSelect.disabled = contextSelect.options.length < 2;
  const context = () => contextSelect.value.split(",").map(Number);

  // A context window, each token shaded by the latent's activation (hover shows it).
  function example(ex, scale) {
    const [before, after] = context();
    const div = document.createElement("div");
    div.className = "example";
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = S.fmt(ex.value);
    div.appendChild(value);
    const text = document.createElement("span");
    text.className = "text";
    ex.tokens.forEach((token, j) => {
      if (token < 0 || j < site.left - before || j > site.left + after) return;
      const act = ex.acts[j];
      const span = S.tokenSpan(token);
      if (j === site.left) span.classList.add("center");
      span.title = JSON.stringify(S.rawText(token)) + " (token " + token + ") activation " +
        S.fmt(act);
      span.dataset.act = act;
      if (act > 0) {
        span.classList.add("active");
        span.style.backgroundColor =
          "rgba(232, 119, 28, " + Math.min(1, act / scale).toFixed(3) + ")";
      }
      text.appendChild(span);
    });
    div.appendChild(text);
    return div;
  }

  function histogram(hist) {
    const el = clear("histogram");
    const n = hist.counts.length;
    if (!hist.counts.some((c) => c > 0)) {
      el.innerHTML = '<p class="empty">never fired</p>';
      return;
    }
    const bars = hist.counts.map((count, i) => ({
      count, label: S.fmt((hist.range * i) / n) + " to " + S.fmt((hist.range * (i + 1)) / n),
    }));
    const labels = S.ticks(hist.range, 4).filter((v) => v <= hist.range)
      .map((v) => [v / hist.range, S.fmt(v)]);
    const log = document.getElementById("hist-log").checked;
    el.appendChild(S.barChart(bars, labels, log, "tokens"));
  }

  function logitList(id, items, cls) {
    const ol = clear(id);
    for (const [token, value] of items || []) {
      const li = document.createElement("li");
      const v = document.createElement("span");
      v.className = cls;
      v.textContent = " " + S.fmt(value);
      li.append(S.tokenSpan(token), v);
      ol.appendChild(li);
    }
  }

  function explanation(item) {
    const box = document.getElementById("explanation");
    box.replaceChildren();
    box.hidden = !item;
    if (!item) return;
    const text = document.createElement("p");
    text.className = "explanation-text";
    text.textContent = item.explanation;
    box.appendChild(text);
    const scores = [];
    for (const [scorer, metrics] of Object.entries(item.scores)) {
      for (const [metric, value] of Object.entries(metrics)) {
        scores.push(scorer + " " + metric.replace(/_/g, " ") + " " +
          (value === null ? "–" : S.fmt(value)));
      }
    }
    const meta = document.createElement("p");
    meta.className = "scores";
    meta.textContent = (scores.length ? scores.join(" · ") : "not scored yet") +
      (item.explainer_model ? " · explained by " + item.explainer_model : "");
    box.appendChild(meta);
  }

  // A crosscoder latent: its relative norm between sites a and b, its class, and each
  // site's decoder norm with its share of the sum.
  function sites(norms) {
    const xc = site.crosscoder;
    document.getElementById("sites").hidden = !(xc && norms);
    if (!xc || !norms) return;
    const relative = S.relativeNorm(norms[xc.a], norms[xc.b]);
    const cls = S.normClass(relative, xc.band);
    document.getElementById("relative-norm").textContent = S.fmt(relative);
    const label = document.getElementById("norm-class");
    label.textContent = xc.labels[xc.classes.indexOf(cls)];
    label.dataset.cls = cls;
    const total = norms.reduce((x, y) => x + y, 0);
    document.getElementById("site-norms").textContent = norms.map((norm, s) =>
      xc.site_names[s] + " " + S.fmt(norm) +
      (total > 0 ? " (" + (100 * norm / total).toFixed(0) + "%)" : "")).join(" · ");
  }

  let current = null;
  function draw() {
    const d = current;
    document.title = "Latent " + d.id + " · " + site.title;
    document.getElementById("title").textContent = "Latent " + d.id;
    const density = d.fireCount / Math.max(site.n_tokens, 1);
    document.getElementById("summary").textContent =
      "density " + S.fmt(density) + (density > 0 ? " (log10 " + Math.log10(density).toFixed(2) +
      ")" : "") + " · fires on " + d.fireCount.toLocaleString() + " tokens · max activation " +
      S.fmt(d.max) + " · mean when firing " + S.fmt(d.mean);
    sites(d.siteNorms);
    const scale = d.max > 0 ? d.max : 1;
    const top = clear("top");
    if (!d.top.length) top.innerHTML = '<p class="empty">no activating examples</p>';
    for (const ex of d.top) top.appendChild(example(ex, scale));
    const box = clear("bands");
    const all = bands(d.sample);
    all.slice().reverse().forEach((band, k) => {
      if (!band.length) return;
      const section = document.createElement("div");
      section.className = "band";
      const h = document.createElement("h3");
      h.textContent = "quantile band " + (all.length - k) + " of " + all.length;
      section.appendChild(h);
      for (const ex of band) section.appendChild(example(ex, scale));
      box.appendChild(section);
    });
    histogram(d.hist);
    logitList("promoted", d.promoted, "pos");
    logitList("suppressed", d.suppressed, "neg");
  }

  async function show() {
    let id = parseInt(location.hash.slice(1), 10);
    if (!(id >= 0 && id < site.d_sae)) id = 0;
    showing = id;
    document.getElementById("prev").href = "#" + Math.max(0, id - 1);
    document.getElementById("next").href = "#" + Math.min(site.d_sae - 1, id + 1);
    document.getElementById("goto").value = id;
    const shard = Math.floor(id / site.shard_size);
    try {
      const arrays = await shardData(shard);
      const item = site.explained_shards.includes(shard)
        ? (await S.load(S.explanationsPath(shard))).items[id] : undefined;
      if (showing !== id) return; // the reader moved on while this shard loaded
      current = latentData(arrays, id);
      explanation(item);
      draw();
    } catch (err) {
      if (showing === id) {
        document.getElementById("summary").textContent =
          "no data for latent " + id + ": " + err.message;
      }
    }
  }

  contextSelect.addEventListener("change", () => current && draw());
  document.getElementById("hist-log").addEventListener("change", () => current && draw());
  document.getElementById("goto").addEventListener("change", (e) => {
    location.hash = "#" + e.target.value;
  });
  window.addEventListener("hashchange", show);
  show();
})();
