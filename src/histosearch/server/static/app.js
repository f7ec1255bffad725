// The histosearch page: slide list, OpenSeadragon viewers, region search, results, heat map.
"use strict";

const OSD_IMAGES = "/static/node_modules/openseadragon/build/openseadragon/images/";
const MATCH_COLOURS = ["#ff1744", "#00e676", "#2979ff", "#ffea00", "#d500f9", "#ff9100",
  "#00e5ff", "#76ff03", "#f50057", "#651fff", "#1de9b6", "#ffc400"];
const SHOWN_MATCHES = MATCH_COLOURS.length;
// Heat map colours (low to high cosine), interpolated.
const HEAT_STOPS = [[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]];
const PERCENTILE_HELP = "Percentile: the similarity ranked among those of the archive's own " +
  "slides (for a patch result, patches) to their nearest other entry: the 75th is closer " +
  "than 3 in 4 of them, the 0th farther than all. Closeness, not diagnosis: a hit of another " +
  "class can rank high.";

const state = {
  token: sessionStorage.getItem("histosearch-token") || "",
  slides: [],
  columns: [],         // the columns filters can name (/api/columns)
  current: null,       // the slide shown in the query viewer
  upload: null,        // {name, url} of an uploaded query
  response: null,      // the last search response
  selected: null,      // the slide result shown beside the query
  heatmap: null,       // the heat map overlay element
  drawing: false,
  model: null,         // the server's encoder: "loading", "ready" or "failed" (/api/health)
  tilesLoaded: { query: 0, result: 0 },
};
window.histosearch = state;  // for the browser test and the curious

const $ = (id) => document.getElementById(id);

function setStatus(text, error = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", error);
}

function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { ...authHeaders(), ...(options.headers || {}) },
  });
  if (response.status === 401) {
    $("token-form").hidden = false;
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      detail = (await response.json()).detail || detail;
    } catch (_) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

// <img> cannot send a bearer token: with one, images are fetched and shown from blobs.
async function setImage(img, path) {
  if (!state.token) {
    img.src = path;
    return;
  }
  try {
    const blob = await (await api(path)).blob();
    img.src = URL.createObjectURL(blob);
  } catch (error) {
    img.alt = error.message;
  }
}

function image(path, alt) {
  const img = document.createElement("img");
  img.alt = alt;
  img.loading = "lazy";
  setImage(img, path);
  return img;
}

function makeViewer(id, key) {
  const viewer = OpenSeadragon({
    id,
    prefixUrl: OSD_IMAGES,
    drawer: "canvas",
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    loadTilesWithAjax: Boolean(state.token),
    ajaxHeaders: authHeaders(),
    gestureSettingsMouse: { clickToZoom: false, flickEnabled: false },
    maxZoomPixelRatio: 2,
    animationTime: 0.4,
  });
  viewer.addHandler("tile-loaded", () => { state.tilesLoaded[key] += 1; });
  return viewer;
}

let queryViewer = null;
let resultViewer = null;

// ---- slides -------------------------------------------------------------------------------

async function loadArchive() {
  try {
    const health = await (await api("/api/health")).json();
    state.model = health.model;
    $("archive-info").textContent =
      `${health.slides} slides, ${health.patches} patches · ${health.encoder} at ` +
      `${health.magnification}x, ${health.tile_size} px tiles`;
    if (!health.viewer) {
      setStatus("OpenSeadragon is not installed: run `bash dev.sh` (npm ci) and reload", true);
    }
  } catch (error) {
    $("archive-info").textContent = error.message;
    return;
  }
  state.slides = [];
  for (let offset = 0; ; offset += 500) {
    const page = await (await api(`/api/slides?offset=${offset}&limit=500`)).json();
    state.slides.push(...page.slides);
    if (state.slides.length >= page.total || page.slides.length === 0) break;
  }
  renderSlideList();
  await loadColumns();
  const first = state.slides.find((s) => s.viewable) || state.slides[0];
  if (first) selectSlide(first);
}

