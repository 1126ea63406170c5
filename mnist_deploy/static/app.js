// The drawing page: pointer events (mouse, touch, pen) on a canvas; the drawing is sent as a PNG to
// POST /predict, where the server preprocesses it like MNIST. At most one request is in flight; a
// drawing that changed meanwhile is sent again when it returns, so the answer follows the pen.
"use strict";

(() => {
  const canvas = document.getElementById("pad");
  const ctx = canvas.getContext("2d");
  const digitEl = document.getElementById("digit");
  const confidenceEl = document.getElementById("confidence");
  const statusEl = document.getElementById("status");
  const modelEl = document.getElementById("model");
  const bars = Array.from(document.querySelectorAll("#bars li"));
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

  function setStatus(text, isError = false) {
    statusEl.textContent = text;
    statusEl.classList.toggle("error", isError);
  }

  function showEmpty() {
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
    schedule();
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
    show(data, performance.now() - t0);
  }

  function show(data, roundTripMs) {
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
    setStatus(`${data.runtime} \u00b7 ${data.latency_ms.toFixed(2)} ms on the server \u00b7 ${roundTripMs.toFixed(0)} ms round trip`);
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
  canvas.addEventListener("touchstart", (event) => event.preventDefault(), { passive: false });
  document.getElementById("clear").addEventListener("click", clear);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") clear();
  });

  fetch("/model")
    .then((r) => (r.ok ? r.json() : null))
    .then((m) => {
      if (!m) return;
      const acc = m.metrics && m.metrics.accuracy !== undefined ? ` \u00b7 test accuracy ${(100 * m.metrics.accuracy).toFixed(2)}%` : "";
      const sha = m.sha256 ? ` \u00b7 sha256 ${m.sha256.slice(0, 12)}\u2026` : "";
      modelEl.textContent = `model ${m.model ? m.model.name : "?"} \u00b7 runtime ${m.runtime} (${m.engine})${acc}${sha}`;
    })
    .catch(() => {});

  clear();
})();
