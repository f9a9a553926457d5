// A C ABI over libtorch's at::cuda::CUDAGraph for the cuda-graph crate (tch has no binding).
//
// Only non-inline libtorch/c10 functions are called, so the shim links against libtorch_cuda and
// libc10_cuda alone and needs no CUDA toolkit, only the runtime API headers. One device per process is
// assumed (the device is made current, not restored).
//
// Every function catches C++ exceptions and returns them as a malloc'd message (NULL on success) that the
// caller frees with amoe_graph_free_error; nothing unwinds into Rust.
//
// Streams: capture must run on a non-default stream. `enter_side_stream` makes a pool stream current for
// this thread (after the previous current stream has finished), so every tch op issued afterwards runs on
// it, eagerly (warm-up) or into the graph (between capture_begin and capture_end); `leave_side_stream`
// waits for the side stream and restores the previous one. Replay launches on the current stream.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "guarded.h"

#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <stdexcept>

namespace {

struct AmoeGraph {
  c10::DeviceIndex device;
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream side;
  std::optional<c10::cuda::CUDAStream> prev;
  bool capturing = false;

  explicit AmoeGraph(c10::DeviceIndex d)
      : device(d), graph(), side(c10::cuda::getStreamFromPool(false, d)) {}
};

}  // namespace

using amoe::guarded;

extern "C" {

char* amoe_graph_new(int device, void** out) {
  *out = nullptr;
  return guarded([&] {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    *out = new AmoeGraph(static_cast<c10::DeviceIndex>(device));
  });
}

void amoe_graph_delete(void* g) {
  try {
    delete static_cast<AmoeGraph*>(g);
  } catch (...) {
  }
}

char* amoe_graph_enter_side_stream(void* raw) {
  auto* g = static_cast<AmoeGraph*>(raw);
  return guarded([&] {
    if (g->prev.has_value()) throw std::runtime_error("already on the side stream");
    c10::cuda::set_device(g->device);
    auto prev = c10::cuda::getCurrentCUDAStream(g->device);
    // A device synchronisation rather than events: this runs once per warm-up or capture, never per
    // replay, and the shim stays free of inline CUDA runtime calls (no direct libcudart dependency).
    c10::cuda::device_synchronize();
    c10::cuda::setCurrentCUDAStream(g->side);
    g->prev = prev;
  });
}

char* amoe_graph_leave_side_stream(void* raw) {
  auto* g = static_cast<AmoeGraph*>(raw);
  return guarded([&] {
    if (!g->prev.has_value()) throw std::runtime_error("not on the side stream");
    c10::cuda::set_device(g->device);
    c10::cuda::device_synchronize();
    c10::cuda::setCurrentCUDAStream(*g->prev);
    g->prev.reset();
  });
}

char* amoe_graph_capture_begin(void* raw) {
  auto* g = static_cast<AmoeGraph*>(raw);
  return guarded([&] {
    if (!g->prev.has_value()) throw std::runtime_error("capture must run on the side stream");
    c10::cuda::set_device(g->device);
    // Thread-local mode: only this thread's unsafe CUDA calls (a host sync, say) fail the capture;
    // other threads (a test harness, a logger) may keep using CUDA meanwhile.
    g->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    g->capturing = true;
  });
}

char* amoe_graph_capture_end(void* raw) {
  auto* g = static_cast<AmoeGraph*>(raw);
  return guarded([&] {
    c10::cuda::set_device(g->device);
    g->capturing = false;
    g->graph.capture_end();
  });
}

char* amoe_graph_replay(void* raw) {
  auto* g = static_cast<AmoeGraph*>(raw);
  return guarded([&] {
    if (g->capturing) throw std::runtime_error("replay during capture");
    c10::cuda::set_device(g->device);
    g->graph.replay();
  });
}

void amoe_graph_free_error(char* e) { std::free(e); }

}  // extern "C"