function renderSlideList() {
  const list = $("slide-list");
  list.replaceChildren();
  for (const slide of state.slides) {
    const item = document.createElement("li");
    item.dataset.slide = slide.id;
    const text = document.createElement("div");
    const kind = slide.viewable ? "slide" : "patches";
    text.innerHTML = `<div class="name"></div><div class="meta"></div>`;
    text.querySelector(".name").textContent = slide.name;
    text.querySelector(".meta").textContent =
      `${slide.label || "no label"} · ${slide.patches} patches `;
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = kind;
    text.querySelector(".meta").append(badge);
    text.append(metadataLine(slide.metadata));
    item.append(image(`/api/slides/${slide.id}/thumbnail`, slide.name), text);
    item.addEventListener("click", () => selectSlide(slide));
    // what the filter box matches: name, label, patient, group and metadata values
    item.dataset.text = [slide.name, slide.label, slide.patient, slide.group,
      ...Object.values(slide.metadata || {})].filter(Boolean).join(" ").toLowerCase();
    list.append(item);
  }
  filterSlideList();
}

// The slides whose name, label, patient, group or metadata contain every word typed.
function filterSlideList() {
  const words = $("slide-filter").value.toLowerCase().split(/\s+/).filter(Boolean);
  let shown = 0;
  for (const item of $("slide-list").children) {
    item.hidden = !words.every((word) => item.dataset.text.includes(word));
    shown += item.hidden ? 0 : 1;
  }
  $("slide-count").textContent = words.length
    ? `${shown} of ${state.slides.length}` : `${state.slides.length}`;
}

// A slide's metadata as one line of text (never markup: a value is shown, never run).
function metadataLine(metadata) {
  const line = document.createElement("div");
  line.className = "metadata";
  line.textContent = Object.entries(metadata || {}).map(([k, v]) => `${k}: ${v}`).join(" · ");
  return line;
}

// ---- filters ------------------------------------------------------------------------------

// Controls built from the archive's own columns: a list of values for text columns with few
// distinct values, a substring box for the other text columns, a range for numbers and dates.
async function loadColumns() {
  state.columns = await (await api("/api/columns")).json();
  const box = $("filters");
  box.replaceChildren();
  const vote = $("opt-vote");
  vote.replaceChildren();
  for (const column of state.columns) {
    if (column.name !== "name") vote.append(new Option(column.name, column.name));
    const label = document.createElement("label");
    label.append(`${column.name} `);
    label.dataset.column = column.name;
    label.dataset.kind = column.kind;
    if (column.kind !== "text") {
      const range = document.createElement("span");
      range.className = "range";
      for (const [bound, value] of [["min", column.min], ["max", column.max]]) {
        const input = document.createElement("input");
        input.type = column.kind === "date" ? "date" : "number";
        input.dataset.bound = bound;
        input.placeholder = value;
        input.title = `${bound} ${value}`;
        range.append(input);
      }
      label.append(range);
    } else if (column.values) {
      const select = document.createElement("select");
      select.multiple = true;  // nothing chosen: no filter
      select.size = Math.min(column.values.length, 4);
      for (const value of column.values) select.append(new Option(value, value));
      label.append(select);
    } else {
      const input = document.createElement("input");
      input.type = "search";
      input.placeholder = "contains…";
      label.append(input);
    }
    box.append(label);
  }
  vote.value = "label";
}

function quoted(value) {
  return value.includes("'") ? `"${value}"` : `'${value}'`;
}

// The `where` clauses the controls ask for (the API's grammar, as `search --where`).
function whereClauses() {
  const clauses = [];
  for (const label of $("filters").children) {
    const column = label.dataset.column;
    if (label.dataset.kind !== "text") {
      for (const input of label.querySelectorAll("input")) {
        if (input.value !== "") {
          clauses.push(`${column} ${input.dataset.bound === "min" ? ">=" : "<="} ${input.value}`);
        }
      }
      continue;
    }
    const select = label.querySelector("select");
    if (select) {
      const chosen = [...select.selectedOptions].map((option) => quoted(option.value));
      if (chosen.length) clauses.push(`${column} in (${chosen.join(", ")})`);
    } else if (label.querySelector("input").value.trim()) {
      clauses.push(`${column} ~ ${quoted(label.querySelector("input").value.trim())}`);
    }
  }
  return clauses;
}

