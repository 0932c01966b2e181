// chestct web page: model status, file upload (chooser or drag-and-drop), result display.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  status: $("status"), statusText: $("status-text"),
  input: $("file-input"), zone: $("drop-zone"),
  preview: $("preview"), previewImg: $("preview-image"), previewNote: $("preview-note"), previewCaption: $("preview-caption"),
  announce: $("announce"), placeholder: $("placeholder"), busy: $("busy"), busyText: $("busy-text"), error: $("error"),
  result: $("result"), diagnosis: $("diagnosis"), probability: $("probability"), bar: $("probability-bar"),
  fill: $("probability-fill"), marker: $("threshold-marker"), confidence: $("confidence"),
  format: $("model-format"), sha: $("model-sha"), image: $("result-image"), caption: $("result-caption"),
  toggle: $("gradcam-toggle"), gradcamNote: $("gradcam-note"),
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
  if (file && document.body.dataset.state !== "busy") analyse(file);
});
// A file dropped next to the zone must not make the browser navigate away to it.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

function showPreview(file) {
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
    els.previewNote.textContent = "This file type cannot be shown by the browser; the preview will come from the server with the result.";
  }
  els.previewImg.hidden = !displayable;
  els.previewNote.hidden = displayable;
  els.preview.hidden = false;
}

// ---- Prediction ---------------------------------------------------------------------------
async function analyse(file) {
  els.error.textContent = "";
  els.result.hidden = true;
  els.placeholder.hidden = true;
  current = null;
  showPreview(file);
  els.busyText.textContent = els.announce.textContent = `Analysing ${file.name}…`;
  setState("busy");

  const form = new FormData();
  form.append("files", file, file.name);
  try {
    const body = await getJson("/predict?gradcam=true", { method: "POST", body: form });
    const result = body.results && body.results[0];
    if (!result) throw new Error("The server returned no result for this file.");
    showResult(result);
    setState("done");
  } catch (err) {
    // A TypeError from fetch means no answer at all (server down, connection lost).
    const message = err instanceof TypeError ? `Could not reach the server (${err.message}). Is it running?` : err.message;
    showError(message);
    setState("error");
  }
}

function showError(message) {
  const title = document.createElement("strong");
  title.textContent = "The image could not be analysed.";
  els.announce.textContent = "";
  els.error.replaceChildren(title, document.createTextNode(message));
  if (els.previewImg.hidden) els.previewNote.textContent = "No preview: the server did not return one.";
}

function showResult(r) {
  current = r;
  const p = Number(r.cancer_probability);
  const t = Number(r.threshold ?? (modelInfo && modelInfo.threshold));
  els.result.dataset.diagnosis = r.diagnosis;
  els.diagnosis.dataset.diagnosis = r.diagnosis;
  els.diagnosis.textContent = r.diagnosis;

  const pct = (x) => `${Math.min(100, Math.max(0, x * 100))}%`;
  els.fill.style.width = pct(p);
  els.marker.style.left = pct(t);
  els.marker.hidden = !Number.isFinite(t);
  els.probability.textContent = `Cancer probability ${fmt(p)} — threshold ${fmt(t)}`;
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
  setGradcam(false);
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

function setGradcam(on) {
  const name = current.filename || "the image";
  els.toggle.setAttribute("aria-pressed", String(on));
  if (on) {
    els.image.src = current.gradcam_png;
    els.image.alt = `Grad-CAM overlay for ${name}: red marks the regions that raised the cancer probability most`;
    // The server normalises each map to its own maximum: it shows where, not how strongly.
    els.caption.textContent = "Grad-CAM of the cancer probability (red = most influence, scaled per image)";
  } else {
    els.image.src = current.input_png;
    els.image.alt = `Model input for ${name}: the grayscale slice after preprocessing`;
    els.caption.textContent = "Model input (after preprocessing)";
  }
}

els.toggle.addEventListener("click", () => {
  if (current && current.gradcam_png) setGradcam(els.toggle.getAttribute("aria-pressed") !== "true");
});

loadStatus();
