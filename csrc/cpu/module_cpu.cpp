// Python module slvit_fast._C_cpu. Importing it registers the slvit_fast::cpu_* ops (TORCH_LIBRARY in
// slvit_cpu.cpp). Its functions:
//
//   exit_infer(module, x, extra) -> Tensor | None
//     The batch-1 latency entry point of backend "cpu": an SLViTExit's inference forward through the
//     fused kernels with no per-call Python work (no parameter list, cfg ints or op dispatch). The
//     module's parameters are read from its `_modules` / `_parameters` dicts on every call (a replaced
//     Parameter or submodule is always seen) and their validated pointers are kept per module, keyed on
//     every parameter's TensorImpl, data pointer, version counter, dtype, sizes and strides plus the
//     config object and the input's per-sample shape: an optimizer step, `.copy_`, `load_state_dict`,
//     `.to()` or `.data =` changes a key, and the pointers are validated again. Only float32 contiguous
//     parameters are taken (other dtypes: the op path), so nothing but pointers is kept and weights are
//     read on every call - in-place changes that bump no version (`.data.copy_`, inference tensors
//     changed under inference_mode) are seen too. Returns None - the caller takes the op path - whenever the fast path
//     is not exactly right: autograd needs a graph, dropout is active, the input is not a plain
//     float32 CPU tensor, a dispatch / torch-function mode or tensor subclass is active (fake tensors,
//     FlopCounterMode, functorch), torch.jit.trace is recording, the fused kernels are off, or the parameters fail validation (the op
//     path then raises its usual error).
//   entry_stats() -> (fast calls, validations, declined calls)
//   _fused_debug(legacy_phases, profile) -> Tensor   (tests and profiling; see cpu_entry.h)
//   _train_pool_bytes() -> int   (tests: bytes of free blocks in the training path's cache, block_pool.h)
//   _gelu_grad_kernels(x, g, isa, in_place) -> (y, d, dx, colsum)   (tests: the training backward's GELU kernels)
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "block_pool.h"
#include "cpu_entry.h"
#ifdef SLVIT_FUSED_AVX2
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include "fused_avx2.h"
#include "fused_train.h"
#endif

namespace {

using at::Tensor;

// Sizes and strides are stored inline (parameters have at most kMaxDim dims; a larger one never
// matches, so it is validated on every call): a key is one contiguous record, no extra cache misses.
constexpr int64_t kMaxDim = 4;
struct ParamKey {
  const void* impl;
  const void* data;
  int64_t version;
  at::ScalarType dtype;
  int64_t dim;
  int64_t sizes[kMaxDim], strides[kMaxDim];

