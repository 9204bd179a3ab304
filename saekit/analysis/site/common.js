// Shared by both pages: data scripts loaded on demand, packed arrays, tokens, numbers, charts.
// Data files are scripts that call the window.SAEKIT_* functions below, because a page opened
// from file:// may not fetch() files but may add <script> tags.
(function () {
  "use strict";
  const S = (window.SAEKIT = {});
  const loaded = {}; // script path -> the data it registered
  const pending = {}; // script path -> Promise of that data

  const pad = (n) => String(n).padStart(6, "0");
  S.statsPath = (shard) => "feature_stats/" + pad(shard) + ".js";
  S.explanationsPath = (shard) => "data/explanations/" + pad(shard) + ".js";

  window.SAEKIT_SITE = (d) => { S.site = d; };
  window.SAEKIT_VOCAB = (d) => { S.vocab = d; };
  window.SAEKIT_INDEX = (d) => { S.index = d; };
  window.SAEKIT_STATS = (d) => { S.header = d; };
  window.SAEKIT_SHARD = (d) => { loaded[S.statsPath(d.shard)] = d; };
  window.SAEKIT_EXPLANATIONS = (d) => { loaded[S.explanationsPath(d.shard)] = d; };

  // The data a script file registers, loading it once; rejects when the file is missing.
  S.load = function (path) {
    if (path in loaded) return Promise.resolve(loaded[path]);
    if (!(path in pending)) {
      pending[path] = new Promise((resolve, reject) => {
        const script = document.createElement("script");
        script.src = path;
        script.onload = () =>
          path in loaded ? resolve(loaded[path]) : reject(new Error(path + " holds no data"));
        script.onerror = () => {
          delete pending[path];
          reject(new Error("cannot load " + path));
        };
        document.head.appendChild(script);
      });
    }
    return pending[path];
  };

  const VIEWS = { u1: Uint8Array, u2: Uint16Array, u4: Uint32Array, i4: Int32Array,
    f2: Uint16Array, f4: Float32Array, f8: Float64Array };

  // float16 bits -> numbers (Float16Array is not in every browser yet).
  function halves(bits) {
    const out = new Float32Array(bits.length);
    for (let i = 0; i < bits.length; i++) {
      const h = bits[i], sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
      if (exp === 0) out[i] = sign * frac * 2 ** -24;
      else if (exp === 31) out[i] = frac ? NaN : sign * Infinity;
      else out[i] = sign * (1 + frac / 1024) * 2 ** (exp - 15);
    }
    return out;
  }

  // {name: typed array (with .shape)} from {"arrays": [[name, dtype, shape]], "data": base64
  // of the deflated, 8-byte aligned, little-endian arrays}.
  S.unpack = async function (packed) {
    const text = atob(packed.data);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    const buffer = await new Response(stream).arrayBuffer();
    const out = {};
    let offset = 0;
    for (const [name, code, shape] of packed.arrays) {
      const View = VIEWS[code];
      const n = shape.reduce((a, b) => a * b, 1);
      const view = new View(buffer, offset, n);
      out[name] = code === "f2" ? halves(view) : view;
      out[name].shape = shape;
      offset += n * View.BYTES_PER_ELEMENT;
      offset += (8 - (offset % 8)) % 8;
    }
    return out;
  };

  // How a token reads on a page: control characters as symbols (a newline must not break a
  // row), nothing as an empty-set sign. Bytes that are no text came as \xNN from Python.
  const CONTROL = { "\n": "\u23ce", "\r": "\u240d", "\t": "\u21e5" };
  S.display = (text) =>
    text === ""
      ? "\u2205"
      : text.replace(/[\u0000-\u001f\u007f]/g, (c) =>
        CONTROL[c] || "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));
  S.rawText = (id) => (S.vocab && id in S.vocab ? S.vocab[id] : "<" + id + ">");
  S.tokenText = (id) => S.display(S.rawText(id));
  S.tokenSpan = function (id) {
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = S.tokenText(id);
    span.dataset.token = id;
    return span;
  };

  // A crosscoder latent's relative decoder norm nb / (na + nb), rounded as float32 at each
  // step as Python computes it, so that its class here is the class Python gives it.
  S.relativeNorm = function (na, nb) {
    const total = Math.fround(na + nb);
    return total > 0 ? Math.fround(nb / Math.max(total, Math.fround(1e-30))) : NaN;
  };
  // The class of a relative norm (saekit.saes.crosscoder.classify_latents' rule).
  S.normClass = function (relative, band) {
    if (Number.isNaN(relative)) return "neither";
    if (relative < band) return "a_only";
    return relative > 1 - band ? "b_only" : "shared";
  };

  S.fmt = (x) => (x === 0 ? "0" : !Number.isFinite(x) ? "–" : Number(x).toPrecision(3));

  // "SAE … · model … · hook …": which SAE these pages describe.
  S.sourceLine = function (site) {
    const parts = [];
    if (site.sae) parts.push("SAE " + site.sae);
    if (site.model) parts.push("model " + site.model);
    if (site.hook) parts.push("hook " + site.hook);
    if (site.crosscoder) parts.push("sites " + site.crosscoder.site_names.join(", "));
    parts.push(site.d_sae.toLocaleString() + " latents");
    parts.push("statistics over " + site.n_tokens.toLocaleString() + " tokens");
    return parts.join(" · ");
  };

  // Round tick values for an axis from 0 to top.
  S.ticks = function (top, count, whole) {
    if (!(top > 0)) return [0];
    const raw = top / count, step10 = 10 ** Math.floor(Math.log10(raw));
    let step = [1, 2, 5, 10].map((m) => m * step10).find((s) => s >= raw);
    if (whole) step = Math.max(1, Math.round(step));
    const out = [];
    for (let v = 0; v <= top * (1 + 1e-9); v += step) out.push(Number(v.toPrecision(6)));
    return out;
  };

  // A bar chart as SVG. bars: [{count, label}], x axis labels [[fraction 0..1, text]];
  // log: bar heights by log10(1 + count), with ticks at powers of ten.
  S.barChart = function (bars, xLabels, log, yTitle) {
    const ns = "http://www.w3.org/2000/svg";
    const w = 320, h = 140, left = 44, bottom = 30, top = 18;
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", left + w + 8);
    svg.setAttribute("height", top + h + bottom);
    const peak = Math.max(1, ...bars.map((b) => b.count));
    const scale = log ? (c) => Math.log10(1 + c) / Math.log10(1 + peak) : (c) => c / peak;
    const add = (tag, attrs, text) => {
      const el = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
      if (text !== undefined) el.textContent = text;
      svg.appendChild(el);
      return el;
    };
    const bw = w / bars.length;
    bars.forEach((b, i) => {
      const bh = h * scale(b.count);
      const rect = add("rect", { class: "bar", x: left + i * bw, y: top + h - bh,
        width: Math.max(bw - 1, 1), height: bh });
      const tip = document.createElementNS(ns, "title");
      tip.textContent = b.label + ": " + b.count.toLocaleString();
      rect.appendChild(tip);
    });
    const yTicks = log
      ? Array.from({ length: Math.floor(Math.log10(peak)) + 1 }, (_, e) => 10 ** e)
      : S.ticks(peak, 3, true);
    for (const v of yTicks) {
      const y = top + h - h * scale(v);
      add("line", { class: "grid", x1: left, x2: left + w, y1: y, y2: y });
      add("text", { class: "axis y-tick", x: left - 4, y: y + 3, "text-anchor": "end" },
        v.toLocaleString());
    }
    add("text", { class: "axis", x: 2, y: 10 }, yTitle + (log ? " (log scale)" : ""));
    for (const [fraction, text] of xLabels) {
      const x = left + w * fraction;
      add("line", { class: "grid", x1: x, x2: x, y1: top + h, y2: top + h + 4 });
      add("text", { class: "axis x-tick", x: x, y: top + h + 15,
        "text-anchor": fraction === 0 ? "start" : fraction === 1 ? "end" : "middle" }, text);
    }
    return svg;
  };
})();
