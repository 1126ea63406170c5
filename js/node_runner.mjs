// node_runner.mjs: runs an mnist-deploy ONNX file with onnxruntime-node, no Python.
//
//   node js/node_runner.mjs serve --model FILE [--threads N]
//       A persistent process speaking the framed binary protocol of native/runner.cpp on stdin/stdout;
//       the onnxruntime-node runtime of mnist_deploy (mnist_deploy/formats/js_node.py) drives it.
//   node js/node_runner.mjs run   --model FILE --input X.f32 --shape 1,784 --output Y.f32 [--threads N]
//       One batch from a raw float32 file to a raw float32 file of logits.
//   node js/node_runner.mjs bench --model FILE --input X.f32 --shape 1,784 [--threads N]
//                                 [--warmup 100] [--min-time 1.0] [--min-calls 50]
//       The bare loop: times its own calls and prints JSON (per-call percentiles, and the mean of a
//       loop with one clock read at each end).
//   node js/node_runner.mjs probe
//       Prints the Node and onnxruntime-node versions as JSON (the availability check).
//
// Protocol (little-endian), the same as native/runner.cpp's: after loading, a hello frame
//   u32 status (0 ok, 1 error), u32 length, bytes (JSON info, or the error's first line).
// Then, per request:
//   u32 op: 0 quit, 1 run, 2 time
//   run/time: u32 ndim, i64 dims[ndim], f32 data[prod(dims)]
//   time also: u64 warmup, u64 min_calls, i64 min_time_ns
// Replies: u32 status; on error u32 length + message; on success
//   run:  u32 ndim, i64 dims[ndim], f32 logits[...]
//   time: u64 n, i64 ns[n]  (per-call process.hrtime.bigint() durations around `await session.run`,
//         what a Node service sees, as bench/timing.py's time_calls)
//
// The session: CPU execution provider, all graph optimisations, and with --threads N > 0
// intraOpNumThreads N and interOpNumThreads 1, as the Python onnxruntime row sets them.
//
// Fault injection for the tests (as mnist_deploy/faults.py): MNIST_DEPLOY_FAULT=node:wrong-logits
// adds 1.0 to logit 0 of every row, so the parity gate must catch it.

import * as fs from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const OP_QUIT = 0, OP_RUN = 1, OP_TIME = 2;
const MAX_DIM = 2 ** 31;

// The protocol owns the real stdout: anything a library prints through console goes to stderr.
console.log = console.info = console.debug = console.warn = console.error;

class Eof extends Error {}

function firstLine(err) {
  const text = String(err && err.message !== undefined ? err.message : err);
  return text.split('\n').map((l) => l.trim()).find((l) => l) || text;
}

// ------------------------------------------------------------------------------------------
// Framed I/O on raw file descriptors (blocking reads: one request at a time, as the C++ runner).

const pause = new Int32Array(new SharedArrayBuffer(4));

function readExact(n) {
  const buf = Buffer.from(new ArrayBuffer(n)); // its own ArrayBuffer: offset 0, aligned for Float32Array
  let off = 0;
  while (off < n) {
    let got;
    try {
      got = fs.readSync(0, buf, off, n - off, null);
    } catch (e) {
      if (e.code === 'EAGAIN') { Atomics.wait(pause, 0, 0, 1); continue; }
      if (e.code === 'EOF') throw new Eof();
      throw e;
    }
    if (got === 0) throw new Eof();
    off += got;
  }
  return buf;
}

function writeAll(buf) {
  let off = 0;
  while (off < buf.length) {
    try {
      off += fs.writeSync(1, buf, off, buf.length - off);
    } catch (e) {
      if (e.code === 'EAGAIN') { Atomics.wait(pause, 0, 0, 1); continue; }
      process.exit(3); // the driver went away
    }
  }
}

function u32(v) { const b = Buffer.alloc(4); b.writeUInt32LE(v); return b; }
function u64(v) { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt(v)); return b; }

function writeStatus(status, text) {
  const body = Buffer.from(text, 'utf8');
  writeAll(Buffer.concat([u32(status), u32(body.length), body]));
}

function readTensorFrame() {
  const ndim = readExact(4).readUInt32LE(0);
  if (ndim === 0 || ndim > 8) throw new Error(`bad ndim ${ndim}`);
  const raw = readExact(8 * ndim);
  const dims = [];
  let count = 1;
  for (let i = 0; i < ndim; i++) {
    const d = Number(raw.readBigInt64LE(8 * i));
    if (d < 0 || d > MAX_DIM) throw new Error(`bad dimension ${d}`);
    dims.push(d);
    count *= d;
  }
  const data = readExact(4 * count);
  return { dims, data: new Float32Array(data.buffer, 0, count) };
}

