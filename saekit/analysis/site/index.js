// The index of latents: sort orders, a search box (latent number or token), shown a page of
// rows at a time so that a million latents stay quick. State lives in the address's #hash.
// A crosscoder's index also shows each latent's relative decoder norm and class, filters by
// class and sorts by relative norm.
(async function () {
  "use strict";
  const S = window.SAEKIT;
  const site = S.site;
  const PAGE = 200;
  const body = document.querySelector("#latents tbody");
  const search = document.getElementById("search");
  const sortSelect = document.getElementById("sort");
  const orderButton = document.getElementById("order");
  const more = document.getElementById("more");
  const shown = document.getElementById("shown");
  const message = document.getElementById("message");

  document.getElementById("title").textContent = site.title;
  document.title = site.title;
  document.getElementById("source").textContent = S.sourceLine(site);

  const cols = await S.unpack(S.index);
  const d = site.d_sae;
  const density = new Float64Array(d);
  for (let i = 0; i < d; i++) density[i] = cols.fire_count[i] / Math.max(site.n_tokens, 1);
  const width = (name) => (cols[name] ? cols[name].shape[1] : 0);
  const fireWidth = width("fires_on"), promoteWidth = width("promotes");

  // Sort orders: name -> [label, value of latent i, descending first?]. Latent number is the
  // default: a stable order that matches the numbers used everywhere else.
  const orders = {
    index: ["latent number", (i) => i, false],
    density: ["density", (i) => density[i], true],
    max: ["max activation", (i) => cols.max_act[i], true],
    mean: ["mean activation", (i) => cols.mean_act[i], true],
  };
  for (const column of site.score_columns) {
    const values = cols["score:" + column];
    const label = column.replace(".", " ").replace(/_/g, " ");
    orders["score:" + column] = ["explanation score (" + label + ")", (i) => values[i], true];
  }
  // Crosscoders: classes by code as Python stored them (site.crosscoder.classes[code]).
  const xc = site.crosscoder;
  const classFilter = document.getElementById("class-filter");
  if (xc) {
    const [nameA, nameB] = [xc.site_names[xc.a], xc.site_names[xc.b]];
    orders.relative = ["relative decoder norm (0: " + nameA + ", 1: " + nameB + ")",
      (i) => cols.relative_norm[i], false];
    classFilter.add(new Option("all (" + d.toLocaleString() + ")", ""));
    xc.classes.forEach((name, code) => {
      if (xc.counts[code] || name !== "neither") {
        classFilter.add(new Option(xc.labels[code] + " (" + xc.counts[code].toLocaleString() +
          ")", name));
      }
    });
    document.getElementById("class-control").hidden = false;
    for (const el of document.querySelectorAll(".crosscoder")) el.hidden = false;
  }
  for (const [key, [label]] of Object.entries(orders)) sortSelect.add(new Option(label, key));
  const explained = site.score_columns.length > 0 || site.explained_shards.length > 0;
  document.getElementById("explanation-head").hidden = !explained;

  const state = { sort: "index", descending: false, query: "", cls: "", limit: PAGE };
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("sort") in orders) state.sort = hash.get("sort");
  state.descending = hash.has("desc") ? hash.get("desc") === "1" : orders[state.sort][2];
  state.query = hash.get("q") || "";
  search.value = state.query;
  if (xc && xc.classes.includes(hash.get("class"))) state.cls = hash.get("class");
  classFilter.value = state.cls;

  // Which latents match the query (null: all). A number is that latent; text matches every
  // token whose text contains it (case-insensitive), and a latent matches when it fires on
  // such a token in its top examples or promotes one.
  function matching(query) {
    const q = query.trim();
    if (!q) return null;
    const match = new Uint8Array(d);
    const number = /^#?(\d+)$/.exec(q);
    if (number) {
      if (Number(number[1]) < d) match[Number(number[1])] = 1;
      return match;
    }
    const needle = q.toLowerCase();
    const hit = new Set(); // token ids + 1, as the index stores them
    for (const [id, text] of Object.entries(S.vocab)) {
      const lower = text.toLowerCase();
      if (lower.includes(needle) || S.display(lower).includes(needle)) hit.add(Number(id) + 1);
    }
    for (let i = 0; i < d; i++) {
      for (let j = 0; j < fireWidth && !match[i]; j++) {
        if (hit.has(cols.fires_on[i * fireWidth + j])) match[i] = 1;
      }
      for (let j = 0; j < promoteWidth && !match[i]; j++) {
        if (hit.has(cols.promotes[i * promoteWidth + j])) match[i] = 1;
      }
    }
    return match;
  }

  // Every latent in the sort order, computed once per order: a search then only filters it.
  let sorted = null, sortedBy = "";
  function sortedLatents() {
    const by = state.sort + (state.descending ? " desc" : " asc");
    if (by === sortedBy) return sorted;
    const key = orders[state.sort][1], sign = state.descending ? -1 : 1;
    const values = new Float64Array(d);
    for (let i = 0; i < d; i++) values[i] = key(i);
    sorted = new Uint32Array(d);
    for (let i = 0; i < d; i++) sorted[i] = i;
    sorted.sort((a, b) => {
      const x = values[a], y = values[b];
      const nx = Number.isNaN(x), ny = Number.isNaN(y);
      if (nx || ny) return nx - ny || a - b; // latents without a value last, either way
      return sign * (x - y) || a - b;
    });
    sortedBy = by;
    return sorted;
  }

  function tokenCell(tr, array, widthOf, i, n) {
    const td = document.createElement("td");
    td.className = "tokens";
    for (let j = 0; j < Math.min(n, widthOf); j++) {
      const id = array[i * widthOf + j] - 1;
      if (id >= 0) td.appendChild(S.tokenSpan(id));
    }
    tr.appendChild(td);
  }

  function numberCell(tr, x, title) {
    const td = document.createElement("td");
    td.className = "num";
    td.textContent = S.fmt(x);
    if (title) td.title = title;
    tr.appendChild(td);
  }

  // Explanation texts live in per-shard files: load those of the rows on screen.
  function fillExplanations(cells) {
    const shards = new Set(cells.map(([i]) => Math.floor(i / site.shard_size)));
    for (const shard of shards) {
      if (!site.explained_shards.includes(shard)) continue;
      S.load(S.explanationsPath(shard)).then((data) => {
        for (const [i, td] of cells) {
          const item = data.items[i];
          if (Math.floor(i / site.shard_size) === shard && item) td.textContent = item.explanation;
        }
      }, (err) => { message.textContent = err.message; });
    }
  }

  // The latents of the chosen class (null: no class chosen, or not a crosscoder).
  function ofClass(cls) {
    if (!xc || !cls) return null;
    const code = xc.classes.indexOf(cls);
    const keep = new Uint8Array(d);
    for (let i = 0; i < d; i++) keep[i] = cols.norm_class[i] === code ? 1 : 0;
    return keep;
  }

  function render() {
    const match = matching(state.query), inClass = ofClass(state.cls);
    const order = match || inClass
      ? sortedLatents().filter((i) => (!match || match[i]) && (!inClass || inClass[i]))
      : sortedLatents();
    const fragment = document.createDocumentFragment();
    const cells = [];
    for (const i of order.slice(0, state.limit)) {
      const tr = document.createElement("tr");
      tr.dataset.latent = i;
      const td = document.createElement("td");
      td.className = "num";
      const link = document.createElement("a");
      link.href = "latent.html#" + i;
      link.textContent = i;
      td.appendChild(link);
      tr.appendChild(td);
      numberCell(tr, density[i], "fires on " + cols.fire_count[i].toLocaleString() + " tokens");
      numberCell(tr, cols.max_act[i]);
      numberCell(tr, cols.mean_act[i]);
      if (xc) {
        numberCell(tr, cols.relative_norm[i]);
        const cell = document.createElement("td");
        const code = cols.norm_class[i];
        cell.className = "norm-class " + xc.classes[code];
        cell.dataset.cls = xc.classes[code];
        cell.textContent = xc.labels[code];
        tr.appendChild(cell);
      }
      if (explained) {
        const cell = document.createElement("td");
        cell.className = "explanation";
        const text = document.createElement("span");
        cell.appendChild(text);
        const sortScore = state.sort.startsWith("score:") ? state.sort.slice(6)
          : site.score_columns[0];
        if (sortScore) {
          const score = cols["score:" + sortScore][i];
          const span = document.createElement("span");
          span.className = "score";
          span.title = sortScore.replace(".", " ");
          span.textContent = Number.isNaN(score) ? "" : " (" + S.fmt(score) + ")";
          cell.appendChild(span);
        }
        tr.appendChild(cell);
        cells.push([i, text]);
      }
      tokenCell(tr, cols.fires_on, fireWidth, i, 5);
      if (promoteWidth) tokenCell(tr, cols.promotes, promoteWidth, i, 5);
      else tr.appendChild(document.createElement("td"));
      fragment.appendChild(tr);
    }
    body.replaceChildren(fragment);
    fillExplanations(cells);
    const count = Math.min(order.length, state.limit);
    shown.textContent = count < order.length
      ? count + " of " + order.length + " shown" : order.length + " shown";
    more.hidden = count >= order.length;
    sortSelect.value = state.sort;
    orderButton.textContent = state.descending ? "highest first" : "lowest first";
    for (const th of document.querySelectorAll("th[data-key]")) {
      th.classList.remove("sorted-asc", "sorted-desc");
      if (th.dataset.key === state.sort) {
        th.classList.add(state.descending ? "sorted-desc" : "sorted-asc");
      }
    }
    const params = new URLSearchParams({ sort: state.sort, desc: state.descending ? "1" : "0" });
    if (state.query) params.set("q", state.query);
    if (state.cls) params.set("class", state.cls);
    history.replaceState(null, "", "#" + params);
  }

  function sortBy(key) {
    state.descending = key === state.sort ? !state.descending : orders[key][2];
    state.sort = key;
    state.limit = PAGE;
    render();
  }

  for (const th of document.querySelectorAll("th[data-key]")) {
    th.addEventListener("click", () => sortBy(th.dataset.key));
  }
  sortSelect.addEventListener("change", () => {
    state.sort = sortSelect.value;
    state.descending = orders[state.sort][2];
    state.limit = PAGE;
    render();
  });
  orderButton.addEventListener("click", () => sortBy(state.sort));
  search.addEventListener("input", () => {
    state.query = search.value;
    state.limit = PAGE;
    render();
  });
  classFilter.addEventListener("change", () => {
    state.cls = classFilter.value;
    state.limit = PAGE;
    render();
  });
  more.addEventListener("click", () => {
    state.limit += PAGE;
    render();
  });

  // Overview: how many latents fire at each log10 density (dead latents counted apart).
  function densityChart() {
    const logs = [];
    let dead = 0;
    for (let i = 0; i < d; i++) {
      if (density[i] > 0) logs.push(Math.log10(density[i]));
      else dead += 1;
    }
    const el = document.getElementById("density-histogram");
    el.replaceChildren();
    const note = document.createElement("p");
    note.textContent = dead.toLocaleString() + " latents never fired";
    el.appendChild(note);
    if (!logs.length) return;
    // Loops, not Math.min(...logs): a million arguments overflow the call stack.
    let least = Infinity, most = -Infinity;
    for (const x of logs) {
      least = Math.min(least, x);
      most = Math.max(most, x);
    }
    const lo = Math.floor(least), hi = Math.max(Math.ceil(most), lo + 1);
    const nBins = 4 * (hi - lo);
    const bars = Array.from({ length: nBins }, (_, b) => ({
      count: 0, label: "10^" + (lo + b / 4).toFixed(2) + " to 10^" + (lo + (b + 1) / 4).toFixed(2),
    }));
    for (const x of logs) bars[Math.min(nBins - 1, Math.floor((x - lo) * 4))].count += 1;
    const labels = [];
    for (let e = lo; e <= hi; e++) labels.push([(e - lo) / (hi - lo), "1e" + e]);
    const log = document.getElementById("density-log").checked;
    el.appendChild(S.barChart(bars, labels, log, "latents"));
  }
  document.getElementById("density-log").addEventListener("change", densityChart);

  // Overview for crosscoders: class sizes and a histogram of relative norms on [0, 1].
  function relativeChart() {
    document.getElementById("relative-overview").hidden = false;
    document.getElementById("class-counts").textContent = xc.classes
      .map((name, code) => xc.labels[code] + ": " + xc.counts[code].toLocaleString())
      .join(" · ") + " (exclusive below " + xc.band + " and above " + (1 - xc.band) + ")";
    const nBins = 20;
    const bars = Array.from({ length: nBins }, (_, b) => ({
      count: 0, label: (b / nBins).toFixed(2) + " to " + ((b + 1) / nBins).toFixed(2) }));
    for (let i = 0; i < d; i++) {
      const x = cols.relative_norm[i];
      if (!Number.isNaN(x)) bars[Math.min(nBins - 1, Math.floor(x * nBins))].count += 1;
    }
    const labels = [[0, "0 " + xc.site_names[xc.a]], [0.5, "0.5"], [1, xc.site_names[xc.b] + " 1"]];
    document.getElementById("relative-histogram").replaceChildren(
      S.barChart(bars, labels, false, "latents"));
  }

  densityChart();
  if (xc) relativeChart();
  render();
})().catch((err) => {
  document.getElementById("message").textContent = "cannot show the index: " + err.message;
  throw err;
});
