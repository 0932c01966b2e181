// chestct web page: model status, file upload (chooser or drag-and-drop), result display; a zipped DICOM series
// (posted to /predict/series) is shown as one card per series.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  status: $("status"), statusText: $("status-text"),
  input: $("file-input"), zone: $("drop-zone"),
  preview: $("preview"), previewImg: $("preview-image"), previewNote: $("preview-note"), previewCaption: $("preview-caption"),
  announce: $("announce"), placeholder: $("placeholder"), busy: $("busy"), busyText: $("busy-text"), error: $("error"),
  result: $("result"), diagnosis: $("diagnosis"), probability: $("probability"), calibration: $("calibration"), domainWarning: $("domain-warning"), bar: $("probability-bar"),
  fill: $("probability-fill"), marker: $("threshold-marker"), confidence: $("confidence"),
  format: $("model-format"), sha: $("model-sha"), image: $("result-image"), caption: $("result-caption"),
  toggle: $("gradcam-toggle"), gradcamNote: $("gradcam-note"), lesionToggle: $("lesion-toggle"),
  seriesInput: $("series-input"), seriesButton: $("series-button"), seriesResult: $("series-result"),
  seriesSummary: $("series-summary"), seriesList: $("series-list"), seriesModel: $("series-model"),
  notDicom: $("not-dicom"), notDicomSummary: $("not-dicom-summary"), notDicomList: $("not-dicom-list"),
};

let previewUrl = null;   // object URL of the current preview, revoked when replaced
let current = null;      // the result being shown

const fmt = (x) => Number(x).toFixed(2);

function setState(state) {
  document.body.dataset.state = state;
  const busy = state === "busy";
  els.busy.hidden = !busy;
  els.zone.setAttribute("aria-disabled", String(busy));
  els.input.disabled = busy;
  els.seriesInput.disabled = busy;
  els.seriesButton.disabled = busy;
}

// FastAPI sends {"detail": "..."}; its validation errors (422) send a list of {msg, loc}.
function detailText(body, response) {
  const d = body && body.detail;
  if (typeof d === "string" && d) return d;
  if (Array.isArray(d)) return d.map((e) => (e && e.msg) || JSON.stringify(e)).join("; ");
  return `The server answered ${response.status} ${response.statusText || ""}`.trim() + ".";
}

async function getJson(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch { /* not JSON: handled below */ }
  if (!response.ok) {
    const err = new Error(detailText(body, response));
    err.status = response.status;
    throw err;
  }
  if (body === null) throw new Error(`The server answered ${url} with something that is not JSON.`);
  return body;
}

// ---- Model status -------------------------------------------------------------------------
let modelInfo = null;

async function loadStatus() {
  try {
    const health = await getJson("/health");
    if (!health.model_loaded) {
      els.status.dataset.model = "missing";
      els.statusText.textContent = health.detail ? `No model loaded: ${health.detail}` : "No model loaded.";
      return;
    }
    modelInfo = await getJson("/model-info");
    els.status.dataset.model = "ready";
    const method = modelInfo.threshold_method ? ` (${modelInfo.threshold_method})` : "";
    els.statusText.textContent =
      `Model ready: ${modelInfo.backbone || "unknown backbone"}, format ${modelInfo.format}, ` +
      `threshold ${fmt(modelInfo.threshold)}${method}`;
  } catch (err) {
    els.status.dataset.model = err.status ? "missing" : "offline";
    els.statusText.textContent = err.status ? err.message : `Cannot reach the server: ${err.message}`;
  }
}

// ---- Choosing a file ----------------------------------------------------------------------
function openChooser() {
  if (document.body.dataset.state !== "busy") els.input.click();
}

els.zone.addEventListener("click", openChooser);
els.zone.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") {
    e.preventDefault();   // Space would otherwise scroll the page
    openChooser();
  }
});
els.input.addEventListener("change", () => {
  const file = els.input.files[0];
  els.input.value = "";   // so choosing the same file again fires "change" again
  if (file) analyse(file);
});