// ------------------------------------------------------------------------------------------
// The model.

function loadOrt() {
  return require('onnxruntime-node');
}

function versions(ort) {
  return { node: process.versions.node, onnxruntime_node: ort.env.versions.node,
           onnxruntime_common: ort.env.versions.common, platform: process.platform, arch: process.arch };
}

class Model {
  static async load(path, threads) {
    const ort = loadOrt();
    const options = { executionProviders: ['cpu'], graphOptimizationLevel: 'all', logSeverityLevel: 3 };
    if (threads > 0) {
      options.intraOpNumThreads = threads;
      options.interOpNumThreads = 1;
    }
    const session = await ort.InferenceSession.create(path, options);
    return new Model(ort, session, options, threads);
  }

  constructor(ort, session, options, threads) {
    this.ort = ort;
    this.session = session;
    this.inputName = session.inputNames[0];
    this.outputName = session.outputNames[0];
    this.wrongLogits = process.env.MNIST_DEPLOY_FAULT === 'node:wrong-logits';
    this.info = { runner: 'node_runner.mjs', ...versions(ort), threads: threads > 0 ? threads : null,
                  threads_requested: threads, intra_op_num_threads: options.intraOpNumThreads ?? null,
                  inter_op_num_threads: options.interOpNumThreads ?? null, execution_providers: options.executionProviders,
                  graph_optimization_level: options.graphOptimizationLevel, clock: 'process.hrtime.bigint',
                  input: this.inputName, output: this.outputName };
  }

  feeds(x) {
    return { [this.inputName]: new this.ort.Tensor('float32', x.data, x.dims) };
  }

  async run(feeds) {
    const out = (await this.session.run(feeds))[this.outputName];
    let data = out.data;
    if (this.wrongLogits) {
      data = Float32Array.from(data);
      const width = out.dims[out.dims.length - 1];
      for (let i = 0; i < data.length; i += width) data[i] += 1.0;
    }
    return { dims: out.dims.map(Number), data };
  }

  // Per-call durations in ns of `await session.run(feeds)`, after `warmup` calls, until minTimeNs has
  // passed and at least minCalls were made: the loop of bench/timing.py's time_calls.
  async timeCalls(feeds, warmup, minCalls, minTimeNs) {
    for (let i = 0; i < warmup; i++) await this.session.run(feeds);
    const times = [];
    const deadline = process.hrtime.bigint() + BigInt(minTimeNs);
    for (;;) {
      const t0 = process.hrtime.bigint();
      await this.session.run(feeds);
      const t1 = process.hrtime.bigint();
      times.push(t1 - t0);
      if (t1 >= deadline && times.length >= minCalls) break;
    }
    return BigInt64Array.from(times);
  }
}