function selectSlide(slide) {
  state.current = slide;
  state.upload = null;
  for (const item of $("slide-list").children) {
    item.classList.toggle("active", Number(item.dataset.slide) === slide.id);
  }
  $("query-title").textContent = `${slide.name} (${slide.label || "no label"})`;
  $("btn-whole").disabled = false;
  $("btn-draw").disabled = !slide.viewable;
  closeResult();
  showQuerySlide(slide);
}

function showQuerySlide(slide) {
  const gallery = $("query-gallery");
  if (slide.viewable) {
    gallery.hidden = true;
    $("viewer-query").hidden = false;
    queryViewer.clearOverlays();
    state.tilesLoaded.query = 0;
    queryViewer.open(`/slides/${slide.id}.dzi`);
  } else {
    $("viewer-query").hidden = true;
    gallery.hidden = false;
    const rows = [...Array(Math.min(slide.patches, 24)).keys()];
    gallery.replaceChildren(...rows.map((row) =>
      figure(`/api/slides/${slide.id}/patches/${row}.jpeg`, `patch ${row + 1}`)));
  }
}

function figure(path, caption) {
  const fig = document.createElement("figure");
  const text = document.createElement("figcaption");
  text.textContent = caption;
  fig.append(image(path, caption), text);
  return fig;
}

// ---- drawing a region ---------------------------------------------------------------------

let regionStart = null;
let regionBox = null;

function setDrawing(on) {
  state.drawing = on;
  $("btn-draw").setAttribute("aria-pressed", String(on));
  setStatus(on ? "drag a rectangle on the slide" : "");
}

function installRegionDrawing(viewer) {
  viewer.addHandler("canvas-press", (event) => {
    if (!state.drawing) return;
    regionStart = viewer.viewport.pointFromPixel(event.position);
    viewer.clearOverlays();
    regionBox = document.createElement("div");
    regionBox.className = "region-box";
    viewer.addOverlay(regionBox, new OpenSeadragon.Rect(regionStart.x, regionStart.y, 0, 0));
  });
  viewer.addHandler("canvas-drag", (event) => {
    if (!state.drawing || !regionStart) return;
    event.preventDefaultAction = true;  // draw, do not pan
    viewer.updateOverlay(regionBox, rectBetween(regionStart,
      viewer.viewport.pointFromPixel(event.position)));
  });
  viewer.addHandler("canvas-release", (event) => {
    if (!state.drawing || !regionStart) return;
    const rect = rectBetween(regionStart, viewer.viewport.pointFromPixel(event.position));
    regionStart = null;
    setDrawing(false);
    const box = viewer.world.getItemAt(0).viewportToImageRectangle(rect);
    const [width, height] = [state.current.width, state.current.height];
    const x = Math.max(0, Math.round(box.x));
    const y = Math.max(0, Math.round(box.y));
    const w = Math.round(Math.min(box.x + box.width, width) - x);
    const h = Math.round(Math.min(box.y + box.height, height) - y);
    if (w < 2 || h < 2) {
      setStatus("the rectangle is empty: drag over the slide", true);
      return;
    }
    searchSlide([x, y, w, h]);
  });
}

function rectBetween(a, b) {
  return new OpenSeadragon.Rect(Math.min(a.x, b.x), Math.min(a.y, b.y),
    Math.abs(a.x - b.x), Math.abs(a.y - b.y));
}

// ---- searching ----------------------------------------------------------------------------

function options() {
  const exclude = [...document.querySelectorAll("input[name=exclude]:checked")]
    .map((box) => box.value);
  return {
    k: Number($("opt-k").value) || 5,
    mode: $("opt-mode").value,
    exclude,
    where: whereClauses(),
    vote_on: $("opt-vote").value || "label",
    level: $("opt-level").value,
  };
}

