// The console: models, playground and status, talking only to this server's own API.
// No framework and no build step; the page's Content-Security-Policy forbids inline scripts and
// styles, so everything is built with DOM calls here (textContent, never innerHTML: model names,
// texts and error messages are shown as data, never as markup).
"use strict";

(() => {
  const API_KEY_STORAGE = "emb-console-api-key";
  const ADMIN_KEY_STORAGE = "emb-console-admin-key";
  // Traffic figures are for the API clients' routes, so the console's own polling of /metrics
  // and /api/status does not count.
  const API_ROUTE_PREFIX = "/v1/";

  const $ = (id) => document.getElementById(id);

  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "text") node.textContent = String(value);
      else if (name === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== undefined && child !== null) node.append(child);
    }
    return node;
  }

  // -- keys (sessionStorage only: gone when the tab closes) ------------------------------------

  const keys = {
    api() {
      return sessionStorage.getItem(API_KEY_STORAGE) || "";
    },
    admin() {
      return sessionStorage.getItem(ADMIN_KEY_STORAGE) || keys.api();
    },
    set(apiKey, adminKey) {
      for (const [name, value] of [[API_KEY_STORAGE, apiKey], [ADMIN_KEY_STORAGE, adminKey]]) {
        if (value) sessionStorage.setItem(name, value);
        else sessionStorage.removeItem(name);
      }
    },
  };

  // -- API calls ---------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body, fallback) {
      const error = body && typeof body === "object" && body.error && typeof body.error === "object"
        ? body.error
        : null;
      super(error && typeof error.message === "string" ? error.message : fallback);
      this.status = status;
      this.type = error ? error.type : null;
      this.code = error ? error.code : null;
    }
  }

  async function call(method, path, { body, admin = false, text = false } = {}) {
    const headers = { Accept: text ? "text/plain" : "application/json" };
    const key = admin ? keys.admin() : keys.api();
    if (key) headers.Authorization = `Bearer ${key}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        credentials: "omit",
      });
    } catch (exc) {
      throw new ApiError(0, null, `Could not reach the server: ${exc.message}`);
    }
    const raw = await response.text();
    let parsed = null;
    if (!text || !response.ok) {
      try {
        parsed = raw ? JSON.parse(raw) : null;
      } catch {
        parsed = null;
      }
    }
    if (!response.ok) {
      throw new ApiError(response.status, parsed, `HTTP ${response.status}: ${raw.slice(0, 300)}`);
    }
    return text ? raw : parsed;
  }

  // Shows an API error as the API words it: its message, with the status, type and code before it.
  function showError(region, error) {
    region.replaceChildren();
    if (!error) {
      region.hidden = true;
      return;
    }
    const meta = [error.status ? String(error.status) : null, error.type, error.code]
      .filter(Boolean)
      .join(" · ");
    if (meta) region.append(el("span", { class: "error-meta", text: meta }), " ");
    region.append(el("span", { class: "error-message", text: error.message }));
    region.hidden = false;
  }

  // -- formatting --------------------------------------------------------------------------------

  function formatBytes(bytes) {
    if (bytes === null || bytes === undefined) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let value = bytes;
    let unit = 0;
    while (value >= 1000 && unit < units.length - 1) {
      value /= 1000;
      unit += 1;
    }
    return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
  }

  function formatSeconds(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
    if (seconds < 1) return `${(seconds * 1000).toFixed(1)} ms`;
    if (seconds < 120) return `${seconds.toFixed(2)} s`;
    const minutes = Math.floor(seconds / 60);
    if (minutes < 120) return `${minutes} min ${Math.floor(seconds % 60)} s`;
    return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
  }

  // -- models ------------------------------------------------------------------------------------

  // adminEndpoints: what /api/status last said (null: not known yet, so /api/models is asked).
  const models = { cards: [], admin: null, defaultModel: null, adminEndpoints: null };

  async function refreshModels() {
    let cards;
    try {
      cards = (await call("GET", "/v1/models")).data;
      showError($("models-error"), null);
    } catch (error) {
      showError($("models-error"), error);
      models.cards = [];
      renderModels();
      return;
    }
    let admin = null;
    const note = $("admin-note");
    if (models.adminEndpoints === false) {
      // Asking would only earn a 403 (which the browser logs as an error).
      note.textContent =
        "This server has no admin key (EMB_PROVIDER_ADMIN_KEY_HASHES): model state, memory, " +
        "load and unload are not available here.";
      note.hidden = false;
    } else {
      try {
        admin = (await call("GET", "/api/models", { admin: true })).data;
        note.hidden = true;
        note.textContent = "";
      } catch (error) {
        note.textContent = `State and memory need the admin endpoints: ${error.message}`;
        note.hidden = false;
      }
    }
    models.cards = cards;
    models.admin = admin ? new Map(admin.map((entry) => [entry.name, entry])) : null;
    renderModels();
  }

  function modelState(card) {
    const entry = models.admin ? models.admin.get(card.id) : null;
    return entry ? entry.state : card.loaded ? "loaded" : "not_loaded";
  }

  function renderModels() {
    const list = $("model-list");
    list.replaceChildren();
    for (const card of models.cards) {
      const entry = models.admin ? models.admin.get(card.id) : null;
      const state = modelState(card);
      const facts = el(
        "dl",
        { class: "facts compact" },
        fact("Modality", card.modality),
        fact("Dimensions", card.dimensions ?? "–", "dimensions"),
        fact("Pooling", card.pooling ?? "–", "pooling"),
        fact("State", state.replace("_", " "), "state", `state-${state}`),
        fact("Memory", entry ? formatBytes(entry.memory_bytes) : "–", "memory"),
        fact("Device", entry && entry.device ? entry.device : "–"),
      );
      if (entry && entry.pinned) facts.append(fact("Pinned", "yes (default model)"));
      if (entry && entry.error) facts.append(fact("Last error", entry.error));
      const load = el("button", {
        type: "button",
        class: "secondary",
        text: "Load",
        "aria-label": `Load ${card.id}`,
        dataset: { action: "load", model: card.id },
      });
      const unload = el("button", {
        type: "button",
        class: "secondary",
        text: "Unload",
        "aria-label": `Unload ${card.id}`,
        dataset: { action: "unload", model: card.id },
      });
      list.append(
        el(
          "li",
          { class: "model", dataset: { model: card.id, state } },
          el(
            "div",
            { class: "model-head" },
            el("h3", { text: card.id }),
            models.adminEndpoints === false
              ? el("div", { class: "actions" })
              : el("div", { class: "actions" }, load, unload),
          ),
          facts,
        ),
      );
    }
    renderModelSelect();
  }

  function fact(name, value, key, valueClass) {
    return el(
      "div",
      {},
      el("dt", { text: name }),
      el("dd", { text: value, class: valueClass, dataset: key ? { fact: key } : undefined }),
    );
  }

  function renderModelSelect() {
    const select = $("model-select");
    const previous = select.value;
    select.replaceChildren();
    // Rerankers have their own panel; they serve no embeddings. Sparse (SPLADE) models answer
    // {indices, values}, which this panel does not draw: they are left out of it.
    const embedders = models.cards.filter(
      (card) => card.task !== "rerank" && card.task !== "sparse",
    );
    for (const card of embedders) {
      const dims = card.dimensions ? `, ${card.dimensions} d` : "";
      select.append(el("option", { value: card.id, text: `${card.id} (${card.modality}${dims})` }));
    }
    const names = embedders.map((card) => card.id);
    if (names.includes(previous)) select.value = previous;
    else if (names.includes(models.defaultModel)) select.value = models.defaultModel;
    showModelHint();
    renderPromptSelect();
    renderRerankSelect();
  }

  // -- rerank ------------------------------------------------------------------------------------

  function renderRerankSelect() {
    const select = $("rerank-model");
    const previous = select.value;
    select.replaceChildren();
    const rerankers = models.cards.filter((card) => card.task === "rerank");
    for (const card of rerankers) select.append(el("option", { value: card.id, text: card.id }));
    if (rerankers.some((card) => card.id === previous)) select.value = previous;
    $("rerank-none").hidden = rerankers.length > 0;
    $("rerank-button").disabled = rerankers.length === 0;
  }

  async function rerank(event) {
    event.preventDefault();
    const documents = $("rerank-documents")
      .value.split("\n")
      .map((line) => line.trim())
      .filter(Boolean);
    const query = $("rerank-query").value.trim();
    const errorRegion = $("rerank-error");
    if (!query || documents.length === 0) {
      showError(errorRegion, { message: "Type a query and at least one document." });
      return;
    }
    const body = { model: $("rerank-model").value, query, documents };
    const state = $("rerank-state");
    state.textContent = `Ranking ${documents.length} document${documents.length === 1 ? "" : "s"}…`;
    const started = performance.now();
    let reply;
    try {
      reply = await call("POST", "/v1/rerank", { body });
    } catch (error) {
      showError(errorRegion, error);
      $("rerank-results").replaceChildren();
      state.textContent = "Failed.";
      return;
    }
    showError(errorRegion, null);
    const elapsed = Math.round(performance.now() - started);
    state.textContent = `Done: ${reply.usage.prompt_tokens} tokens, ${elapsed} ms.`;
    // The ranked list in the nearest-neighbours style: document, score, a bar for the score.
    $("rerank-results").replaceChildren(
      ...reply.results.map((item) => {
        const fill = el("span");
        fill.style.width = `${Math.min(1, Math.max(0, item.relevance_score)) * 100}%`;
        return el(
          "li",
          { dataset: { index: item.index, value: String(item.relevance_score) } },
          el(
            "div",
            { class: "neighbour" },
            el("span", {
              class: "neighbour-label",
              title: documents[item.index],
              text: `${item.index + 1}. ${documents[item.index]}`,
            }),
            el("span", { class: "neighbour-value", text: item.relevance_score.toFixed(4) }),
            el("span", { class: "bar", "aria-hidden": "true" }, fill),
          ),
        );
      }),
    );
    refreshStatus();
  }

  // Multimodal models (CLIP, SigLIP) take texts and images in one space: say what that gives.
  function showModelHint() {
    const card = models.cards.find((item) => item.id === $("model-select").value);
    $("multimodal-hint").hidden = !card || card.modality !== "multimodal";
  }

  // The prompts of the chosen model (a loaded model lists its saved ones too); "" sends no
  // prompt_name, so the model's default (or a pinned name's prompt) applies.
  function renderPromptSelect() {
    const select = $("prompt-select");
    const previous = select.value;
    const card = models.cards.find((item) => item.id === $("model-select").value);
    // Every text model has `query` and `document` (sentence-transformers 6), empty unless the
    // model defines them: an empty prompt is no prompt, so it is not offered.
    const prompts = Object.fromEntries(
      Object.entries((card && card.prompts) || {}).filter(([, text]) => text !== ""),
    );
    const fallback = card && card.default_prompt_name ? ` (${card.default_prompt_name})` : "";
    select.replaceChildren(el("option", { value: "", text: `Model default${fallback}` }));
    for (const [name, text] of Object.entries(prompts)) {
      select.append(el("option", { value: name, text: `${name}: “${text}”` }));
    }
    select.value = Object.hasOwn(prompts, previous) ? previous : "";
    select.disabled = Object.keys(prompts).length === 0;
  }

  async function lifecycle(button) {
    const { action, model } = button.dataset;
    if (button.getAttribute("aria-busy") === "true") return;
    button.setAttribute("aria-busy", "true");
    const item = button.closest("li");
    const stateCell = item ? item.querySelector('[data-fact="state"]') : null;
    if (stateCell) stateCell.textContent = action === "load" ? "loading…" : "unloading…";
    let failure = null;
    try {
      await call("POST", `/api/models/${encodeURIComponent(model)}/${action}`, { admin: true });
    } catch (error) {
      failure = error;
    } finally {
      button.removeAttribute("aria-busy");
    }
    await refreshModels();
    if (failure) showError($("models-error"), failure);
    // Keep keyboard focus on the same button once the list is drawn again.
    const again = document.querySelector(
      `#model-list button[data-action="${action}"][data-model="${CSS.escape(model)}"]`,
    );
    if (again && document.activeElement === document.body) again.focus();
    refreshStatus();
  }

  // -- playground --------------------------------------------------------------------------------

  const images = [];

  function addFiles(files) {
    for (const file of files) {
      const reader = new FileReader();
      reader.addEventListener("load", () => {
        images.push({ name: file.name || "image", dataUrl: String(reader.result) });
        renderImages();
      });
      reader.addEventListener("error", () => {
        showError($("embed-error"), { message: `Could not read ${file.name}.` });
      });
      reader.readAsDataURL(file);
    }
  }

  function renderImages() {
    const list = $("image-list");
    list.replaceChildren();
    images.forEach((image, index) => {
      const remove = el("button", {
        type: "button",
        class: "secondary",
        text: "Remove",
        "aria-label": `Remove ${image.name}`,
      });
      remove.addEventListener("click", () => {
        images.splice(index, 1);
        renderImages();
        $("image-input").focus();
      });
      list.append(
        el(
          "li",
          { dataset: { image: image.name } },
          el("img", { src: image.dataUrl, alt: "" }),
          el("span", { text: image.name }),
          remove,
        ),
      );
    });
  }

  function collectItems() {
    const texts = $("texts")
      .value.split("\n")
      .map((line) => line.replace(/\r$/, ""))
      .filter((line) => line.trim() !== "");
    return [
      ...texts.map((text) => ({ kind: "text", label: text, input: text })),
      ...images.map((image) => ({
        kind: "image",
        label: `image: ${image.name}`,
        name: image.name,
        input: image.dataUrl,
      })),
    ];
  }

  let embedding = false;

  async function embed(event) {
    event.preventDefault();
    if (embedding) return;
    const items = collectItems();
    const errorRegion = $("embed-error");
    if (items.length === 0) {
      showError(errorRegion, { message: "Type a text or add an image first." });
      return;
    }
    const body = { model: $("model-select").value, input: items.map((item) => item.input) };
    body.encoding_format = "float";
    const dimensions = $("dimensions").value.trim();
    if (dimensions) body.dimensions = Number(dimensions);
    const promptName = $("prompt-select").value;
    if (promptName) body.prompt_name = promptName;
    const button = $("embed-button");
    const state = $("embed-state");
    embedding = true;
    button.setAttribute("aria-busy", "true");
    state.textContent = `Embedding ${items.length} input${items.length === 1 ? "" : "s"}…`;
    const started = performance.now();
    let reply;
    try {
      reply = await call("POST", "/v1/embeddings", { body });
    } catch (error) {
      showError(errorRegion, error);
      $("result").hidden = true;
      state.textContent = "Failed.";
      return;
    } finally {
      embedding = false;
      button.removeAttribute("aria-busy");
    }
    const elapsedMs = performance.now() - started;
    showError(errorRegion, null);
    state.textContent = "Done.";
    const vectors = [...reply.data]
      .sort((a, b) => a.index - b.index)
      .map((item) => item.embedding);
    renderResult(items, vectors, reply, elapsedMs);
    refreshStatus();
  }

  function cosineMatrix(vectors) {
    const norms = vectors.map((vector) => Math.sqrt(vector.reduce((sum, x) => sum + x * x, 0)));
    return vectors.map((a, i) =>
      vectors.map((b, j) => {
        let dot = 0;
        for (let k = 0; k < a.length; k += 1) dot += a[k] * b[k];
        const scale = norms[i] * norms[j];
        return scale > 0 ? dot / scale : 0;
      }),
    );
  }

  // Blue for similar, orange for opposite, white for unrelated; the text is black or white,
  // whichever contrasts more with the cell (at least 4.5:1 for every colour).
  const POSITIVE = [29, 78, 216];
  const NEGATIVE = [180, 83, 9];

  function cellColour(value) {
    const strength = Math.min(1, Math.abs(value));
    const target = value >= 0 ? POSITIVE : NEGATIVE;
    return target.map((channel) => Math.round(255 + (channel - 255) * strength));
  }

  function luminance([r, g, b]) {
    const linear = [r, g, b].map((channel) => {
      const c = channel / 255;
      return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2];
  }

  function textColourOn(rgb) {
    const l = luminance(rgb);
    return (l + 0.05) / 0.05 >= 1.05 / (l + 0.05) ? "#000000" : "#ffffff";
  }

  let result = null;

  function renderResult(items, vectors, reply, elapsedMs) {
    const matrix = cosineMatrix(vectors);
    result = { items, matrix };
    $("result-model").textContent = reply.model;
    $("result-count").textContent = String(vectors.length);
    const dims = [...new Set(vectors.map((vector) => vector.length))];
    $("result-dims").textContent = dims.join(", ");
    const usage = reply.usage || {};
    $("result-tokens").textContent = String(usage.prompt_tokens ?? "–");
    $("result-time").textContent = `${elapsedMs.toFixed(0)} ms`;

    const table = $("heatmap");
    table.replaceChildren();
    table.append(
      el(
        "caption",
        { class: "visually-hidden", text: "Cosine similarity between every pair of inputs" },
      ),
    );
    const headRow = el("tr", {}, el("td", { class: "corner" }));
    items.forEach((item, index) => {
      headRow.append(
        el("th", { scope: "col", title: item.label, "aria-label": item.label, text: index + 1 }),
      );
    });
    table.append(el("thead", {}, headRow));
    const body = el("tbody");
    matrix.forEach((row, i) => {
      const tr = el(
        "tr",
        {},
        el("th", { scope: "row", title: items[i].label, text: `${i + 1}. ${items[i].label}` }),
      );
      row.forEach((value, j) => {
        const rgb = cellColour(value);
        const cell = el("td", {
          text: value.toFixed(3),
          dataset: { row: i, col: j, value: String(value) },
        });
        cell.style.backgroundColor = `rgb(${rgb.join(", ")})`;
        cell.style.color = textColourOn(rgb);
        tr.append(cell);
      });
      body.append(tr);
    });
    table.append(body);

    const query = $("query-select");
    query.replaceChildren();
    items.forEach((item, index) => {
      query.append(el("option", { value: index, text: `${index + 1}. ${item.label}` }));
    });
    query.value = "0";
    renderNeighbours();
    renderSearch(items, matrix);
    $("result").hidden = false;
  }

  // Text-to-image search: for each text of the request, its images, most similar first. Only a
  // multimodal model answers a request with both, so only its results show this.
  function renderSearch(items, matrix) {
    const region = $("search-results");
    region.replaceChildren();
    const entries = items.map((item, index) => ({ item, index }));
    const queries = entries.filter((entry) => entry.item.kind === "text");
    const pictures = entries.filter((entry) => entry.item.kind === "image");
    $("search").hidden = queries.length === 0 || pictures.length === 0;
    for (const query of queries) {
      const ranked = pictures
        .map((entry) => ({ ...entry, value: matrix[query.index][entry.index] }))
        .sort((a, b) => b.value - a.value);
      const headingId = `search-query-${query.index}`;
      const list = el("ol", { class: "ranked", "aria-labelledby": headingId });
      for (const entry of ranked) {
        list.append(
          el(
            "li",
            { dataset: { index: entry.index, value: String(entry.value) } },
            el("img", { src: entry.item.input, alt: "" }),
            el("span", { class: "ranked-name", title: entry.item.name, text: entry.item.name }),
            el("span", { class: "neighbour-value", text: entry.value.toFixed(3) }),
          ),
        );
      }
      region.append(
        el(
          "section",
          { class: "search-query", dataset: { query: query.index } },
          el("h4", { id: headingId, text: query.item.label }),
          list,
        ),
      );
    }
  }

  function renderNeighbours() {
    const list = $("neighbours");
    list.replaceChildren();
    if (!result) return;
    const query = Number($("query-select").value);
    const ranked = result.items
      .map((item, index) => ({ item, index, value: result.matrix[query][index] }))
      .filter((entry) => entry.index !== query)
      .sort((a, b) => b.value - a.value);
    for (const entry of ranked) {
      const fill = el("span");
      fill.style.width = `${Math.max(0, entry.value) * 100}%`;
      list.append(
        el(
          "li",
          { dataset: { index: entry.index, value: String(entry.value) } },
          el(
            "div",
            { class: "neighbour" },
            el("span", {
              class: "neighbour-label",
              title: entry.item.label,
              text: `${entry.index + 1}. ${entry.item.label}`,
            }),
            el("span", { class: "neighbour-value", text: entry.value.toFixed(3) }),
            el("span", { class: "bar", "aria-hidden": "true" }, fill),
          ),
        ),
      );
    }
  }

  // -- status ------------------------------------------------------------------------------------

  // Prometheus text exposition: `name{label="value",...} number` lines; comments skipped.
  function parsePrometheus(text) {
    const samples = [];
    const line = /^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
    const label = /([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    for (const raw of text.split("\n")) {
      if (!raw || raw.startsWith("#")) continue;
      const match = line.exec(raw);
      if (!match) continue;
      const labels = {};
      for (const [, name, value] of (match[2] || "").matchAll(label)) {
        labels[name] = value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      }
      samples.push({ name: match[1], labels, value: parseNumber(match[3]) });
    }
    return samples;
  }

  function parseNumber(text) {
    if (text === "+Inf") return Infinity;
    if (text === "-Inf") return -Infinity;
    return Number(text);
  }

  // The API routes' totals: requests, errors, latency sum and count, cumulative latency buckets.
  function trafficFrom(samples) {
    const traffic = { requests: 0, errors: 0, sum: 0, count: 0, buckets: new Map() };
    for (const { name, labels, value } of samples) {
      if (!labels.route || !labels.route.startsWith(API_ROUTE_PREFIX)) continue;
      if (name === "emb_provider_requests_total") {
        traffic.requests += value;
        if (Number(labels.status) >= 400) traffic.errors += value;
      } else if (name === "emb_provider_request_duration_seconds_sum") {
        traffic.sum += value;
      } else if (name === "emb_provider_request_duration_seconds_count") {
        traffic.count += value;
      } else if (name === "emb_provider_request_duration_seconds_bucket") {
        const bound = parseNumber(labels.le);
        traffic.buckets.set(bound, (traffic.buckets.get(bound) || 0) + value);
      }
    }
    return traffic;
  }

  // As Prometheus's histogram_quantile: linear within the bucket that holds the quantile.
  function quantile(q, cumulative) {
    const bounds = [...cumulative.keys()].sort((a, b) => a - b);
    const total = cumulative.get(Infinity) || 0;
    if (total <= 0) return null;
    const rank = q * total;
    let lowerBound = 0;
    let lowerCount = 0;
    for (const bound of bounds) {
      const count = cumulative.get(bound);
      if (count >= rank) {
        if (bound === Infinity) return lowerBound;
        const inBucket = count - lowerCount;
        const share = inBucket > 0 ? (rank - lowerCount) / inBucket : 1;
        return lowerBound + (bound - lowerBound) * share;
      }
      lowerBound = bound;
      lowerCount = count;
    }
    return lowerBound;
  }

  let previousScrape = null;

  async function refreshMetrics() {
    let text;
    try {
      text = await call("GET", "/metrics", { text: true });
      showError($("metrics-error"), null);
    } catch (error) {
      showError($("metrics-error"), error);
      return;
    }
    const now = performance.now();
    const traffic = trafficFrom(parsePrometheus(text));
    $("status-requests").textContent = String(traffic.requests);
    $("status-errors").textContent = String(traffic.errors);
    $("status-latency-total").textContent =
      traffic.count > 0 ? formatSeconds(traffic.sum / traffic.count) : "–";
    const previous = previousScrape;
    previousScrape = { at: now, traffic };
    if (!previous || traffic.requests < previous.traffic.requests) return; // first, or a restart
    const seconds = (now - previous.at) / 1000;
    const requests = traffic.requests - previous.traffic.requests;
    const count = traffic.count - previous.traffic.count;
    $("status-rps").textContent = seconds > 0 ? (requests / seconds).toFixed(2) : "–";
    if (count > 0) {
      const buckets = new Map();
      for (const [bound, value] of traffic.buckets) {
        buckets.set(bound, value - (previous.traffic.buckets.get(bound) || 0));
      }
      $("status-latency").textContent = formatSeconds(
        (traffic.sum - previous.traffic.sum) / count,
      );
      $("status-p95").textContent = formatSeconds(quantile(0.95, buckets));
    } else {
      $("status-latency").textContent = "no requests";
      $("status-p95").textContent = "no requests";
    }
  }

  async function refreshServerStatus() {
    let status;
    try {
      status = await call("GET", "/api/status");
      showError($("status-error"), null);
    } catch (error) {
      showError($("status-error"), error);
      return;
    }
    models.defaultModel = status.default_model;
    models.adminEndpoints = status.admin_endpoints ?? null;
    $("status-device").textContent = status.device;
    $("status-ready").textContent = status.ready ? "yes" : "no (loading the default model)";
    $("status-uptime").textContent = formatSeconds(status.uptime_s);
    $("status-rss").textContent = formatBytes(status.memory.process_rss_bytes);
    $("status-weights").textContent = formatBytes(status.memory.model_weights_bytes);
    const accelerator = status.memory.accelerator;
    $("status-accelerator").textContent = accelerator
      ? Object.entries(accelerator)
        .map(([kind, value]) => `${kind.replace(/_bytes$/, "")} ${formatBytes(value)}`)
        .join(", ")
      : "none (CPU)";
    let queued = 0;
    let inFlight = 0;
    for (const model of Object.values(status.models)) {
      queued += model.queued_inputs;
      inFlight += model.in_flight_requests;
    }
    $("status-queue").textContent = String(queued);
    $("status-in-flight").textContent = String(inFlight);
  }

  let statusTimer = null;
  let refreshing = false;

  async function refreshStatus() {
    if (refreshing) return;
    refreshing = true;
    try {
      await Promise.all([refreshServerStatus(), refreshMetrics()]);
      $("status-updated").textContent = `Updated ${new Date().toLocaleTimeString()}.`;
    } finally {
      refreshing = false;
    }
  }

  function scheduleStatus() {
    clearTimeout(statusTimer);
    const seconds = Number($("refresh-every").value);
    if (!seconds) return;
    statusTimer = setTimeout(async () => {
      if (!document.hidden) await refreshStatus();
      scheduleStatus();
    }, seconds * 1000);
  }

  // -- wiring ------------------------------------------------------------------------------------

  async function about() {
    try {
      const info = await call("GET", "/");
      $("version").textContent = info.version ? `v${info.version}` : "";
    } catch {
      $("version").textContent = "";
    }
  }

  function refreshAll() {
    previousScrape = null;
    refreshStatus().finally(refreshModels);
  }

  function init() {
    $("api-key").value = keys.api();
    $("admin-key").value = sessionStorage.getItem(ADMIN_KEY_STORAGE) || "";
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      keys.set($("api-key").value.trim(), $("admin-key").value.trim());
      $("key-state").textContent = keys.api() ? "Keys set for this tab." : "No API key set.";
      refreshAll();
    });
    $("forget-keys").addEventListener("click", () => {
      keys.set("", "");
      $("api-key").value = "";
      $("admin-key").value = "";
      $("key-state").textContent = "Keys forgotten.";
      refreshAll();
    });

    $("embed-form").addEventListener("submit", embed);
    $("rerank-form").addEventListener("submit", rerank);
    $("clear-inputs").addEventListener("click", () => {
      $("texts").value = "";
      images.splice(0, images.length);
      renderImages();
      showError($("embed-error"), null);
      $("texts").focus();
    });
    $("model-select").addEventListener("change", showModelHint);
    $("query-select").addEventListener("change", renderNeighbours);

    const zone = $("drop-zone");
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      if (event.dataTransfer) addFiles(event.dataTransfer.files);
    });
    // A file dropped beside the zone must not navigate away from the page.
    window.addEventListener("dragover", (event) => event.preventDefault());
    window.addEventListener("drop", (event) => event.preventDefault());
    $("image-input").addEventListener("change", (event) => {
      addFiles(event.target.files);
      event.target.value = "";
    });

    $("model-list").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-action]");
      if (button) lifecycle(button);
    });
    $("refresh-models").addEventListener("click", refreshModels);
    $("model-select").addEventListener("change", renderPromptSelect);
    $("refresh-every").addEventListener("change", () => {
      refreshStatus();
      scheduleStatus();
    });

    about();
    refreshAll();
    scheduleStatus();
  }

  init();
})();