// numpy.percentile's default (linear interpolation), so the numbers match bench/timing.py.
function percentile(sorted, p) {
  const pos = (p / 100) * (sorted.length - 1);
  const lo = Math.floor(pos);
  const hi = Math.min(lo + 1, sorted.length - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

// ------------------------------------------------------------------------------------------
// Modes.

async function serve(path, threads) {
  let model;
  try {
    model = await Model.load(path, threads);
  } catch (e) {
    writeStatus(1, firstLine(e));
    return 1;
  }
  writeStatus(0, JSON.stringify(model.info));
  for (;;) {
    let op;
    try {
      op = readExact(4).readUInt32LE(0);
    } catch (e) {
      return 0; // the driver closed stdin
    }
    if (op === OP_QUIT) return 0;
    try {
      const x = readTensorFrame();
      if (op === OP_RUN) {
        const out = await model.run(model.feeds(x));
        const head = Buffer.alloc(8 + 8 * out.dims.length);
        head.writeUInt32LE(0, 0);
        head.writeUInt32LE(out.dims.length, 4);
        out.dims.forEach((d, i) => head.writeBigInt64LE(BigInt(d), 8 + 8 * i));
        writeAll(head);
        writeAll(Buffer.from(out.data.buffer, out.data.byteOffset, out.data.byteLength));
      } else if (op === OP_TIME) {
        const params = readExact(24);
        const warmup = Number(params.readBigUInt64LE(0));
        const minCalls = Number(params.readBigUInt64LE(8));
        const minTimeNs = params.readBigInt64LE(16);
        const times = await model.timeCalls(model.feeds(x), warmup, minCalls, minTimeNs);
        writeAll(Buffer.concat([u32(0), u64(times.length)]));
        writeAll(Buffer.from(times.buffer, times.byteOffset, times.byteLength));
      } else {
        writeStatus(1, `unknown op ${op}`);
        return 2; // the stream is out of step: stop
      }
    } catch (e) {
      if (e instanceof Eof) return 0;
      writeStatus(1, firstLine(e));
    }
  }
}

function readF32(path, dims) {
  const count = dims.reduce((a, b) => a * b, 1);
  const bytes = fs.readFileSync(path);
  if (bytes.length < 4 * count) throw new Error(`${path}: shorter than --shape says`);
  const copy = new Float32Array(count);
  new Uint8Array(copy.buffer).set(bytes.subarray(0, 4 * count));
  return { dims, data: copy };
}

async function oneShot(mode, args) {
  const model = await Model.load(args.model, args.threads);
  const x = readF32(args.input, args.shape.split(',').map(Number));
  const feeds = model.feeds(x);
  if (mode === 'run') {
    const out = await model.run(feeds);
    fs.writeFileSync(args.output, Buffer.from(out.data.buffer, out.data.byteOffset, out.data.byteLength));
    process.stdout.write(JSON.stringify({ output: args.output, shape: out.dims }) + '\n');
    return 0;
  }
  const times = Array.from(await model.timeCalls(feeds, args.warmup, args.minCalls, Math.round(args.minTime * 1e9)),
                           Number);
  // The bare loop: the same number of calls with one clock read at each end.
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < times.length; i++) await model.session.run(feeds);
  const bareMean = Number(process.hrtime.bigint() - t0) / times.length / 1e6;
  const sorted = [...times].sort((a, b) => a - b);
  const ms = (v) => v / 1e6;
  process.stdout.write(JSON.stringify({
    batch_size: x.dims[0], threads: model.info.threads, n_calls: times.length,
    p50_ms: ms(percentile(sorted, 50)), p90_ms: ms(percentile(sorted, 90)), p99_ms: ms(percentile(sorted, 99)),
    mean_ms: ms(times.reduce((a, b) => a + b, 0) / times.length), min_ms: ms(sorted[0]),
    bare_loop_mean_ms: bareMean, ...versions(model.ort),
  }) + '\n');
  return 0;
}

function usage() {
  process.stderr.write('usage: node_runner.mjs serve|run|bench|probe --model FILE [--threads N] '
                       + '[--input X.f32 --shape B,784] [--output Y.f32] [--warmup N --min-time S --min-calls N]\n');
  return 2;
}

function parseArgs(argv) {
  const args = { threads: 0, warmup: 100, minTime: 1.0, minCalls: 50 };
  const names = { '--model': 'model', '--threads': 'threads', '--input': 'input', '--shape': 'shape',
                  '--output': 'output', '--warmup': 'warmup', '--min-time': 'minTime', '--min-calls': 'minCalls',
                  '--kind': 'kind' };
  const numeric = new Set(['threads', 'warmup', 'minTime', 'minCalls']);
  for (let i = 0; i + 1 < argv.length; i += 2) {
    const key = names[argv[i]];
    if (key === undefined) return null;
    args[key] = numeric.has(key) ? Number(argv[i + 1]) : argv[i + 1];
    if (numeric.has(key) && !Number.isFinite(args[key])) return null;
  }
  return args;
}

async function main(argv) {
  const mode = argv[0];
  if (mode === 'probe') {
    try {
      process.stdout.write(JSON.stringify(versions(loadOrt())) + '\n');
      return 0;
    } catch (e) {
      process.stderr.write(`onnxruntime-node cannot be loaded: ${firstLine(e)}\n`);
      return 1;
    }
  }
  const args = parseArgs(argv.slice(1));
  if (args === null || !args.model) return usage();
  if (mode === 'serve') return serve(args.model, args.threads);
  if (mode !== 'run' && mode !== 'bench') return usage();
  if (!args.input || !args.shape || (mode === 'run' && !args.output)) return usage();
  try {
    return await oneShot(mode, args);
  } catch (e) {
    process.stderr.write(`node_runner: ${firstLine(e)}\n`);
    return 1;
  }
}

process.exitCode = await main(process.argv.slice(2));