async function searchSlide(region = null) {
  const body = { slide: state.current.id, ...options() };
  if (region) body.region = region;
  await runSearch(() => api("/api/search", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  }));
}

async function searchUpload(file) {
  const form = new FormData();
  form.append("file", file);
  const { k, mode, exclude, where, vote_on: voteOn, level } = options();
  form.append("k", k);
  form.append("mode", mode);
  form.append("vote_on", voteOn);
  form.append("level", level);
  for (const clause of where) form.append("where", clause);
  for (const value of exclude.filter((e) => e !== "slide")) form.append("exclude", value);
  for (const field of ["mpp", "magnification"]) {
    const value = $(`upload-${field}`).value.trim();
    if (value) form.append(field, value);
  }
  state.current = null;
  state.upload = { name: file.name, url: URL.createObjectURL(file) };
  for (const item of $("slide-list").children) item.classList.remove("active");
  $("query-title").textContent = `upload: ${file.name}`;
  $("btn-draw").disabled = true;
  $("btn-whole").disabled = true;
  closeResult();
  $("viewer-query").hidden = true;
  const gallery = $("query-gallery");
  gallery.hidden = false;
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = state.upload.url;
  img.alt = file.name;
  const caption = document.createElement("figcaption");
  caption.textContent = file.name;
  fig.append(img, caption);
  gallery.replaceChildren(fig);
  await runSearch(() => api("/api/search", { method: "POST", body: form }), true);
}

// While the server still builds its encoder (after start-up), a search that embeds waits for
// it: say so, and say "searching" once the server reports it ready.
function watchModel(search) {
  const check = async () => {
    try {
      state.model = (await (await api("/api/health")).json()).model;
    } catch (_) { return; }
    if (search.done) return;
    if (state.model === "loading") {
      setStatus("loading the model… (once, after the server starts; the search waits for it)");
      search.timer = setTimeout(check, 1000);
    } else {
      setStatus("searching…");
    }
  };
  if (state.model !== "ready") check();
}

async function runSearch(request, embeds = false) {
  setStatus("searching…");
  const search = { done: false, timer: null };
  if (embeds) watchModel(search);
  const started = performance.now();
  try {
    state.response = await (await request()).json();
  } catch (error) {
    setStatus(error.message, true);
    return;
  } finally {
    search.done = true;
    clearTimeout(search.timer);
  }
  const { query, mode, results, level } = state.response;
  const what = level === "case" ? "cases" : mode;
  setStatus(`${results.length} ${what} in ${Math.round(performance.now() - started)} ms` +
    ` · query of ${query.patches} patch${query.patches === 1 ? "" : "es"}`);
  renderResults();
}

function percent(value) {
  return `${(100 * value).toFixed(1)}%`;
}

// 1st, 2nd, 3rd, 4th, ... 11th, 12th, 13th, ... 21st, 22nd (as the command line writes them).
function ordinal(n) {
  const suffix = n % 100 >= 10 && n % 100 <= 20 ? "th"
    : { 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th";
  return `${n}${suffix}`;
}

// "53rd percentile", explained by its tooltip.
function percentileSpan(value) {
  const span = document.createElement("span");
  span.className = "pct";
  span.title = PERCENTILE_HELP;
  span.textContent = value === null ? "no percentile (archive not calibrated)"
    : `${ordinal(Math.round(value))} percentile`;
  return span;
}

function feedbackButtons(hit, row) {
  const box = document.createElement("div");
  box.className = "feedback";
  for (const [text, relevant] of [["relevant", true], ["not relevant", false]]) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = text;
    button.dataset.relevant = String(relevant);
    button.addEventListener("click", async (event) => {
      event.stopPropagation();
      const query = state.response.query;
      try {
        await api("/api/feedback", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({
            query_id: state.response.query_id,
            query_slide: query.slide_id,
            query_name: query.name,
            region: query.region,
            mode: state.response.mode,
            result_slide: hit.slide_id,
            result_row: row,
            similarity: hit.similarity,
            relevant,
          }),
        });
        for (const other of box.children) other.classList.toggle("chosen", other === button);
      } catch (error) {
        setStatus(error.message, true);
      }
    });
    box.append(button);
  }
  return box;
}

