// The page is a client of the native job API: POST /jobs/{mode} answers 202 with a job id,
// GET /jobs/{id} gives its status and progress, and the PNGs are at the URLs it lists once done.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "sd.apiKey";
const POLL_MS = 200;

let sourceBlob = null;   // the uploaded input image
let followed = null;     // id of the job being followed
let nativeSize = null;   // the model's image size, when the server knows it

// -----------------------------------------------------------------------------
// talking to the API

function authHeaders(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// fetch with the key; an error answer becomes an Error carrying the server's detail
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    if (response.status === 401) $("key-box").hidden = false;
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

async function loadConfig() {
  const config = await (await fetch("/ui/config")).json();
  const sampler = $("sampler");
  for (const name of config.samplers) sampler.add(new Option(name, name));
  $("steps").max = config.max_steps;
  $("num_images").max = config.max_images;
  for (const side of ["width", "height"]) $(side).max = config.max_side;
  nativeSize = config.native_size;
  sizePlaceholders();
  if (config.api_key_required) $("key-box").hidden = false;
}

// -----------------------------------------------------------------------------
// form

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function onModeChange() {
  const m = mode();
  $("source-box").hidden = m === "txt2img";
  $("brush-box").hidden = m !== "inpaint";
  $("mask").hidden = m !== "inpaint";
  $("strength").value = m === "inpaint" ? 1 : 0.75;  // the API's defaults
  $("strength-out").value = $("strength").value;
  sizePlaceholders();
}

// what an empty width or height means: the model's native size, or for an upload the image's (rounded down to 8)
function sizePlaceholders() {
  const text = mode() !== "txt2img" ? "image's" : nativeSize ? `${nativeSize} (model)` : "model's";
  for (const side of ["width", "height"]) $(side).placeholder = text;
}

// the request fields; numbers as numbers, empty optional fields left out (the API's defaults)
function fields() {
  const f = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    sampler: $("sampler").value,
    steps: parseInt($("steps").value, 10),
    guidance_scale: parseFloat($("guidance_scale").value),
    num_images: parseInt($("num_images").value, 10) || 1,
  };
  for (const name of ["seed", "width", "height"]) {
    if ($(name).value.trim() !== "") f[name] = parseInt($(name).value, 10);
  }
  if (mode() !== "txt2img") f.strength = parseFloat($("strength").value);
  return f;
}

async function submitJob() {
  const m = mode();
  const f = fields();
  if (!f.prompt.trim()) throw new Error("write a prompt first");
  if (m === "txt2img") {
    return api("/jobs/txt2img", { method: "POST", headers: { "Content-Type": "application/json" },
                                  body: JSON.stringify(f) });
  }
  if (!sourceBlob) throw new Error("choose an input image first");
  const form = new FormData();
  for (const [name, value] of Object.entries(f)) form.append(name, String(value));
  form.append("image", sourceBlob, "image.png");
  if (m === "inpaint") form.append("mask", await maskPNG(), "mask.png");
  return api(`/jobs/${m}`, { method: "POST", body: form });
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").hidden = !busy;
  $("progress").hidden = !busy;
}