// dragleave also fires when moving over a child element, so count enter/leave pairs.
let dragDepth = 0;
els.zone.addEventListener("dragenter", (e) => { e.preventDefault(); dragDepth++; els.zone.classList.add("dragover"); });
els.zone.addEventListener("dragover", (e) => { e.preventDefault(); e.dataTransfer.dropEffect = "copy"; });
els.zone.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; els.zone.classList.remove("dragover"); } });
els.zone.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  els.zone.classList.remove("dragover");
  const file = e.dataTransfer.files[0];
  if (file && document.body.dataset.state !== "busy") (isZip(file) ? analyseSeries : analyse)(file);
});
// A file dropped next to the zone must not make the browser navigate away to it.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

function showPreview(file, note = "This file type cannot be shown by the browser; the preview will come from the server with the result.") {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = null;
  const kb = file.size < 1024 * 1024 ? `${Math.max(1, Math.round(file.size / 1024))} KB` : `${(file.size / 1048576).toFixed(1)} MB`;
  els.previewCaption.textContent = `${file.name} (${kb})`;
  // Browsers can show PNG and JPEG; DICOM (and anything else) is previewed from the server's answer.
  const displayable = /^image\/(png|jpeg)$/.test(file.type);
  if (displayable) {
    previewUrl = URL.createObjectURL(file);
    els.previewImg.src = previewUrl;
    els.previewImg.alt = `Preview of the chosen file ${file.name}`;
  } else {
    els.previewImg.removeAttribute("src");
    els.previewNote.textContent = note;
  }
  els.previewImg.hidden = !displayable;
  els.previewNote.hidden = displayable;
  els.preview.hidden = false;
}

// ---- Prediction ---------------------------------------------------------------------------
// Clears the last answer, previews the file and shows the busy state: the start of every analysis.
function startAnalysis(file, busyText, previewNote) {
  els.error.textContent = "";
  els.result.hidden = true;
  els.seriesResult.hidden = true;
  els.placeholder.hidden = true;
  current = null;
  showPreview(file, previewNote);
  els.busyText.textContent = els.announce.textContent = busyText;
  setState("busy");
}

// A TypeError from fetch means no answer at all (server down, connection lost).
const failureMessage = (err) =>
  err instanceof TypeError ? `Could not reach the server (${err.message}). Is it running?` : err.message;

async function analyse(file) {
  startAnalysis(file, `Analysing ${file.name}…`);

  const form = new FormData();
  form.append("files", file, file.name);
  try {
    const body = await getJson("/predict?gradcam=true", { method: "POST", body: form });
    const result = body.results && body.results[0];
    if (!result) throw new Error("The server returned no result for this file.");
    showResult(result);
    setState("done");
  } catch (err) {
    showError(failureMessage(err));
    setState("error");
  }
}

function showError(message, heading = "The image could not be analysed.") {
  const title = document.createElement("strong");
  title.textContent = heading;
  els.announce.textContent = "";
  els.error.replaceChildren(title, document.createTextNode(message));
  if (els.previewImg.hidden) els.previewNote.textContent = "No preview: the server did not return one.";
}

function showResult(r) {
  current = r;
  // The calibrated probability and the threshold on its scale: the same decision as the score against the threshold.
  const p = Number(r.cancer_probability_calibrated ?? r.cancer_probability);
  const t = Number(r.threshold_calibrated ?? r.threshold ?? (modelInfo && modelInfo.threshold));
  // The decision is still shown, under a warning that the image is not what the model was made for.
  const outside = r.in_domain === false;
  els.domainWarning.hidden = !outside;
  els.domainWarning.textContent = outside
    ? `Not what this model was made for: ${r.domain_reason}. Read the output below with that in mind.` : "";
  els.result.dataset.diagnosis = r.diagnosis;
  els.diagnosis.dataset.diagnosis = r.diagnosis;
  els.diagnosis.textContent = r.diagnosis;

  const pct = (x) => `${Math.min(100, Math.max(0, x * 100))}%`;
  els.fill.style.width = pct(p);
  els.marker.style.left = pct(t);
  els.marker.hidden = !Number.isFinite(t);
  els.probability.textContent = `Cancer probability ${fmt(p)} — threshold ${fmt(t)}`;
  els.calibration.textContent = r.calibration ? `${r.calibration[0].toUpperCase()}${r.calibration.slice(1)}.` : "";
  els.bar.setAttribute("aria-valuenow", String(p));
  els.bar.setAttribute("aria-valuetext", `${fmt(p)}, threshold ${fmt(t)}`);

  els.confidence.textContent = fmt(r.confidence);
  const model = r.model || {};
  els.format.textContent = model.format || "unknown";
  els.sha.textContent = model.sha256 ? model.sha256.slice(0, 12) : "unknown";
  els.sha.title = model.sha256 || "";

  const hasCam = Boolean(r.gradcam_png);
  els.toggle.disabled = !hasCam;
  els.gradcamNote.textContent = hasCam ? "" : `Grad-CAM is not available for the ${model.format || "current"} model format.`;
  // Only a lesion-map model has its own map: the button appears for it alone.
  els.lesionToggle.hidden = !r.lesion_map_png;
  setView("input");
  // The browser could not preview this file (DICOM): show the server's view of it instead.
  if (els.previewImg.hidden && r.input_png) {
    els.previewImg.src = r.input_png;
    els.previewImg.alt = `Server preview of ${r.filename || "the file"} (grayscale, after preprocessing)`;
    els.previewImg.hidden = false;
    els.previewNote.hidden = true;
  }
  els.result.hidden = false;
  els.announce.textContent = `Result: ${r.diagnosis}, cancer probability ${fmt(p)}, threshold ${fmt(t)}.`;
}