function renderResults() {
  const { mode, results } = state.response;
  const list = $("slide-results");
  const gallery = $("patch-results");
  list.replaceChildren();
  gallery.replaceChildren();
  $("notice").hidden = !state.response.note;
  $("notice").textContent = state.response.note || "";
  $("percentile-help").hidden = results.length === 0;
  if (state.current && !state.current.viewable) showQuerySlide(state.current);  // unnumbered
  showConsensus();
  showQueryRegion();
  (mode === "slides" ? results : []).forEach((hit, rank) => {
    const item = document.createElement("li");
    item.dataset.slide = hit.slide_id;
    const text = document.createElement("div");
    text.innerHTML = `<div><b class="rank"></b> <span class="name"></span></div>
      <div class="label"></div><div class="score"><span class="sim"></span> · </div>`;
    text.querySelector(".rank").textContent = `${rank + 1}.`;
    text.querySelector(".name").textContent = hit.slide;
    text.querySelector(".label").textContent = hit.label || "no label";
    text.querySelector(".sim").textContent = percent(hit.similarity);
    text.querySelector(".score").append(percentileSpan(hit.percentile));
    if (hit.case) {
      const line = document.createElement("div");
      line.className = "case";
      line.textContent = `case ${hit.case} · ${hit.case_matched} of ${hit.case_slides} slides`;
      text.append(line);
    }
    text.append(metadataLine(hit.metadata), feedbackButtons(hit, null));
    item.append(image(`/api/slides/${hit.slide_id}/thumbnail`, hit.slide), text);
    item.addEventListener("click", () => openResult(hit));
    list.append(item);
  });
  for (const hit of mode === "patches" ? results : []) {
    const where = hit.patch || `x=${hit.tile.x}, y=${hit.tile.y}`;
    const path = hit.row === null ? `/api/slides/${hit.slide_id}/thumbnail`
      : `/api/slides/${hit.slide_id}/patches/${hit.row}.jpeg`;
    const fig = figure(path, `${hit.slide} · ${where}`);
    fig.dataset.slide = hit.slide_id;
    const caption = fig.querySelector("figcaption");
    caption.append(document.createElement("br"),
      `${hit.label || "no label"} · ${percent(hit.similarity)} · `,
      percentileSpan(hit.percentile));
    fig.append(metadataLine(hit.metadata), feedbackButtons(hit, hit.row));
    fig.addEventListener("click", () => openPatch(hit, fig));
    gallery.append(fig);
  }
}

// The consensus of the top k above the results: "label: lung_aca 4 of 5 (80%) · lung_scc 1".
function showConsensus() {
  const box = $("consensus");
  const { consensus, where } = state.response;
  box.hidden = !consensus;
  if (!consensus) return;
  const votes = Object.entries(consensus.votes)
    .filter(([value]) => value !== consensus.majority)
    .map(([value, n]) => ` · ${value} ${n}`).join("");
  box.textContent = consensus.majority === null
    ? `consensus on ${consensus.column}: no result has a value`
    : `consensus of the top ${consensus.k} on ${consensus.column}: ${consensus.majority} ` +
      `${consensus.votes[consensus.majority]} of ${consensus.k} ` +
      `(${Math.round(100 * consensus.agreement)}%)${votes}` +
      (where.length ? ` · where ${where.join(" and ")}` : "");
}

// The query's region on the query viewer (numbered when its one tile is a matched pair's).
function showQueryRegion(label = null) {
  if (!state.current || !state.current.viewable) return;
  queryViewer.clearOverlays();
  const region = state.response.query.region;
  if (region) {
    addBox(queryViewer, region[0], region[1], region[2], region[3], "region-box",
      label && MATCH_COLOURS[0], label);
  }
}

