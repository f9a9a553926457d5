// Error passing shared by the shim's C functions: run a body, turn any C++ exception into a malloc'd
// message for the Rust side (which frees it with the matching *_free_error), NULL on success. Nothing
// unwinds into Rust.
#pragma once

#include <cstdlib>
#include <cstring>
#include <exception>

namespace amoe {

inline char* message(const char* what) {
  size_t n = std::strlen(what);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out != nullptr) std::memcpy(out, what, n + 1);
  return out;
}

template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return message(e.what());
  } catch (...) {
    return message("unknown C++ exception");
  }
}

}  // namespace amoe