  // The version is not needed for correctness - only pointers are kept, and the data pointer, shape and
  // strides are compared on every call - but a changed version re-validates (cheap, and what the issue
  // asked for). Tensors without a counter (inference tensors, or a Parameter made under inference_mode
  // whose .data was later replaced) key on -1: _version() would throw for them.
  static int64_t version_of(const Tensor& t) {
    return t.unsafeGetTensorImpl()->version_counter().enabled() ? (int64_t)t._version() : -1;
  }
  bool same(const Tensor& t) const {
    if (impl != t.unsafeGetTensorImpl() || data != t.data_ptr() || version != version_of(t) ||
        dtype != t.scalar_type() || dim != t.dim() || dim > kMaxDim)
      return false;
    for (int64_t i = 0; i < dim; ++i)
      if (sizes[i] != t.size(i) || strides[i] != t.stride(i)) return false;
    return true;
  }
  static ParamKey of(const Tensor& t) {
    ParamKey k{t.unsafeGetTensorImpl(), t.data_ptr(), version_of(t), t.scalar_type(), t.dim(), {}, {}};
    for (int64_t i = 0; i < k.dim && i < kMaxDim; ++i) {
      k.sizes[i] = t.size(i);
      k.strides[i] = t.stride(i);
    }
    return k;
  }
};

struct Entry {
  PyObject* weak = nullptr;    // weak reference to the module (owned)
  PyObject* config = nullptr;  // the module's config object when cfg was read (owned; frozen dataclass)
  std::vector<int64_t> cfg;
  double eps = 0;
  int64_t C = 0, H = 0, W = 0;  // config.in_channels, config.feature_size
  bool dropout = false;  // any dropout rate of the config > 0
  bool extra = false;    // config has extra tokens
  std::vector<ParamKey> keys;
  std::shared_ptr<slvit_cpu::Prepared> prep;
  // Addresses the next call will read (the module tree's objects and dicts, every parameter's Python
  // object, TensorImpl, storage and version counter): prefetched together when the call starts.
  std::vector<const void*> touch;
  bool retouch = true;  // record `touch` on the next walk (set when the parameters were re-validated)
};

std::unordered_map<PyObject*, Entry> g_cache;  // keyed by module identity; only touched with the GIL held
// The entry of the last call's module (reset whenever an entry is erased): its `touch` list is
// prefetched before anything else, so the ~200 cache misses of the parameter walk overlap instead of
// following one another (after the kernel has run, the interpreter's objects are out of L1/L2).
PyObject* g_last_module = nullptr;
Entry* g_last_entry = nullptr;
uint64_t g_fast = 0, g_validated = 0, g_declined = 0;

// Parameter layout of slvit_fast.reference (read once from there: one definition for every backend).
struct Path {
  std::vector<PyObject*> mods;  // submodule names (interned, owned)
  PyObject* leaf;
};
std::vector<Path> g_embed, g_extra, g_layer, g_head;
PyObject *s_modules, *s_parameters, *s_layers, *s_training, *s_config, *g_config_ints;

bool read_paths(PyObject* ref, const char* name, std::vector<Path>& out) {
  PyObject* names = PyObject_GetAttrString(ref, name);
  if (!names) return false;
  PyObject* seq = PySequence_Fast(names, "parameter names");
  Py_DECREF(names);
  if (!seq) return false;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    const char* full = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(seq, i));
    if (!full) {
      Py_DECREF(seq);
      return false;
    }
    std::string s(full);
    Path p;
    size_t start = 0, dot;
    while ((dot = s.find('.', start)) != std::string::npos) {
      p.mods.push_back(PyUnicode_InternFromString(s.substr(start, dot - start).c_str()));
      start = dot + 1;
    }
    p.leaf = PyUnicode_InternFromString(s.substr(start).c_str());
    out.push_back(p);
  }
  Py_DECREF(seq);
  return true;
}

bool init_once() {
  static int state = 0;  // 0 not yet, 1 ready, -1 failed
  if (state) return state > 0;
  state = -1;
  PyObject* ref = PyImport_ImportModule("slvit_fast.reference");
  if (!ref) return false;
  const bool ok = read_paths(ref, "EMBED_PARAMS", g_embed) && read_paths(ref, "EXTRA_PARAMS", g_extra) &&
                  read_paths(ref, "LAYER_PARAMS", g_layer) && read_paths(ref, "HEAD_PARAMS", g_head);
  Py_DECREF(ref);
  if (!ok) return false;
  PyObject* ops = PyImport_ImportModule("slvit_fast.ops.cpp_ops");
  if (!ops) return false;
  g_config_ints = PyObject_GetAttrString(ops, "config_ints");
  Py_DECREF(ops);
  if (!g_config_ints) return false;
  s_modules = PyUnicode_InternFromString("_modules");
  s_parameters = PyUnicode_InternFromString("_parameters");
  s_layers = PyUnicode_InternFromString("layers");
  s_training = PyUnicode_InternFromString("training");
  s_config = PyUnicode_InternFromString("config");
  state = 1;
  return true;
}

// Addresses read by the walk below, collected while an entry is (re)validated (else nullptr).
std::vector<const void*>* g_touch = nullptr;

void touch_dict(PyObject* d) {
  g_touch->push_back(d);
#if PY_VERSION_HEX < 0x030E0000
  // its key table (header, hash index, entries of <= 24 bytes) and, for a split instance dict, its values
  const PyDictObject* dict = (const PyDictObject*)d;
  const int64_t used = dict->ma_used;
  const char* keys = (const char*)dict->ma_keys;
  for (int64_t i = 0, n = std::min<int64_t>(16, 2 + (used * 24 + 63) / 64); i < n; ++i) g_touch->push_back(keys + 64 * i);
  const char* values = (const char*)dict->ma_values;
  if (values)
    for (int64_t i = -1, n = (used * 8 + 63) / 64; i < n; ++i) g_touch->push_back(values + 64 * i);
#endif
}

