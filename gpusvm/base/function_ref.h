// FunctionRef<R(Args...)>: a non-owning reference to a callable (LLVM's function_ref).
//
// Two words (the callable's address and a call thunk), built without allocating, so it can
// be passed where nothing may allocate: a walk under the notifier lock calls it there, and a
// std::function would have copied a capture larger than its small buffer onto the heap.
//
// Contract: it does not extend the callable's life. Use it as the parameter of a call that
// calls it before returning and keeps no copy (a lambda argument lives to the end of the
// full expression, which is long enough); never store one.
#pragma once

#include <memory>
#include <type_traits>
#include <utility>

namespace gpusvm {

template <typename Fn>
class FunctionRef;

template <typename R, typename... Args>
class FunctionRef<R(Args...)> {
 public:
  // Any callable object invocable as R(Args...) (not a plain function: take its address
  // into a lambda). Implicit, so a lambda is passed as to a std::function parameter.
  template <typename F>
    requires(!std::is_same_v<std::remove_cvref_t<F>, FunctionRef> &&
             !std::is_function_v<std::remove_reference_t<F>> &&
             std::is_invocable_r_v<R, F&, Args...>)
  FunctionRef(F&& f) noexcept  // NOLINT(google-explicit-constructor)
      : obj_(const_cast<void*>(static_cast<const void*>(std::addressof(f)))),
        call_([](void* obj, Args... args) -> R {
          return (*static_cast<std::remove_reference_t<F>*>(obj))(std::forward<Args>(args)...);
        }) {}

  R operator()(Args... args) const { return call_(obj_, std::forward<Args>(args)...); }

 private:
  void* obj_;
  R (*call_)(void*, Args...);
};

}  // namespace gpusvm
