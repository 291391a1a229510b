// Emulation builds only: the emulator's integer intrinsics, evaluated elementwise on host arrays,
// so tests can check them against their documented semantics (tests/test_emulated_kernels.py), and
// the emulator's counters (a test can tell which code path a kernel took by its warp collectives).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "cuda_emu.h"

namespace py = pybind11;

namespace isg {

void register_emu_probes(py::module_& m) {
  m.def(
      "emu_intrinsic",
      [](const std::string& name, py::array_t<uint32_t, py::array::c_style | py::array::forcecast> a,
         py::array_t<uint32_t, py::array::c_style | py::array::forcecast> b,
         py::array_t<uint32_t, py::array::c_style | py::array::forcecast> c) {
        static const std::map<std::string, std::function<uint32_t(uint32_t, uint32_t, uint32_t)>> intrinsics = {
            {"__funnelshift_lc", [](uint32_t x, uint32_t y, uint32_t z) { return __funnelshift_lc(x, y, z); }},
            {"__byte_perm", [](uint32_t x, uint32_t y, uint32_t z) { return __byte_perm(x, y, z); }},
            {"__vimax3_u16x2", [](uint32_t x, uint32_t y, uint32_t z) { return __vimax3_u16x2(x, y, z); }},
            {"__vimin3_u16x2", [](uint32_t x, uint32_t y, uint32_t z) { return __vimin3_u16x2(x, y, z); }},
        };
        auto fn = intrinsics.find(name);
        if (fn == intrinsics.end()) throw std::invalid_argument("emu_intrinsic: unknown intrinsic " + name);
        if (a.size() != b.size() || a.size() != c.size()) throw std::invalid_argument("emu_intrinsic: arrays differ in size");
        py::array_t<uint32_t> out(a.size());
        const uint32_t *x = a.data(), *y = b.data(), *z = c.data();
        uint32_t* r = out.mutable_data();
        for (py::ssize_t k = 0; k < a.size(); ++k) r[k] = fn->second(x[k], y[k], z[k]);
        return out;
      },
      py::arg("name"), py::arg("a"), py::arg("b"), py::arg("c"),
      "Emulated integer intrinsic `name` of (a[k], b[k], c[k]) for every k (uint32 arrays; emulation builds only).");
  m.def(
      "emu_shared_roundtrip",
      [](bool heap) {
        static unsigned shared_like[8];  // emulated __shared__ arrays are statics like this one
        std::unique_ptr<unsigned[]> block(new unsigned[8]);
        unsigned* p = heap ? block.get() + 3 : shared_like + 3;
        const unsigned address = unsigned(__cvta_generic_to_shared(p));
        return static_cast<unsigned*>(__cvta_shared_to_generic(address + 4)) == p + 1;
      },
      py::arg("heap"),
      "__cvta_shared_to_generic(__cvta_generic_to_shared(p) + 4) == p + 1 for p in a static (heap=False) or on the "
      "heap (heap=True: not a shared variable, reported as an error).");
  m.def(
      "emu_stats",
      []() {
        const auto& s = isg_emu::stats();
        py::dict d;
        d["launches"] = s.launches;
        d["blocks"] = s.blocks;
        d["threads"] = s.threads;
        d["sync_points"] = s.sync_points;
        return d;
      },
      "Counters of the emulator since the module was loaded (kernel launches, blocks, threads, sync points reached).");
}

}  // namespace isg