// What the result figure shows: "input", "gradcam" or "lesion" (the model's own lesion map).
function setView(view) {
  const name = current.filename || "the image";
  els.toggle.setAttribute("aria-pressed", String(view === "gradcam"));
  els.lesionToggle.setAttribute("aria-pressed", String(view === "lesion"));
  if (view === "gradcam") {
    els.image.src = current.gradcam_png;
    els.image.alt = `Grad-CAM overlay for ${name}: red marks the regions that raised the cancer probability most`;
    // The server normalises each map to its own maximum: it shows where, not how strongly.
    els.caption.textContent = "Grad-CAM of the cancer probability (red = most influence, scaled per image)";
  } else if (view === "lesion") {
    els.image.src = current.lesion_map_png;
    els.image.alt = `Lesion map for ${name}: the model's lesion probability at each position (red = high)`;
    // Not rescaled: a slice the model finds clear stays blue everywhere.
    els.caption.textContent = "The model's lesion map: lesion probability per position (blue 0, red 1); its pooling inside the lungs is the cancer probability";
  } else {
    els.image.src = current.input_png;
    els.image.alt = `Model input for ${name}: the grayscale slice after preprocessing`;
    els.caption.textContent = "Model input (after preprocessing)";
  }
}

els.toggle.addEventListener("click", () => {
  if (current && current.gradcam_png) setView(els.toggle.getAttribute("aria-pressed") !== "true" ? "gradcam" : "input");
});
els.lesionToggle.addEventListener("click", () => {
  if (current && current.lesion_map_png) {
    setView(els.lesionToggle.getAttribute("aria-pressed") !== "true" ? "lesion" : "input");
  }
});

// ---- A zipped DICOM series ----------------------------------------------------------------
const isZip = (file) => /\.zip$/i.test(file.name) || /zip/.test(file.type);

els.seriesButton.addEventListener("click", () => {
  if (document.body.dataset.state !== "busy") els.seriesInput.click();
});
els.seriesInput.addEventListener("change", () => {
  const file = els.seriesInput.files[0];
  els.seriesInput.value = "";
  if (file) analyseSeries(file);
});

async function analyseSeries(file) {
  startAnalysis(file, `Scoring every slice in ${file.name}…`,
    "A zipped series: each series' top slice and z-profile are shown with the result.");

  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const body = await getJson("/predict/series", { method: "POST", body: form });
    showSeries(body, file.name);
    setState("done");
  } catch (err) {
    showError(failureMessage(err), "The series could not be analysed.");
    els.previewNote.textContent = "A zipped series: no result.";
    setState("error");
  }
}

// A new element with a class and text (text only: file names come from the zip, never parsed as HTML).
function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function lines(title, items) {
  const box = make("div", "series-lines");
  const list = make("ul");
  items.forEach((item) => list.append(make("li", "", item)));
  box.append(make("strong", "", title), list);
  return box;
}

