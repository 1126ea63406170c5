// The onnxruntime-web runtime's page (mnist_deploy/formats/js_web.py): loads ORT-web from the local
// server's /ort/, opens /model.onnx, and answers the Python side's calls through page.evaluate:
// harness.init({ep, threads}) -> what was applied; harness.run(src, shape) -> logits (base64 float32);
// harness.time(src, shape, warmup, minTimeMs, minCalls) -> per-call ms, timed here with performance.now()
// around session.run, as a page would see it. A batch arrives as base64 (small) or as a URL on the
// local server to fetch (large), always float32 little-endian.
"use strict";

const BUNDLES = { wasm: "/ort/ort.wasm.min.mjs", webgpu: "/ort/ort.webgpu.min.mjs" };

function fromBase64(text) {
  const bin = atob(text);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i += 1) bytes[i] = bin.charCodeAt(i);
  return bytes.buffer;
}

function toBase64(array) {
  const bytes = new Uint8Array(array.buffer, array.byteOffset, array.byteLength);
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}

function timerResolutionMs() {
  // The smallest step performance.now() shows: 5 us when cross-origin isolated, 100 us otherwise (Chromium).
  let best = Infinity;
  for (let i = 0; i < 200; i += 1) {
    const a = performance.now();
    let b = performance.now();
    while (b === a) b = performance.now();
    best = Math.min(best, b - a);
  }
  return best;
}

async function adapterInfo() {
  // What navigator.gpu.requestAdapter() offers (null: no WebGPU adapter at all).
  const adapter = navigator.gpu ? await navigator.gpu.requestAdapter() : null;
  if (!adapter) return null;
  const info = adapter.info || {};
  return { vendor: info.vendor, architecture: info.architecture, description: info.description,
           fallback: Boolean(adapter.isFallbackAdapter || info.isFallbackAdapter) };
}

const harness = {
  ort: null,
  session: null,
  adapterInfo,

  async init({ ep, threads }) {
    const ort = await import(BUNDLES[ep]);
    ort.env.wasm.wasmPaths = "/ort/";
    ort.env.wasm.numThreads = threads;
    ort.env.logLevel = "error";
    const model = new Uint8Array(await (await fetch("/model.onnx")).arrayBuffer());
    this.session = await ort.InferenceSession.create(model, { executionProviders: [ep] });
    this.ort = ort;
    return {
      crossOriginIsolated: self.crossOriginIsolated,
      numThreads: ort.env.wasm.numThreads,
      simd: ort.env.wasm.simd !== false,
      ort_web: ort.env.versions ? ort.env.versions.web : null,
      timer_resolution_us: 1000 * timerResolutionMs(),
      hardware_concurrency: navigator.hardwareConcurrency,
      user_agent: navigator.userAgent,
      webgpu_adapter: ep === "webgpu" ? await adapterInfo() : null,
      input: this.session.inputNames[0],
      output: this.session.outputNames[0],
    };
  },

  async tensor(src, shape) {
    const buffer = src.b64 !== undefined ? fromBase64(src.b64) : await (await fetch(src.url)).arrayBuffer();
    return new this.ort.Tensor("float32", new Float32Array(buffer), shape);
  },

  async call(feeds) {
    const out = await this.session.run(feeds);
    return out[this.session.outputNames[0]];
  },

  async run(src, shape) {
    const feeds = { [this.session.inputNames[0]]: await this.tensor(src, shape) };
    const out = await this.call(feeds);
    return { b64: toBase64(out.data), dims: Array.from(out.dims) };
  },

  async runEach(src, shape, batch) {
    // session.run over consecutive slices of `batch` images (the parity gate's batch-1 pass in one call).
    const all = await this.tensor(src, shape);
    const per = all.data.length / shape[0];
    const chunks = [];
    for (let i = 0; i < shape[0]; i += batch) {
      const n = Math.min(batch, shape[0] - i);
      const x = new this.ort.Tensor("float32", all.data.subarray(i * per, (i + n) * per), [n, ...shape.slice(1)]);
      chunks.push((await this.call({ [this.session.inputNames[0]]: x })).data);
    }
    const out = new Float32Array(chunks.reduce((s, c) => s + c.length, 0));
    let at = 0;
    for (const c of chunks) { out.set(c, at); at += c.length; }
    return { b64: toBase64(out), dims: [shape[0], out.length / shape[0]] };
  },

  async time(src, shape, warmup, minTimeMs, minCalls) {
    const feeds = { [this.session.inputNames[0]]: await this.tensor(src, shape) };
    for (let i = 0; i < warmup; i += 1) await this.call(feeds);
    const times = [];
    const deadline = performance.now() + minTimeMs;
    for (;;) {
      const t0 = performance.now();
      await this.call(feeds);
      const t1 = performance.now();
      times.push(t1 - t0);
      if (t1 >= deadline && times.length >= minCalls) break;
    }
    return times;
  },
};

window.harness = harness;
document.title = "ready";
