#pragma once
// Raw-pointer bindings without torch's C++ ABI: a kernel entry point `void f(Args...)` is bound as a
// Python function whose arguments are Args' wire types (Wire<T>::type: an integer address for a
// pointer, a tuple for a struct), converted with the GIL held and run with the GIL released.
// csrc/module.cpp lists every entry point once (`<op>_cpu` / `<op>_cuda`, after pytorch/extension-cpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

namespace isg {

template <typename T, typename = void>
struct Wire {  // plain values: ints, bools
  using type = T;
  static T from(T value) { return value; }
};

template <typename T>
struct Wire<T*> {  // any pointer: its address (host or device memory, as the function documents)
  using type = uintptr_t;
  static T* from(uintptr_t address) { return reinterpret_cast<T*>(address); }
};

template <typename T>
struct Wire<T, std::enable_if_t<std::is_enum_v<T>>> {  // enum codes (the function validates them)
  using type = std::underlying_type_t<T>;
  static T from(type code) { return static_cast<T>(code); }
};

template <auto Fn>
struct Bound;

template <typename... Args, void (*Fn)(Args...)>
struct Bound<Fn> {
  static void call(typename Wire<std::decay_t<Args>>::type... wire) {
    std::tuple<std::decay_t<Args>...> args{Wire<std::decay_t<Args>>::from(wire)...};
    pybind11::gil_scoped_release release;
    std::apply(Fn, args);
  }
};

}  // namespace isg