// m.__dict__[attr] as a dict (borrowed), or nullptr. Instance-dict lookup only: no __getattr__ runs.
PyObject* inst_dict_item(PyObject* m, PyObject* attr) {
  PyObject** dp = _PyObject_GetDictPtr(m);
  if (!dp || !*dp) return nullptr;
  PyObject* v = PyDict_GetItem(*dp, attr);
  if (g_touch) {
    g_touch->push_back(m);
    touch_dict(*dp);
    if (v && PyDict_Check(v)) touch_dict(v);
  }
  return (v && PyDict_Check(v)) ? v : nullptr;
}

void touch_tensor(std::vector<const void*>& touch, PyObject* o, const Tensor& t) {
  touch.push_back(o);
  const char* impl = (const char*)t.unsafeGetTensorImpl();
  for (size_t i = 0; i < sizeof(c10::TensorImpl); i += 64) touch.push_back(impl + i);
  const char* storage = (const char*)t.storage().unsafeGetStorageImpl();
  touch.push_back(storage);
  touch.push_back(storage + 32);
  // VariableVersion is one intrusive pointer to its counter (only an address to prefetch: any value is harmless)
  static_assert(sizeof(c10::VariableVersion) == sizeof(void*), "VariableVersion layout");
  touch.push_back(*reinterpret_cast<const void* const*>(&t.unsafeGetTensorImpl()->version_counter()));
}

PyObject* submodule(PyObject* m, PyObject* name) {  // borrowed or nullptr
  PyObject* mods = inst_dict_item(m, s_modules);
  return mods ? PyDict_GetItem(mods, name) : nullptr;
}

bool read_group(PyObject* root, const std::vector<Path>& paths, std::vector<PyObject*>& out) {
  if (g_touch) g_touch->push_back(root);
  for (const Path& p : paths) {
    if (g_touch) {  // the key strings (their cached hashes are read)
      g_touch->push_back(p.mods.data());
      for (PyObject* k : p.mods) g_touch->push_back(k);
      g_touch->push_back(p.leaf);
    }
    PyObject* m = root;
    for (PyObject* k : p.mods)
      if (!(m = submodule(m, k))) return false;
    PyObject* params = inst_dict_item(m, s_parameters);
    PyObject* t = params ? PyDict_GetItem(params, p.leaf) : nullptr;
    if (!t || !THPVariable_Check(t)) return false;
    out.push_back(t);
  }
  return true;
}

// The module's parameters in op order (reference.module_params), borrowed; false if any is missing.
bool read_params(PyObject* module, bool extra, std::vector<PyObject*>& out) {
  if (!read_group(module, g_embed, out)) return false;
  if (extra && !read_group(module, g_extra, out)) return false;
  PyObject* layers = submodule(module, s_layers);
  PyObject* lmods = layers ? inst_dict_item(layers, s_modules) : nullptr;
  if (!lmods) return false;
  Py_ssize_t pos = 0;
  PyObject *key, *layer;
  while (PyDict_Next(lmods, &pos, &key, &layer))
    if (!read_group(layer, g_layer, out)) return false;
  return read_group(module, g_head, out);
}

// A plain dense CPU tensor that no Python/functorch layer needs to see.
bool plain_cpu(const Tensor& t) {
  if (!t.defined() || t.layout() != at::kStrided || !t.device().is_cpu() || !t.has_storage()) return false;
  const c10::DispatchKeySet ks = t.key_set();
  return ks.has(c10::DispatchKey::CPU) && !ks.has(c10::DispatchKey::Python) &&
         !ks.has(c10::DispatchKey::Functionalize) && !ks.has(c10::DispatchKey::FuncTorchBatched) &&
         !ks.has(c10::DispatchKey::FuncTorchGradWrapper) && !ks.has(c10::DispatchKey::Conjugate) &&
         !ks.has(c10::DispatchKey::Negative);
}

PyObject* decline() {
  ++g_declined;
  Py_RETURN_NONE;
}

void drop_entry(Entry& e) {
  Py_XDECREF(e.weak);
  Py_XDECREF(e.config);
  e.weak = e.config = nullptr;
}

void sweep_dead() {
  g_last_module = nullptr;
  g_last_entry = nullptr;
  for (auto it = g_cache.begin(); it != g_cache.end();) {
    if (PyWeakref_GetObject(it->second.weak) == Py_None) {
      drop_entry(it->second);
      it = g_cache.erase(it);
    } else {
      ++it;
    }
  }
}

