// mnist_runner: runs an mnist-deploy model file from C++ with libtorch, no Python.
//
//   mnist_runner serve --kind torchscript|aoti --model FILE [--threads N]
//       A persistent process speaking a framed binary protocol on stdin/stdout (see below); the
//       torchscript-cpp and aoti-cpp runtimes of mnist_deploy drive it.
//   mnist_runner run   --kind K --model FILE --input X.f32 --shape 1,1,28,28 --output Y.f32 [--threads N]
//       One batch from a raw float32 file to a raw float32 file of logits.
//   mnist_runner bench --kind K --model FILE --input X.f32 --shape 1,1,28,28 [--threads N]
//                      [--warmup 100] [--min-time 1.0] [--min-calls 50]
//       The bare loop: times its own calls and prints JSON (per-call percentiles, and the mean of a
//       loop with one clock read at each end).
//
// Protocol (little-endian, native sizes): after loading, the runner writes a hello frame
//   u32 status (0 ok, 1 error), u32 length, bytes (JSON info, or the error's first line).
// Then, per request:
//   u32 op: 0 quit, 1 run, 2 time
//   run/time: u32 ndim, i64 dims[ndim], f32 data[prod(dims)]
//   time also: u64 warmup, u64 min_calls, i64 min_time_ns
// Replies: u32 status; on error u32 length + message; on success
//   run:  u32 ndim, i64 dims[ndim], f32 logits[...]
//   time: u64 n, i64 ns[n]  (per-call steady_clock durations, as bench/timing.py's time_calls)
//
// Fault injection for the tests (as mnist_deploy/faults.py): MNIST_DEPLOY_FAULT=native:wrong-logits
// adds 1.0 to logit 0 of every row, so the parity gate must catch it.

#include <torch/script.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unistd.h>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;  // CLOCK_MONOTONIC, as Python's perf_counter_ns on Linux

// ------------------------------------------------------------------------------------------
// The model: a TorchScript module or an AOTI package, one call signature.

class Model {
 public:
  Model(const std::string& kind, const std::string& path) : kind_(kind) {
    if (kind == "torchscript") {
      module_ = std::make_unique<torch::jit::Module>(torch::jit::load(path, torch::kCPU));
      module_->eval();
    } else if (kind == "aoti") {
      // run_single_threaded: this process makes one call at a time, so the model container's locks
      // and its pool of model instances are skipped (0.15 to 0.3 us of a ~5.5 us batch-1 call).
      aoti_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, "model", /*run_single_threaded=*/true);
    } else {
      throw std::runtime_error("unknown --kind " + kind + " (torchscript or aoti)");
    }
    const char* fault = std::getenv("MNIST_DEPLOY_FAULT");
    wrong_logits_ = fault != nullptr && std::string(fault) == "native:wrong-logits";
  }

  torch::Tensor operator()(const torch::Tensor& x) {
    torch::Tensor out;
    if (module_) {
      out = module_->forward({x}).toTensor();
    } else {
      out = aoti_->run({x})[0];
    }
    if (wrong_logits_) {
      out = out.clone();
      out.select(1, 0).add_(1.0);
    }
    return out;
  }

 private:
  std::string kind_;
  std::unique_ptr<torch::jit::Module> module_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> aoti_;
  bool wrong_logits_ = false;
};

// Per-call durations in ns of model(x), after `warmup` calls, until min_time has passed and at
// least min_calls were made: the loop of bench/timing.py's time_calls.
std::vector<int64_t> time_calls(Model& model, const torch::Tensor& x, uint64_t warmup, uint64_t min_calls,
                                int64_t min_time_ns) {
  for (uint64_t i = 0; i < warmup; ++i) model(x);
  std::vector<int64_t> times;
  times.reserve(std::max<uint64_t>(min_calls, 1024));
  const auto deadline = Clock::now() + std::chrono::nanoseconds(min_time_ns);
  while (true) {
    const auto t0 = Clock::now();
    model(x);
    const auto t1 = Clock::now();
    times.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
    if (t1 >= deadline && times.size() >= min_calls) break;
  }
  return times;
}

// numpy.percentile's default (linear interpolation), so the numbers match bench/timing.py.
double percentile(std::vector<int64_t> sorted, double p) {
  std::sort(sorted.begin(), sorted.end());
  const double pos = p / 100.0 * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return static_cast<double>(sorted[lo]) + (static_cast<double>(sorted[hi]) - sorted[lo]) * (pos - lo);
}

