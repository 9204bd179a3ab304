// One latent's page: latent.html#N loads data/latents/N.js, which calls SAEKIT_LATENT.
(function () {
  "use strict";
  const vocab = window.SAEKIT_VOCAB || {};
  const index = window.SAEKIT_INDEX;
  const fmt = (x) => (x === 0 ? "0" : Number(x).toPrecision(3));
  const tokenText = (id) =>
    id in vocab ? vocab[id].replace(/\n/g, "\u21b5") : "<" + id + ">";

  function clear(id) {
    const el = document.getElementById(id);
    el.replaceChildren();
    return el;
  }

  // A context window with each token shaded by the latent's activation; hover shows it.
  function example(ex, center, scale) {
    const div = document.createElement("div");
    div.className = "example";
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = fmt(ex[0]);
    div.appendChild(value);
    ex[1].forEach((token, j) => {
      if (token < 0) return;
      const act = ex[2][j];
      const span = document.createElement("span");
      span.className = "tok" + (j === center ? " center" : "");
      span.textContent = tokenText(token);
      span.title = "activation " + fmt(act);
      span.dataset.act = act;
      if (act > 0) {
        const alpha = Math.min(1, act / scale);
        span.classList.add("active");
        span.style.backgroundColor = "rgba(232, 119, 28, " + alpha.toFixed(3) + ")";
      }
      div.appendChild(span);
    });
    return div;
  }

  function histogram(hist) {
    const el = clear("histogram");
    const counts = hist.counts;
    const peak = Math.max(...counts);
    if (peak === 0) {
      el.innerHTML = '<p class="empty">never fired</p>';
      return;
    }
    const ns = "http://www.w3.org/2000/svg";
    const w = 300, h = 140, pad = 18, bw = w / counts.length;
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", w);
    svg.setAttribute("height", h + pad);
    counts.forEach((c, i) => {
      const bar = document.createElementNS(ns, "rect");
      const bh = (h * c) / peak;
      bar.setAttribute("class", "bar");
      bar.setAttribute("x", i * bw);
      bar.setAttribute("y", h - bh);
      bar.setAttribute("width", Math.max(bw - 1, 1));
      bar.setAttribute("height", bh);
      const tip = document.createElementNS(ns, "title");
      const lo = (hist.range * i) / counts.length, hi = (hist.range * (i + 1)) / counts.length;
      tip.textContent = fmt(lo) + " to " + fmt(hi) + ": " + c + " tokens";
      bar.appendChild(tip);
      svg.appendChild(bar);
    });
    for (const [x, label, anchor] of [[0, "0", "start"], [w, fmt(hist.range), "end"]]) {
      const text = document.createElementNS(ns, "text");
      text.setAttribute("class", "axis");
      text.setAttribute("x", x);
      text.setAttribute("y", h + 13);
      text.setAttribute("text-anchor", anchor);
      text.textContent = label;
      svg.appendChild(text);
    }
    el.appendChild(svg);
  }

  function logitList(id, items, cls) {
    const ol = clear(id);
    for (const [token, value] of items || []) {
      const li = document.createElement("li");
      const tok = document.createElement("span");
      tok.className = "tok";
      tok.textContent = tokenText(token);
      const v = document.createElement("span");
      v.className = cls;
      v.textContent = " " + fmt(value);
      li.append(tok, v);
      ol.appendChild(li);
    }
  }

  window.SAEKIT_LATENT = function (d) {
    document.title = "Latent " + d.id;
    document.getElementById("title").textContent = "Latent " + d.id;
    document.getElementById("summary").textContent =
      "density " + fmt(d.density) + " · max activation " + fmt(d.max) +
      " · mean when firing " + fmt(d.mean);
    const scale = d.max > 0 ? d.max : 1;
    const top = clear("top");
    if (!d.top.length) top.innerHTML = '<p class="empty">no activating examples</p>';
    for (const ex of d.top) top.appendChild(example(ex, d.center, scale));
    const bands = clear("bands");
    d.bands.slice().reverse().forEach((band, k) => {
      const section = document.createElement("div");
      section.className = "band";
      const h = document.createElement("h3");
      const n = d.bands.length;
      h.textContent = "quantile band " + (n - k) + " of " + n;
      section.appendChild(h);
      for (const ex of band) section.appendChild(example(ex, d.center, scale));
      bands.appendChild(section);
    });
    histogram(d.hist);
    logitList("promoted", d.promoted, "pos");
    logitList("suppressed", d.suppressed, "neg");
  };

  function load() {
    const n = index ? index.d_sae : Infinity;
    let id = parseInt(location.hash.slice(1), 10);
    if (!(id >= 0 && id < n)) id = 0;
    document.getElementById("prev").href = "#" + Math.max(0, id - 1);
    document.getElementById("next").href = "#" + Math.min(n - 1, id + 1);
    const script = document.createElement("script");
    script.src = "data/latents/" + id + ".js";
    script.onerror = () => {
      document.getElementById("summary").textContent = "no data for latent " + id;
    };
    document.body.appendChild(script);
  }

  window.addEventListener("hashchange", load);
  load();
})();