// (Re)reads cfg, eps and the dropout rates from the module's config object.
bool read_config(Entry& e, PyObject* config) {
  PyObject* ints = PyObject_CallOneArg(g_config_ints, config);
  if (!ints) return false;
  PyObject* seq = PySequence_Fast(ints, "config_ints");
  Py_DECREF(ints);
  if (!seq) return false;
  e.cfg.clear();
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i)
    e.cfg.push_back(PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i)));
  Py_DECREF(seq);
  auto num = [&](const char* name, double& v) {
    PyObject* o = PyObject_GetAttrString(config, name);
    if (!o) return false;
    v = PyFloat_AsDouble(o);
    Py_DECREF(o);
    return !(v == -1.0 && PyErr_Occurred());
  };
  double eps, d1, d2, d3, ch;
  if (PyErr_Occurred() || !num("ln_eps", eps) || !num("dropout", d1) || !num("attention_dropout", d2) ||
      !num("head_dropout", d3) || !num("in_channels", ch))
    return false;
  PyObject* fs = PyObject_GetAttrString(config, "feature_size");
  if (!fs) return false;
  PyObject* hw = PySequence_Fast(fs, "feature_size");
  Py_DECREF(fs);
  if (!hw) return false;
  const bool pair = PySequence_Fast_GET_SIZE(hw) == 2;
  const long long fh = pair ? PyLong_AsLongLong(PySequence_Fast_GET_ITEM(hw, 0)) : -1;
  const long long fw = pair ? PyLong_AsLongLong(PySequence_Fast_GET_ITEM(hw, 1)) : -1;
  Py_DECREF(hw);
  if (!pair || PyErr_Occurred()) return false;
  e.C = (int64_t)ch;
  e.H = fh;
  e.W = fw;
  e.eps = eps;
  e.dropout = d1 > 0 || d2 > 0 || d3 > 0;
  e.extra = e.cfg.size() > 8 && e.cfg[8] > 0;
  Py_XDECREF(e.config);
  Py_INCREF(config);
  e.config = config;
  return true;
}