// ------------------------------------------------------------------------------------------
// Framed I/O on raw file descriptors.

int proto_out = 1;

void read_exact(void* buf, size_t n) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    const ssize_t got = ::read(0, p, n);
    if (got == 0) throw std::runtime_error("eof");
    if (got < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error(std::string("read: ") + std::strerror(errno));
    }
    p += got;
    n -= static_cast<size_t>(got);
  }
}

void write_exact(const void* buf, size_t n) {
  const auto* p = static_cast<const char*>(buf);
  while (n > 0) {
    const ssize_t put = ::write(proto_out, p, n);
    if (put < 0) {
      if (errno == EINTR) continue;
      std::exit(3);  // the driver went away
    }
    p += put;
    n -= static_cast<size_t>(put);
  }
}

template <typename T>
T read_value() {
  T v;
  read_exact(&v, sizeof v);
  return v;
}

template <typename T>
void write_value(T v) {
  write_exact(&v, sizeof v);
}

void write_status(uint32_t status, const std::string& text) {
  write_value<uint32_t>(status);
  write_value<uint32_t>(static_cast<uint32_t>(text.size()));
  write_exact(text.data(), text.size());
}

torch::Tensor read_tensor() {
  const auto ndim = read_value<uint32_t>();
  if (ndim == 0 || ndim > 8) throw std::runtime_error("bad ndim " + std::to_string(ndim));
  std::vector<int64_t> dims(ndim);
  read_exact(dims.data(), ndim * sizeof(int64_t));
  int64_t numel = 1;
  for (auto d : dims) {
    if (d < 0 || d > (int64_t{1} << 31)) throw std::runtime_error("bad dimension " + std::to_string(d));
    numel *= d;
  }
  auto x = torch::empty(dims, torch::kFloat32);
  read_exact(x.data_ptr<float>(), static_cast<size_t>(numel) * sizeof(float));
  return x;
}

std::string first_line(const std::string& text) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") != std::string::npos) return line;
  }
  return text;
}

std::string info_json(const std::string& kind, int threads) {
  std::ostringstream o;
  o << "{\"runner\": \"mnist_runner\", \"kind\": \"" << kind << "\", \"threads\": " << at::get_num_threads()
    << ", \"threads_requested\": " << threads << ", \"torch\": \"" << TORCH_VERSION << "\", \"clock\": \"steady_clock\"}";
  return o.str();
}

int serve(const std::string& kind, const std::string& path, int threads) {
  std::unique_ptr<Model> model;
  try {
    model = std::make_unique<Model>(kind, path);
  } catch (const std::exception& e) {
    write_status(1, first_line(e.what()));
    return 1;
  }
  write_status(0, info_json(kind, threads));
  c10::InferenceMode guard;
  while (true) {
    uint32_t op;
    try {
      op = read_value<uint32_t>();
    } catch (const std::exception&) {
      return 0;  // the driver closed stdin
    }
    if (op == 0) return 0;
    try {
      torch::Tensor x = read_tensor();
      if (op == 1) {
        auto out = (*model)(x).to(torch::kFloat32).contiguous();
        write_value<uint32_t>(0);
        write_value<uint32_t>(static_cast<uint32_t>(out.dim()));
        for (auto d : out.sizes()) write_value<int64_t>(d);
        write_exact(out.data_ptr<float>(), out.numel() * sizeof(float));
      } else if (op == 2) {
        const auto warmup = read_value<uint64_t>();
        const auto min_calls = read_value<uint64_t>();
        const auto min_time_ns = read_value<int64_t>();
        auto times = time_calls(*model, x, warmup, min_calls, min_time_ns);
        write_value<uint32_t>(0);
        write_value<uint64_t>(times.size());
        write_exact(times.data(), times.size() * sizeof(int64_t));
      } else {
        write_status(1, "unknown op " + std::to_string(op));
        return 2;  // the stream is out of step: stop
      }
    } catch (const std::runtime_error& e) {
      if (std::string(e.what()) == "eof") return 0;
      write_status(1, first_line(e.what()));
    } catch (const std::exception& e) {
      write_status(1, first_line(e.what()));
    }
  }
}

// ------------------------------------------------------------------------------------------
// One-shot modes: run and the bare bench loop.

std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> dims;
  std::stringstream in(text);
  std::string part;
  while (std::getline(in, part, ',')) dims.push_back(std::stoll(part));
  if (dims.empty()) throw std::runtime_error("--shape is empty");
  return dims;
}