function figure(src, alt, caption, className) {
  const fig = make("figure", className);
  const img = make("img");
  img.src = src;
  img.alt = alt;
  fig.append(img, make("figcaption", "", caption));
  return fig;
}

function seriesCard(s) {
  const card = make("article", "series-card");
  card.dataset.diagnosis = s.diagnosis || "none";
  card.append(make("h3", "", s.label));
  const meta = [`${s.slices} slice${s.slices === 1 ? "" : "s"}`, s.description, s.kernel && `kernel ${s.kernel}`,
    s.manufacturer].filter(Boolean).join(" · ");
  card.append(make("p", "series-meta", meta));

  const diagnosis = make("p", "diagnosis", s.diagnosis || "No series score");
  diagnosis.dataset.diagnosis = s.diagnosis || "none";
  card.append(diagnosis);
  const scored = s.score !== null && s.score !== undefined;
  card.append(make("p", "prob-text", scored
    ? `Series score ${fmt(s.score)} — threshold ${fmt(s.threshold)}`
    : `No series score — threshold ${fmt(s.threshold)} (each slice is scored below)`));
  card.append(make("p", "series-rule", `Rule: ${s.rule}.`));
  const problems = s.problems || [];
  // With problems the note only repeats them: they are listed below instead.
  if (s.note && !problems.length) card.append(make("p", "series-rule", `${s.note.charAt(0).toUpperCase()}${s.note.slice(1)}.`));
  if (s.threshold_note) card.append(make("p", "series-rule", `Note: ${s.threshold_note}.`));

  if (problems.length) card.append(lines("Why there is no series score:", problems));
  if (s.skipped && s.skipped.length) card.append(lines("Slices left out (could not be decoded):", s.skipped));

  const top = s.top_slice;
  if (top) {
    const z = top.z === null || top.z === undefined ? "" : `, z = ${Number(top.z).toFixed(1)} mm`;
    const caption = `The slice that gave the score: ${top.file}${z}, cancer probability ${fmt(top.probability)}`;
    if (s.top_slice_png) {
      card.append(figure(s.top_slice_png, `Model input of ${top.file}, the slice that gave the series score`, caption, "top-slice"));
    } else {
      card.append(make("p", "series-rule", caption));
    }
  }
  if (s.z_profile_png) {
    card.append(figure(s.z_profile_png,
      `z-profile of ${s.label}: the cancer probability of each slice along the table position, with the threshold as a dashed line`,
      "Cancer probability of each slice along z (dashed: the threshold; grey: no lung fields found)", "z-profile"));
  }
  const slices = s.per_slice || [];
  if (slices.length) {
    const details = make("details", "not-dicom");
    details.append(make("summary", "", `Every slice's probability (${slices.length})`));
    const list = make("ul");
    slices.forEach((item) => list.append(make("li", "", item.error
      ? `${item.file}: not scored (${item.error})`
      : `${item.file}: ${fmt(item.probability)}${item.in_lungs === false ? " (no lung fields found)" : ""}`)));
    details.append(list);
    card.append(details);
  }
  return card;
}

function showSeries(body, zipName) {
  const series = body.series || [];
  els.seriesSummary.textContent = `${series.length} series in ${zipName}`;
  els.seriesList.replaceChildren(...series.map(seriesCard));
  const others = body.not_dicom || [];
  els.notDicom.hidden = others.length === 0;
  els.notDicomSummary.textContent = `${others.length} file${others.length === 1 ? "" : "s"} in the zip ${others.length === 1 ? "is" : "are"} not DICOM slices`;
  els.notDicomList.replaceChildren(...others.map((item) => make("li", "", `${item.file}: ${item.reason}`)));
  const model = body.model || {};
  els.seriesModel.textContent = `Model ${model.format || "unknown"}, sha256 ${(model.sha256 || "unknown").slice(0, 12)}`;
  els.seriesModel.title = model.sha256 || "";
  els.previewNote.textContent = `A zipped series: ${series.length} series scored.`;
  els.seriesResult.hidden = false;
  els.announce.textContent = "Result: " + series.map((s) => (s.score === null || s.score === undefined
    ? `${s.label}: no series score`
    : `${s.label}: ${s.diagnosis}, score ${fmt(s.score)}`)).join("; ") + ".";
}

loadStatus();