PyObject* exit_infer(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "exit_infer(module, x, extra) takes 3 arguments");
    return nullptr;
  }
  PyObject *module = args[0], *xo = args[1], *eo = args[2];
  if (module == g_last_module)
    for (const void* p : g_last_entry->touch) __builtin_prefetch(p);
  if (!init_once()) return nullptr;
  if (!THPVariable_CheckExact(xo) || (eo != Py_None && !THPVariable_CheckExact(eo))) return decline();
  if (c10::impl::TorchDispatchModeTLS::any_modes_set() || at::impl::torch_function_mode_enabled() ||
      torch::jit::tracer::isTracing())  // a trace must record the op
    return decline();
  const Tensor& x = THPVariable_Unpack(xo);
  c10::optional<Tensor> extra;
  if (eo != Py_None) extra = THPVariable_Unpack(eo);
  if (!plain_cpu(x) || x.scalar_type() != at::kFloat) return decline();
  if (extra && (!plain_cpu(*extra) || extra->scalar_type() != at::kFloat)) return decline();
  const bool grad = at::GradMode::is_enabled();
  if (grad && (x.requires_grad() || (extra && extra->requires_grad()))) return decline();
  slvit_cpu::FusedEnv env;  // read here, with the GIL held (entry_run reads no environment variable)
  try {
    env = slvit_cpu::entry_env();
  } catch (const std::exception&) {
    return decline();  // an invalid SLVIT_FAST_CPU_FUSED / _ISA value: the op path reports it
  }
  if (!env.fused) return decline();

  PyObject** dp = _PyObject_GetDictPtr(module);
  PyObject* config = (dp && *dp) ? PyDict_GetItem(*dp, s_config) : nullptr;
  PyObject* training = (dp && *dp) ? PyDict_GetItem(*dp, s_training) : nullptr;
  if (!config || !training) return decline();

  auto it = g_cache.find(module);
  if (it != g_cache.end() && PyWeakref_GetObject(it->second.weak) != module) {  // a new object at this address
    g_last_module = nullptr;
    g_last_entry = nullptr;
    drop_entry(it->second);
    g_cache.erase(it);
    it = g_cache.end();
  }
  if (it == g_cache.end()) {
    if (g_cache.size() >= 256) sweep_dead();
    PyObject* weak = PyWeakref_NewRef(module, nullptr);
    if (!weak) {
      PyErr_Clear();
      return decline();
    }
    it = g_cache.emplace(module, Entry{}).first;
    it->second.weak = weak;
  }
  Entry& e = it->second;
  g_last_module = module;
  g_last_entry = &e;
  if (e.config != config && !read_config(e, config)) {
    PyErr_Clear();
    e.prep.reset();
    Py_CLEAR(e.config);
    return decline();
  }
  // the feature map must be what the config says (SLViTExit.forward calls us before its own checks;
  // the kernels alone would accept e.g. H and W swapped on a non-square map with the same token count)
  if (x.dim() != 4 || x.size(1) != e.C || x.size(2) != e.H || x.size(3) != e.W) return decline();
  if (e.dropout && training == Py_True) return decline();
  if (e.extra != extra.has_value()) return decline();  // wrong call: the op path raises the error

  // the walk records what it reads on the first call and after a re-validation (a replaced Parameter
  // or submodule changes the objects the next calls read); prefetching a stale address is harmless
  std::vector<PyObject*> objs;
  objs.reserve(64);
  const bool record = e.retouch;
  if (record) {
    e.retouch = false;
    e.touch.clear();
    e.touch.push_back(dp ? *dp : nullptr);
    g_touch = &e.touch;
  }
  const bool found = read_params(module, e.extra, objs);
  g_touch = nullptr;
  if (!found) return decline();
  std::vector<Tensor> params;
  params.reserve(objs.size());
  bool same = e.prep && e.keys.size() == objs.size();
  for (size_t i = 0; i < objs.size(); ++i) {
    const Tensor& t = THPVariable_Unpack(objs[i]);
    // float32 contiguous only: then the kept pointers are the data pointers compared in the key (no
    // copies that could go stale), which is also why parameters without a version counter are fine here
    // (inference tensors: an exit built under torch.inference_mode; ParamKey::version_of)
    if (!plain_cpu(t) || t.scalar_type() != at::kFloat || !t.is_contiguous() || (grad && t.requires_grad()))
      return decline();
    same = same && e.keys[i].same(t);
    if (record) touch_tensor(e.touch, objs[i], t);
    params.push_back(t);  // kept alive while the kernel runs without the GIL
  }
  if (record)
    for (size_t i = 0; i < e.keys.size() * sizeof(ParamKey); i += 64) e.touch.push_back((const char*)e.keys.data() + i);
  if (same && !slvit_cpu::entry_matches(*e.prep, x, extra)) same = false;
  if (!same) {
    e.prep.reset();
    e.keys.clear();
    try {
      e.prep = slvit_cpu::entry_prepare(x, extra, params, e.cfg, e.eps);
    } catch (const std::exception&) {
      return decline();  // the op path reports it
    }
    for (const Tensor& t : params) e.keys.push_back(ParamKey::of(t));
    e.retouch = true;
    ++g_validated;
  }
  ++g_fast;
  std::shared_ptr<slvit_cpu::Prepared> prep = e.prep;  // stays valid if another thread revalidates
  Tensor out;
  std::string err;
  Py_BEGIN_ALLOW_THREADS
  try {
    out = slvit_cpu::entry_run(*prep, x, extra, env);
  } catch (const std::exception& ex) {
    err = ex.what();
  }
  Py_END_ALLOW_THREADS
  if (!out.defined()) {
    PyErr_SetString(PyExc_RuntimeError, err.c_str());
    return nullptr;
  }
  return THPVariable_Wrap(std::move(out));
}

PyObject* entry_stats(PyObject*, PyObject*) {
  return Py_BuildValue("(KKK)", (unsigned long long)g_fast, (unsigned long long)g_validated,
                       (unsigned long long)g_declined);
}

PyObject* train_pool_bytes(PyObject*, PyObject*) {
  return PyLong_FromSize_t(slvit_cpu::block_pool_cached_bytes());
}

PyObject* fused_debug(PyObject*, PyObject* args) {
  long long legacy, profile;
  if (!PyArg_ParseTuple(args, "LL", &legacy, &profile)) return nullptr;
  try {
    return THPVariable_Wrap(slvit_cpu::fused_debug(legacy, profile));
  } catch (const std::exception& ex) {
    PyErr_SetString(PyExc_RuntimeError, ex.what());
    return nullptr;
  }
}