torch::Tensor read_f32(const std::string& path, const std::vector<int64_t>& dims) {
  auto x = torch::empty(dims, torch::kFloat32);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  const auto bytes = static_cast<std::streamsize>(x.numel() * sizeof(float));
  in.read(reinterpret_cast<char*>(x.data_ptr<float>()), bytes);
  if (in.gcount() != bytes) throw std::runtime_error(path + ": shorter than --shape says");
  return x;
}

int one_shot(const std::string& mode, const std::string& kind, const std::string& path, int threads,
             const std::string& input, const std::string& shape, const std::string& output, uint64_t warmup,
             double min_time, uint64_t min_calls) {
  Model model(kind, path);
  c10::InferenceMode guard;
  const auto x = read_f32(input, parse_shape(shape));
  if (mode == "run") {
    auto out = model(x).to(torch::kFloat32).contiguous();
    std::ofstream f(output, std::ios::binary);
    f.write(reinterpret_cast<const char*>(out.data_ptr<float>()),
            static_cast<std::streamsize>(out.numel() * sizeof(float)));
    if (!f) throw std::runtime_error("cannot write " + output);
    std::printf("{\"output\": \"%s\", \"shape\": [%lld, %lld]}\n", output.c_str(),
                static_cast<long long>(out.size(0)), static_cast<long long>(out.size(1)));
    return 0;
  }
  const auto ns = static_cast<int64_t>(min_time * 1e9);
  auto times = time_calls(model, x, warmup, min_calls, ns);
  // The bare loop: the same number of calls with one clock read at each end.
  const auto t0 = Clock::now();
  for (size_t i = 0; i < times.size(); ++i) model(x);
  const auto t1 = Clock::now();
  const double bare_mean = std::chrono::duration<double, std::milli>(t1 - t0).count() / times.size();
  double sum = 0;
  for (auto t : times) sum += t;
  std::printf(
      "{\"kind\": \"%s\", \"batch_size\": %lld, \"threads\": %d, \"n_calls\": %zu, \"p50_ms\": %.6f, "
      "\"p90_ms\": %.6f, \"p99_ms\": %.6f, \"mean_ms\": %.6f, \"min_ms\": %.6f, \"bare_loop_mean_ms\": %.6f}\n",
      kind.c_str(), static_cast<long long>(x.size(0)), at::get_num_threads(), times.size(),
      percentile(times, 50) / 1e6, percentile(times, 90) / 1e6, percentile(times, 99) / 1e6,
      sum / times.size() / 1e6, *std::min_element(times.begin(), times.end()) / 1e6, bare_mean);
  return 0;
}

int usage() {
  std::fprintf(stderr,
               "usage: mnist_runner serve|run|bench --kind torchscript|aoti --model FILE [--threads N] "
               "[--input X.f32 --shape B,C,H,W] [--output Y.f32] [--warmup N --min-time S --min-calls N]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  const std::string mode = argv[1];
  std::string kind, model, input, shape, output;
  int threads = 0;
  uint64_t warmup = 100, min_calls = 50;
  double min_time = 1.0;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string key = argv[i], value = argv[i + 1];
    if (key == "--kind") kind = value;
    else if (key == "--model") model = value;
    else if (key == "--threads") threads = std::stoi(value);
    else if (key == "--input") input = value;
    else if (key == "--shape") shape = value;
    else if (key == "--output") output = value;
    else if (key == "--warmup") warmup = std::stoull(value);
    else if (key == "--min-time") min_time = std::stod(value);
    else if (key == "--min-calls") min_calls = std::stoull(value);
    else return usage();
  }
  if (kind.empty() || model.empty()) return usage();
  if (mode == "serve") {
    // The protocol owns the real stdout; anything libtorch prints goes to stderr instead.
    proto_out = ::dup(1);
    ::dup2(2, 1);
  }
  at::set_num_interop_threads(1);
  if (threads > 0) at::set_num_threads(threads);
  if (mode == "serve") return serve(kind, model, threads);
  if (mode != "run" && mode != "bench") return usage();
  if (input.empty() || shape.empty() || (mode == "run" && output.empty())) return usage();
  try {
    return one_shot(mode, kind, model, threads, input, shape, output, warmup, min_time, min_calls);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mnist_runner: %s\n", first_line(e.what()).c_str());
    return 1;
  }
}