async function generate(event) {
  event.preventDefault();
  setBusy(true);
  setStatus("submitting…");
  try {
    const job = await (await submitJob()).json();
    await follow(job.id);
  } catch (err) {
    setStatus(err.message, true);
  } finally {
    followed = null;
    $("preview").hidden = true;
    setBusy(false);
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function follow(id) {
  followed = id;
  const bar = $("progress");
  bar.value = 0;
  for (;;) {
    const state = await (await api(`/jobs/${id}`)).json();
    const { step, total } = state.progress;
    bar.max = total || 1;
    bar.value = step;
    if (state.status === "done") {
      await showResult(state);
      setStatus(`done: seed ${state.seed}`);
      return;
    }
    if (state.status === "failed") throw new Error(`failed: ${state.error || "unknown error"}`);
    if (state.status === "cancelled") { setStatus("cancelled"); return; }
    setStatus(state.status === "queued" ? "queued…" : `step ${step} of ${total}`);
    if (state.status === "running") await showPreview(id);
    await sleep(POLL_MS);
  }
}

// the live preview of a running job: a small PNG made from its latents (204 until the first one exists)
async function showPreview(id) {
  const response = await api(`/jobs/${id}/preview`);
  if (response.status !== 200 || followed !== id) return;
  const img = $("preview");
  const old = img.src;
  img.src = URL.createObjectURL(await response.blob());
  img.hidden = false;
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
}

async function cancel() {
  if (!followed) return;
  try { await api(`/jobs/${followed}`, { method: "DELETE" }); } catch (err) { setStatus(err.message, true); }
}

// -----------------------------------------------------------------------------
// results

const PARAMETER_ROWS = [
  ["mode", "mode"], ["prompt", "prompt"], ["negative prompt", "negative_prompt"], ["sampler", "sampler"],
  ["steps", "steps"], ["guidance", "guidance_scale"], ["seed", "seed"], ["strength", "strength"],
];

async function showResult(state) {
  const p = state.parameters;
  const card = document.createElement("figure");
  card.className = "result";
  const images = document.createElement("div");
  images.className = "images";
  const links = document.createElement("div");
  links.className = "row";
  for (const [n, url] of state.images.entries()) {
    const blob = await (await api(new URL(url, location.href).pathname)).blob();
    const href = URL.createObjectURL(blob);
    const img = document.createElement("img");
    img.src = href;
    img.alt = `${p.prompt} (seed ${p.seed}, image ${n})`;
    await img.decode();
    if (img.naturalWidth < 256) card.classList.add("small");
    images.append(img);

    const link = document.createElement("a");
    link.href = href;
    link.download = `sd-${p.seed}${state.images.length > 1 ? `-${n}` : ""}.png`;
    link.textContent = `Download ${link.download}`;
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.textContent = "Use as input";
    reuse.addEventListener("click", () => useAsInput(blob));
    links.append(link, reuse);
  }

  const table = document.createElement("table");
  const rows = [...PARAMETER_ROWS.filter(([, key]) => p[key] !== null && p[key] !== "")
                                  .map(([label, key]) => [label, p[key]]),
                ["size", `${p.width}x${p.height}`]];
  for (const [label, value] of rows) {
    const tr = table.insertRow();
    const th = document.createElement("th");
    th.textContent = label;
    tr.append(th);
    tr.insertCell().textContent = String(value);
  }
  const caption = document.createElement("figcaption");
  caption.append(table, links);
  card.append(images, caption);
  $("results").prepend(card);
}

function useAsInput(blob) {
  const m = mode() === "txt2img" ? "img2img" : mode();
  document.querySelector(`input[name=mode][value=${m}]`).checked = true;
  onModeChange();
  setSource(blob);
  $("form").scrollIntoView({ behavior: "smooth" });
}

// -----------------------------------------------------------------------------
// the input image and the mask painted over it

const canvas = $("mask");
const ctx = canvas.getContext("2d");
let painting = false;
let last = null;
let maskScale = 1;   // canvas pixels per image pixel

function setSource(blob) {
  sourceBlob = blob;
  const img = $("source");
  img.onload = () => {
    // the mask is painted at a whole multiple of the image's size, fine enough to see the brush on a
    // small image, and sent at the image's own size; CSS scales image and canvas alike
    maskScale = Math.max(1, Math.ceil(512 / Math.max(img.naturalWidth, img.naturalHeight)));
    canvas.width = img.naturalWidth * maskScale;
    canvas.height = img.naturalHeight * maskScale;
    $("stage").classList.toggle("small", img.naturalWidth < 256);
    $("stage").hidden = false;
  };
  img.src = URL.createObjectURL(blob);
}

function clearMask() {
  ctx.clearRect(0, 0, canvas.width, canvas.height);
}

// a pointer position in the canvas's pixels
function point(event) {
  const r = canvas.getBoundingClientRect();
  return [(event.clientX - r.left) * canvas.width / r.width, (event.clientY - r.top) * canvas.height / r.height];
}

function stroke(from, to) {
  const r = canvas.getBoundingClientRect();
  const width = Number($("brush").value) * canvas.width / r.width;  // the brush is sized on screen
  ctx.strokeStyle = ctx.fillStyle = "#fff";
  ctx.lineWidth = width;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.arc(to[0], to[1], width / 2, 0, 2 * Math.PI);
  ctx.fill();
  ctx.beginPath();
  ctx.moveTo(...from);
  ctx.lineTo(...to);
  ctx.stroke();
}

canvas.addEventListener("pointerdown", (event) => {
  painting = true;
  canvas.setPointerCapture(event.pointerId);
  last = point(event);
  stroke(last, last);
  event.preventDefault();
});
canvas.addEventListener("pointermove", (event) => {
  if (!painting) return;
  const p = point(event);
  stroke(last, p);
  last = p;
});
for (const type of ["pointerup", "pointercancel"]) canvas.addEventListener(type, () => { painting = false; });

// The mask the API takes, at the image's size: white where any paint touched an image pixel, black
// elsewhere, opaque.
async function maskPNG() {
  const painted = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  const width = canvas.width / maskScale, height = canvas.height / maskScale;
  const out = document.createElement("canvas");
  out.width = width;
  out.height = height;
  const octx = out.getContext("2d");
  const mask = octx.createImageData(width, height);
  let any = false;
  for (let y = 0; y < canvas.height; y++) {
    for (let x = 0; x < canvas.width; x++) {
      if (painted[4 * (y * canvas.width + x) + 3] === 0) continue;   // antialiased edges count as paint
      mask.data[4 * (Math.floor(y / maskScale) * width + Math.floor(x / maskScale))] = 255;
      any = true;
    }
  }
  if (!any) throw new Error("paint over the part of the image to repaint first");
  for (let i = 0; i < mask.data.length; i += 4) {
    mask.data[i + 1] = mask.data[i + 2] = mask.data[i];
    mask.data[i + 3] = 255;
  }
  octx.putImageData(mask, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

// -----------------------------------------------------------------------------
// wiring

function init() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORE) || "";
  key.addEventListener("input", () => localStorage.setItem(KEY_STORE, key.value.trim()));
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", onModeChange);
  $("image").addEventListener("change", () => { if ($("image").files[0]) setSource($("image").files[0]); });
  $("strength").addEventListener("input", () => { $("strength-out").value = $("strength").value; });
  $("brush").addEventListener("input", () => { $("brush-out").value = $("brush").value; });
  $("clear-mask").addEventListener("click", clearMask);
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  onModeChange();
  loadConfig().then(() => { document.body.dataset.ready = "1"; },
                    (err) => setStatus(`could not read /ui/config: ${err.message}`, true));
}

init();