// Test hook of the training backward's GELU kernels (tests/test_cpu_gelu_grad.py): for float32 contiguous
// x and g of one shape (rows, cols) and the tiles' isa (0 avx2, 1 avx512), returns (y, d, dx, colsum):
// y, d = slvit_fused::gelu_forward_grad(x) and dx = g * d, colsum = its column sums
// (slvit_train::mul_colsum_add onto zeros). y and d are flat with kPad floats after the rows x cols
// results, filled with -7 before the call (a write past n shows there); in_place: d is computed over a
// copy of x (as the backward does, dydx == x).
PyObject* gelu_grad_kernels(PyObject*, PyObject* args) {
  PyObject *xo, *go;
  long long isa, in_place;
  if (!PyArg_ParseTuple(args, "OOLL", &xo, &go, &isa, &in_place)) return nullptr;
  if (!THPVariable_Check(xo) || !THPVariable_Check(go)) {
    PyErr_SetString(PyExc_TypeError, "_gelu_grad_kernels(x, g, isa): x and g must be tensors");
    return nullptr;
  }
#ifdef SLVIT_FUSED_AVX2
  const Tensor &x = THPVariable_Unpack(xo), &g = THPVariable_Unpack(go);
  std::string err;
  if (x.dim() != 2 || !x.sizes().equals(g.sizes()) || x.scalar_type() != at::kFloat || g.scalar_type() != at::kFloat ||
      !x.is_contiguous() || !g.is_contiguous() || x.device().type() != at::kCPU || g.device().type() != at::kCPU)
    err = "_gelu_grad_kernels: x and g must be contiguous float32 CPU tensors of one 2-D shape";
  else if (!slvit_fused::cpu_supported())
    err = "_gelu_grad_kernels: this CPU lacks AVX2/FMA";
  else if (isa != slvit_fused::kIsaAvx2 && isa != slvit_fused::kIsaAvx512)
    err = "_gelu_grad_kernels: isa must be 0 (avx2) or 1 (avx512), got " + std::to_string(isa);
  else if (isa == slvit_fused::kIsaAvx512 && slvit_fused::avx512_missing())
    err = std::string("_gelu_grad_kernels: avx512 tiles unavailable (missing ") + slvit_fused::avx512_missing() + ")";
  if (!err.empty()) {
    PyErr_SetString(PyExc_ValueError, err.c_str());
    return nullptr;
  }
  const int64_t rows = x.size(0), cols = x.size(1), n = x.numel(), kPad = 32;
  Tensor y = at::full({n + kPad}, -7.0, x.options()), d = at::full({n + kPad}, -7.0, x.options());
  Tensor dx = g.clone(), cs = at::zeros({cols}, x.options());
  const float* src = x.data_ptr<float>();
  if (in_place) {
    d.narrow(0, 0, n).copy_(x.view({n}));
    src = d.data_ptr<float>();
  }
  slvit_fused::gelu_forward_grad((int)isa, src, y.data_ptr<float>(), d.data_ptr<float>(), n);
  slvit_train::mul_colsum_add(dx.data_ptr<float>(), d.data_ptr<float>(), rows, cols, cs.data_ptr<float>());
  return Py_BuildValue("(NNNN)", THPVariable_Wrap(y), THPVariable_Wrap(d), THPVariable_Wrap(dx), THPVariable_Wrap(cs));
#else
  PyErr_SetString(PyExc_RuntimeError, "_gelu_grad_kernels: built without the fused AVX2 kernels");
  return nullptr;
#endif
}

PyMethodDef methods[] = {
    {"exit_infer", (PyCFunction)(void (*)(void))exit_infer, METH_FASTCALL,
     "exit_infer(module, x, extra) -> Tensor | None: fused inference forward of an SLViTExit (None: use the op)"},
    {"entry_stats", entry_stats, METH_NOARGS, "(fast calls, validations, declined calls) of exit_infer"},
    {"_train_pool_bytes", train_pool_bytes, METH_NOARGS,
     "bytes of free blocks the training path's block cache holds (block_pool.h)"},
    {"_fused_debug", fused_debug, METH_VARARGS,
     "_fused_debug(legacy_phases, profile) -> per-phase cycle counters (-1 leaves a knob unchanged)"},
    {"_gelu_grad_kernels", gelu_grad_kernels, METH_VARARGS,
     "_gelu_grad_kernels(x, g, isa, in_place) -> (gelu(x), gelu'(x) (flat, padded), g * gelu'(x), column sums); tests"},
    {nullptr, nullptr, 0, nullptr}};

struct PyModuleDef slvit_cpu_module = {PyModuleDef_HEAD_INIT, "_C_cpu", "slvit_fast fused CPU kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C_cpu(void) { return PyModule_Create(&slvit_cpu_module); }
