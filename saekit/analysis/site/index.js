// The index of latents: a table built from window.SAEKIT_INDEX, sortable and searchable.
(function () {
  "use strict";
  const data = window.SAEKIT_INDEX;
  const vocab = window.SAEKIT_VOCAB || {};
  const body = document.querySelector("#latents tbody");
  const search = document.getElementById("search");
  const shown = document.getElementById("shown");
  let rows = data.rows.slice();
  let sortKey = 1;
  let descending = true;

  document.getElementById("title").textContent = data.title;
  document.title = data.title;
  document.getElementById("summary").textContent =
    data.d_sae + " latents, statistics over " + data.n_tokens.toLocaleString() + " tokens";

  const tokenText = (id) => (id in vocab ? vocab[id] : "<" + id + ">");
  const tokenList = (ids) => ids.map(tokenText);
  const fmt = (x) => (x === 0 ? "0" : Number(x).toPrecision(3));

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function tokenCell(tr, ids) {
    const td = cell(tr, "", "");
    for (const t of tokenList(ids)) {
      const span = document.createElement("span");
      span.className = "tok";
      span.textContent = t;
      td.appendChild(span);
      td.appendChild(document.createTextNode(" "));
    }
  }

  function render() {
    const query = search.value.trim().toLowerCase();
    const matching = rows.filter((r) => {
      if (!query) return true;
      return tokenList(r[4].concat(r[5])).some((t) => t.toLowerCase().includes(query));
    });
    matching.sort((a, b) => (descending ? b[sortKey] - a[sortKey] : a[sortKey] - b[sortKey]));
    const fragment = document.createDocumentFragment();
    for (const r of matching) {
      const tr = document.createElement("tr");
      tr.dataset.latent = r[0];
      const link = document.createElement("a");
      link.href = "latent.html#" + r[0];
      link.textContent = r[0];
      cell(tr, "", "num").appendChild(link);
      cell(tr, fmt(r[1]), "num");
      cell(tr, fmt(r[2]), "num");
      cell(tr, fmt(r[3]), "num");
      tokenCell(tr, r[4]);
      tokenCell(tr, r[5]);
      fragment.appendChild(tr);
    }
    body.replaceChildren(fragment);
    shown.textContent = matching.length + " shown";
    for (const th of document.querySelectorAll("th[data-key]")) {
      th.classList.remove("sorted-asc", "sorted-desc");
      if (Number(th.dataset.key) === sortKey) {
        th.classList.add(descending ? "sorted-desc" : "sorted-asc");
      }
    }
  }

  for (const th of document.querySelectorAll("th[data-key]")) {
    th.addEventListener("click", () => {
      const key = Number(th.dataset.key);
      descending = key === sortKey ? !descending : true;
      sortKey = key;
      render();
    });
  }
  search.addEventListener("input", render);
  render();
})();
