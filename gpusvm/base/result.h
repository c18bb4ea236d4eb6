// Result<T>: a value or a negative errno, for functions that return both (C++20 has no
// std::expected). Functions that only succeed or fail return a [[nodiscard]] int instead.
#pragma once

#include <cassert>
#include <cstdlib>
#include <optional>
#include <utility>

namespace gpusvm {

// Tag to build a failed Result: `return Err(-ENOMEM);`.
struct Err {
  int code;  // negative errno
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT: implicit on purpose
  Result(Err e) : err_(e.code) {                   // NOLINT: implicit on purpose
    if (err_ >= 0) std::abort();  // a failed Result must carry a negative errno
  }

  bool ok() const { return err_ == 0; }
  explicit operator bool() const { return ok(); }
  // 0 when ok(), the negative errno otherwise.
  int error() const { return err_; }

  T& value() & { check(); return *value_; }
  const T& value() const& { check(); return *value_; }
  T&& value() && { check(); return std::move(*value_); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  void check() const {
    if (!value_) std::abort();  // reading the value of a failed Result is a bug
  }
  std::optional<T> value_;
  int err_ = 0;
};

}  // namespace gpusvm