function addBox(viewer, x, y, w, h, className, colour = null, label = null) {
  const item = viewer.world.getItemAt(0);
  if (!item) return null;
  const element = document.createElement("div");
  element.className = className;
  if (colour) element.style.borderColor = colour;
  if (label !== null) {
    const tag = document.createElement("span");
    tag.textContent = label;
    tag.style.background = colour;
    element.append(tag);
  }
  viewer.addOverlay(element, item.imageToViewportRectangle(x, y, w, h));
  return element;
}

// ---- a result beside the query ------------------------------------------------------------

function closeResult() {
  state.selected = null;
  $("result-pane").hidden = true;
  $("btn-heatmap").disabled = true;
  $("btn-qupath").disabled = true;
  setHeatmapButton(false);
  if (resultViewer) resultViewer.close();
}

// Open a slide in a viewer whose pane may just have been shown: the viewer learns its new size
// on its next frame, and the slide is fitted to that size.
function openShown(viewer, source, then) {
  viewer.addOnceHandler("open", () => {
    const size = viewer.viewport.getContainerSize();
    const element = viewer.element;
    if (Math.round(size.x) === element.clientWidth && Math.round(size.y) === element.clientHeight) {
      viewer.viewport.goHome(true);
    } else {
      // after OpenSeadragon's own zoom, which keeps the old scale, right after this event
      viewer.addOnceHandler("resize", () => setTimeout(() => viewer.viewport.goHome(true)));
    }
    then();
  });
  viewer.open(source);
}

function openResult(hit) {
  state.selected = hit;
  for (const item of $("slide-results").children) {
    item.classList.toggle("active", Number(item.dataset.slide) === hit.slide_id);
  }
  $("result-pane").hidden = false;
  $("result-title").textContent =
    `${hit.slide} (${hit.label || "no label"}) · ${percent(hit.similarity)}`;
  // The best matches, strongest first, numbered alike on both sides. A match's place in the
  // list is its query tile's place among the query's tiles (its row, for a patch group).
  const pairs = hit.matches.map((pair, tile) => ({ ...pair, tile }))
    .sort((a, b) => b.cosine - a.cosine).slice(0, SHOWN_MATCHES);
  numberQuerySide(pairs);
  const gallery = $("result-gallery");
  $("btn-heatmap").disabled = !hit.viewable;
  $("btn-qupath").disabled = !hit.viewable;
  setHeatmapButton(false);
  if (hit.viewable) {
    gallery.hidden = true;
    $("viewer-result").hidden = false;
    state.tilesLoaded.result = 0;
    openShown(resultViewer, `/slides/${hit.slide_id}.dzi`, () => {
      pairs.forEach((pair, i) => addBox(resultViewer, pair.match.x, pair.match.y,
        pair.match.size, pair.match.size, "match-box", MATCH_COLOURS[i], String(i + 1)));
      document.body.dataset.resultOverlays = String(pairs.length);
    });
  } else {
    resultViewer.close();
    $("viewer-result").hidden = true;
    gallery.hidden = false;
    gallery.replaceChildren(...pairs.map((pair, i) => {
      const row = pair.row;
      const path = row === null ? `/api/slides/${hit.slide_id}/thumbnail`
        : `/api/slides/${hit.slide_id}/patches/${row}.jpeg`;
      const fig = figure(path, `${i + 1}. cosine ${pair.cosine.toFixed(3)}`);
      fig.style.borderColor = MATCH_COLOURS[i];
      return fig;
    }));
    document.body.dataset.resultOverlays = String(pairs.length);
  }
}

