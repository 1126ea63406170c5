// The drawing page: pointer events (mouse, touch, pen) on a canvas; the drawing is sent as a PNG to
// POST /predict, where the server preprocesses it like MNIST. At most one request is in flight; a
// drawing that changed meanwhile is sent again when it returns, so the answer follows the pen.
// "In this browser" also runs the model here: the ONNX file from /model.onnx, checked against /model's
// sha256 before use, in onnxruntime-web (WASM) served by this server; the drawing is preprocessed by
// mnist_image.js, a port of the server's. Both answers and their latencies are shown side by side.
"use strict";

(() => {
  const canvas = document.getElementById("pad");
  const ctx = canvas.getContext("2d");
  const digitEl = document.getElementById("digit");
  const confidenceEl = document.getElementById("confidence");
  const statusEl = document.getElementById("status");
  const modelEl = document.getElementById("model");
  const bars = Array.from(document.querySelectorAll("#bars li"));
  const whereBrowser = document.getElementById("where-browser");
  const whereServer = document.getElementById("where-server");
  const noteEl = document.getElementById("browser-note");
  const cells = {
    server: { digit: document.getElementById("server-digit"), ms: document.getElementById("server-ms") },
    browser: { digit: document.getElementById("local-digit"), ms: document.getElementById("local-ms") },
  };
  const INK = "#ffffff";
  const PAPER = "#000000";
  const LINE_WIDTH = 20; // in canvas pixels (280 wide): about MNIST's stroke relative to the digit
  const MIN_INTERVAL_MS = 40;

  let drawing = false;
  let last = null;
  let hasInk = false;
  let dirty = false;
  let inFlight = false;
  let generation = 0; // bumped by Clear: answers for an older drawing are ignored
  let lastSent = 0;
  let info = null; // GET /model
  let local = null; // {session, ort, mean, std} once the in-browser model is checked and loaded
  let localBusy = false;
  let localDirty = false;
  // What the in-browser runs did, for tests and the curious: the last input and logits, every latency.
  const record = { last: null, times: [], totals: [] };
  window.mnistDeployLocal = record;

  function setNote(text, isError = false) {
    noteEl.textContent = text;
    noteEl.classList.toggle("error", isError);
  }

  function setStatus(text, isError = false) {
    statusEl.textContent = text;
    statusEl.classList.toggle("error", isError);
  }

  function showEmpty() {
    for (const c of Object.values(cells)) {
      c.digit.textContent = "\u2013";
      c.digit.dataset.digit = "";
    }
    cells.server.ms.textContent = "\u2013";
    cells.browser.ms.textContent = local ? "\u2013" : "off";
    digitEl.textContent = "\u2013";
    digitEl.dataset.digit = "";
    confidenceEl.textContent = "draw to start";
    for (const li of bars) {
      li.classList.remove("top");
      li.querySelector(".fill").style.width = "0%";
      li.querySelector(".p").textContent = "0%";
    }
  }

  function clear() {
    generation += 1;
    dirty = false;
    hasInk = false;
    ctx.fillStyle = PAPER;
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    showEmpty();
    setStatus("ready");
  }

  function point(event) {
    const r = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - r.left) * canvas.width) / r.width,
      y: ((event.clientY - r.top) * canvas.height) / r.height,
    };
  }

  function dot(p) {
    ctx.beginPath();
    ctx.arc(p.x, p.y, LINE_WIDTH / 2, 0, 2 * Math.PI);
    ctx.fillStyle = INK;
    ctx.fill();
  }

  function segment(a, b) {
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x, b.y);
    ctx.strokeStyle = INK;
    ctx.lineWidth = LINE_WIDTH;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.stroke();
  }

  function changed() {
    hasInk = true;
    dirty = true;
    localDirty = true;
    schedule();
    scheduleLocal();
  }

  function mode() {
    return whereBrowser.checked && local ? "browser" : "server";
  }

  function schedule() {
    if (inFlight || !dirty) return;
    const wait = lastSent + MIN_INTERVAL_MS - performance.now();
    if (wait > 0) {
      inFlight = true;
      setTimeout(() => { inFlight = false; schedule(); }, wait);
      return;
    }
    dirty = false;
    inFlight = true;
    lastSent = performance.now();
    send().finally(() => {
      inFlight = false;
      schedule();
    });
  }

  async function send() {
    const mine = generation;
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    const form = new FormData();
    form.append("file", blob, "digit.png");
    const t0 = performance.now();
    let response;
    let data;
    try {
      response = await fetch("/predict", { method: "POST", body: form });
      data = await response.json();
    } catch (err) {
      setStatus("server unreachable", true);
      return;
    }
    if (mine !== generation || !hasInk) return;
    if (!response.ok) {
      setStatus(data && data.detail ? String(data.detail) : `HTTP ${response.status}`, true);
      return;
    }
    const roundTrip = performance.now() - t0;
    cells.server.digit.textContent = String(data.digit);
    cells.server.digit.dataset.digit = String(data.digit);
    cells.server.ms.textContent = `${data.latency_ms.toFixed(2)} ms (${roundTrip.toFixed(0)} ms round trip)`;
    if (mode() === "server") show(data);
    setStatus(`${data.runtime} \u00b7 ${data.latency_ms.toFixed(2)} ms on the server \u00b7 ${roundTrip.toFixed(0)} ms round trip`);
  }

  function show(data) {
    digitEl.textContent = String(data.digit);
    digitEl.dataset.digit = String(data.digit);
    confidenceEl.textContent = `${(100 * data.confidence).toFixed(1)}% sure`;
    data.probabilities.forEach((p, i) => {
      const li = bars[i];
      li.classList.toggle("top", i === data.digit);
      li.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
      li.querySelector(".p").textContent = `${(100 * p).toFixed(1)}%`;
      li.dataset.p = String(p);
    });
  }

  // ---- in this browser

  function scheduleLocal() {
    if (!local || !whereBrowser.checked || localBusy || !localDirty) return;
    localDirty = false;
    localBusy = true;
    predictLocal().catch((err) => setNote(`in-browser prediction failed: ${err.message || err}`, true))
      .finally(() => { localBusy = false; scheduleLocal(); });
  }

  async function predictLocal() {
    const mine = generation;
    const start = performance.now();
    const image = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const pixels = window.MnistImage.mnistImage(image.data, image.width, image.height);
    if (!pixels || mine !== generation) return;
    const input = window.MnistImage.normalize(pixels, local.mean, local.std);
    const tensor = new local.ort.Tensor("float32", input, [1, ...local.shape]);
    const t0 = performance.now();
    const out = await local.session.run({ [local.session.inputNames[0]]: tensor });
    const end = performance.now();
    const ms = end - t0;
    if (mine !== generation || !hasInk) return;
    const logits = Array.from(out[local.session.outputNames[0]].data);
    const top = Math.max(...logits);
    const exps = logits.map((v) => Math.exp(v - top));
    const total = exps.reduce((a, b) => a + b, 0);
    const probabilities = exps.map((v) => v / total);
    const digit = logits.indexOf(top);
    // ms: session.run alone; total_ms: from reading the canvas to the logits (preprocessing included)
    record.last = { input: Array.from(input), pixels: Array.from(pixels), logits, digit, ms, total_ms: end - start };
    record.times.push(ms);
    record.totals.push(end - start);
    cells.browser.digit.textContent = String(digit);
    cells.browser.digit.dataset.digit = String(digit);
    cells.browser.ms.textContent = `${ms.toFixed(2)} ms in the page (${(end - start).toFixed(2)} ms with preprocessing)`;
    if (mode() === "browser") show({ digit, confidence: probabilities[digit], probabilities });
  }

  function hex(buffer) {
    return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
  }

  async function loadLocal() {
    const b = info.browser;
    setNote("fetching the model and checking its sha256\u2026");
    const bytes = await (await fetch(b.model_url, { cache: "no-store" })).arrayBuffer();
    const digest = hex(await crypto.subtle.digest("SHA-256", bytes));
    if (digest !== b.sha256) {
      throw new Error(`refused: the model file's sha256 ${digest.slice(0, 12)}\u2026 does not match ` +
                      `${b.sha256.slice(0, 12)}\u2026 from /model; it was not used`);
    }
    const ort = await import(b.ort_module);
    ort.env.wasm.wasmPaths = b.ort_path;
    ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
    const session = await ort.InferenceSession.create(new Uint8Array(bytes), { executionProviders: ["wasm"] });
    const pre = info.preprocessing || {};
    const shape = (info.model && info.model.input_shape) || [784];
    local = { ort, session, shape, mean: pre.mean ?? 0.1307, std: pre.std ?? 0.3081 };
    const threads = ort.env.wasm.numThreads;
    setNote(`in this browser: onnxruntime-web ${ort.env.versions ? ort.env.versions.web : ""} (WASM, ` +
            `${threads} thread${threads === 1 ? "" : "s"}${self.crossOriginIsolated ? ", cross-origin isolated" : ""}), ` +
            `model sha256 ${digest.slice(0, 12)}\u2026 checked`);
    record.threads = threads;
    record.crossOriginIsolated = self.crossOriginIsolated;
  }

  async function switchMode() {
    if (whereBrowser.checked && !local) {
      whereBrowser.disabled = whereServer.disabled = true;
      try {
        await loadLocal();
      } catch (err) {
        whereServer.checked = true;
        setNote(String(err.message || err), true);
      } finally {
        whereBrowser.disabled = whereServer.disabled = false;
        if (info && info.browser && info.browser.unavailable) whereBrowser.disabled = true;
      }
    }
    cells.browser.ms.textContent = local && whereBrowser.checked ? cells.browser.ms.textContent.replace(/^off$/, "\u2013") : "off";
    if (!whereBrowser.checked) { cells.browser.digit.textContent = "\u2013"; cells.browser.digit.dataset.digit = ""; }
    if (hasInk) changed();
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (event.button !== undefined && event.button > 0) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    drawing = true;
    last = point(event);
    dot(last);
    changed();
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    event.preventDefault();
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const e of events.length ? events : [event]) {
      const p = point(e);
      segment(last, p);
      last = p;
    }
    changed();
  });
  const stop = (event) => {
    if (!drawing) return;
    drawing = false;
    if (canvas.hasPointerCapture(event.pointerId)) canvas.releasePointerCapture(event.pointerId);
    changed();
  };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
  // An image dropped on the pad (a photo or a scan of a digit) replaces the drawing, scaled to fill it.
  canvas.addEventListener("dragover", (event) => event.preventDefault());
  canvas.addEventListener("drop", async (event) => {
    event.preventDefault();
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (!file) return;
    try {
      const bitmap = await createImageBitmap(file);
      clear();
      ctx.imageSmoothingEnabled = bitmap.width > canvas.width;
      ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
      changed();
    } catch (err) {
      setStatus(`cannot read ${file.name} as an image`, true);
    }
  });
  canvas.addEventListener("touchstart", (event) => event.preventDefault(), { passive: false });
  document.getElementById("clear").addEventListener("click", clear);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") clear();
  });

  whereBrowser.addEventListener("change", switchMode);
  whereServer.addEventListener("change", switchMode);
  whereBrowser.disabled = true;

  fetch("/model")
    .then((r) => (r.ok ? r.json() : null))
    .then((m) => {
      if (!m) return;
      info = m;
      const b = m.browser || { unavailable: "this server does not offer the model to the browser" };
      let why = b.unavailable;
      if (!why && !(window.crypto && crypto.subtle)) why = "this page is not a secure context (https or localhost), so it cannot check the model's sha256";
      if (!why && typeof WebAssembly === "undefined") why = "this browser has no WebAssembly";
      whereBrowser.disabled = Boolean(why);
      setNote(why ? `in this browser: unavailable: ${why}` : "");
      const acc = m.metrics && m.metrics.accuracy !== undefined ? ` \u00b7 test accuracy ${(100 * m.metrics.accuracy).toFixed(2)}%` : "";
      const sha = m.sha256 ? ` \u00b7 sha256 ${m.sha256.slice(0, 12)}\u2026` : "";
      modelEl.textContent = `model ${m.model ? m.model.name : "?"} \u00b7 runtime ${m.runtime} (${m.engine})${acc}${sha}`;
    })
    .catch(() => {});

  clear();
})();