// The query's side of the numbered pairs: outlined tiles on a slide; for a patch group, its
// matched patches; for an upload, the uploaded image (one tile) or its tiles' positions.
function numberQuerySide(pairs) {
  const numbered = (pair, i) => `${i + 1}. tile at x=${pair.query.x}, y=${pair.query.y}`;
  if (state.current && state.current.viewable) {
    showQueryRegion();
    pairs.forEach((pair, i) => addBox(queryViewer, pair.query.x, pair.query.y, pair.query.size,
      pair.query.size, "match-box", MATCH_COLOURS[i], String(i + 1)));
    queryViewer.forceRedraw();
  } else if (state.current) {
    $("query-gallery").replaceChildren(...pairs.map((pair, i) => {
      const fig = figure(`/api/slides/${state.current.id}/patches/${pair.tile}.jpeg`,
        `${i + 1}. patch ${pair.tile + 1}`);
      fig.style.borderColor = MATCH_COLOURS[i];
      return fig;
    }));
  } else if (state.upload) {
    const fig = $("query-gallery").querySelector("figure");
    const caption = fig.querySelector("figcaption");
    if (pairs.length === 1 && state.response.query.patches === 1) {
      caption.textContent = `1. ${state.upload.name}`;
      fig.style.borderColor = MATCH_COLOURS[0];
    } else {
      caption.replaceChildren(state.upload.name, ...pairs.flatMap((pair, i) =>
        [document.createElement("br"), numbered(pair, i)]));
    }
  }
  document.body.dataset.queryNumbers = String(pairs.length);
}

// A patch result: its tile on its slide, or the patch image itself, beside the query.
function openPatch(hit, fig) {
  const slide = state.slides.find((s) => s.id === hit.slide_id);
  state.selected = null;
  for (const other of $("patch-results").children) other.classList.toggle("active", other === fig);
  $("result-pane").hidden = false;
  $("result-title").textContent = `${hit.slide} · ${hit.patch || `x=${hit.tile.x}, y=${hit.tile.y}`}` +
    ` · ${percent(hit.similarity)}`;
  $("btn-heatmap").disabled = true;
  $("btn-qupath").disabled = true;
  setHeatmapButton(false);
  if (state.response.query.patches === 1) {  // its one tile is the pair's query side
    if (state.current && state.current.viewable) showQueryRegion("1");
    else numberQuerySide([{ query: { x: 0, y: 0 }, tile: 0 }]);
  }
  if (!slide || !slide.viewable) {
    resultViewer.close();
    $("viewer-result").hidden = true;
    const gallery = $("result-gallery");
    gallery.hidden = false;
    const opened = figure(`/api/slides/${hit.slide_id}/patches/${hit.row}.jpeg`,
      `1. ${hit.patch || `row ${hit.row}`} · ${hit.label || "no label"}`);
    opened.classList.add("opened");
    opened.style.borderColor = MATCH_COLOURS[0];
    gallery.replaceChildren(opened);
    document.body.dataset.resultOverlays = "1";
    return;
  }
  $("result-gallery").hidden = true;
  $("viewer-result").hidden = false;
  openShown(resultViewer, `/slides/${hit.slide_id}.dzi`, () => {
    const item = resultViewer.world.getItemAt(0);
    addBox(resultViewer, hit.tile.x, hit.tile.y, hit.tile.size, hit.tile.size, "match-box",
      MATCH_COLOURS[0], "1");
    resultViewer.viewport.fitBounds(item.imageToViewportRectangle(
      hit.tile.x - hit.tile.size, hit.tile.y - hit.tile.size, 3 * hit.tile.size,
      3 * hit.tile.size), true);
  });
}

// The selected slide result's matched tiles as a QuPath GeoJSON file, fetched with the token.
async function downloadQupath() {
  const hit = state.selected;
  if (!hit) return;
  let response;
  try {
    response = await api(`/api/queries/${state.response.query_id}/qupath/${hit.slide_id}`);
  } catch (error) {
    setStatus(error.message, true);
    return;
  }
  const disposition = response.headers.get("Content-Disposition") || "";
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = (disposition.match(/filename="([^"]+)"/) || [])[1] || "matches.geojson";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href));
}

// ---- heat map -----------------------------------------------------------------------------

function setHeatmapButton(on) {
  $("btn-heatmap").setAttribute("aria-pressed", String(on));
  $("heat-legend").hidden = !on;
  if (!on && state.heatmap && resultViewer) {
    resultViewer.removeOverlay(state.heatmap);
    state.heatmap = null;
  }
}

function heatColour(t) {
  const scaled = Math.min(Math.max(t, 0), 1) * (HEAT_STOPS.length - 1);
  const i = Math.min(Math.floor(scaled), HEAT_STOPS.length - 2);
  const f = scaled - i;
  return HEAT_STOPS[i].map((c, j) => Math.round(c + f * (HEAT_STOPS[i + 1][j] - c)));
}

async function toggleHeatmap() {
  const on = $("btn-heatmap").getAttribute("aria-pressed") !== "true";
  setHeatmapButton(on);
  if (!on || !state.selected) return;
  const hit = state.selected;
  let heat;
  try {
    heat = await (await api(
      `/api/queries/${state.response.query_id}/heatmap/${hit.slide_id}`)).json();
  } catch (error) {
    setStatus(error.message, true);
    setHeatmapButton(false);
    return;
  }
  if (state.selected !== hit || !heat.tiles.length) return;
  // One canvas pixel per tile of the grid, stretched over the slide; colours on one absolute
  // scale, cosine 0 to 1, the same for every result (the colour bar's).
  const size = heat.tile_size;
  const cols = Math.max(...heat.tiles.map((t) => Math.round(t.x / size))) + 1;
  const rows = Math.max(...heat.tiles.map((t) => Math.round(t.y / size))) + 1;
  const cosines = heat.tiles.map((t) => t.cosine);
  const canvas = document.createElement("canvas");
  canvas.width = cols;
  canvas.height = rows;
  canvas.className = "heatmap";
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(cols, rows);
  for (const tile of heat.tiles) {
    const offset = 4 * (Math.round(tile.y / size) * cols + Math.round(tile.x / size));
    pixels.data.set([...heatColour(tile.cosine), 255], offset);
  }
  context.putImageData(pixels, 0, 0);
  const item = resultViewer.world.getItemAt(0);
  resultViewer.addOverlay(canvas, item.imageToViewportRectangle(0, 0, cols * size, rows * size));
  state.heatmap = canvas;
  setStatus(`heat map: each tile's best cosine to the query, ${Math.min(...cosines).toFixed(2)}` +
    ` to ${Math.max(...cosines).toFixed(2)} on this slide (colour bar: 0 to 1)`);
}

// The colour bar under the result viewer: the heat map's colours from cosine 0 to 1.
function buildHeatLegend() {
  const stops = HEAT_STOPS.map((c, i) =>
    `rgb(${c.join(", ")}) ${(100 * i / (HEAT_STOPS.length - 1)).toFixed(0)}%`);
  $("heat-legend").querySelector(".bar").style.background =
    `linear-gradient(to right, ${stops.join(", ")})`;
}

// ---- start --------------------------------------------------------------------------------

function start() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("token")) {
    state.token = fragment.get("token");
    sessionStorage.setItem("histosearch-token", state.token);
    history.replaceState(null, "", location.pathname);
  }
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("histosearch-token", $("token-input").value);
    location.reload();
  });
  if (typeof OpenSeadragon === "undefined") {
    setStatus("OpenSeadragon is not installed: run `bash dev.sh` (npm ci) and reload", true);
    return;
  }
  queryViewer = makeViewer("viewer-query", "query");
  resultViewer = makeViewer("viewer-result", "result");
  queryViewer.addHandler("open", () => {
    const size = queryViewer.world.getItemAt(0).getContentSize();
    if (state.current) Object.assign(state.current, { width: size.x, height: size.y });
  });
  installRegionDrawing(queryViewer);
  $("btn-draw").addEventListener("click", () => setDrawing(!state.drawing));
  $("btn-whole").addEventListener("click", () => searchSlide());
  $("btn-heatmap").addEventListener("click", toggleHeatmap);
  $("btn-qupath").addEventListener("click", downloadQupath);
  $("percentile-help").textContent = PERCENTILE_HELP;
  buildHeatLegend();
  $("slide-filter").addEventListener("input", filterSlideList);
  $("upload-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const file = $("upload-file").files[0];
    if (file) searchUpload(file);
  });
  loadArchive();
}

start();
