/* eplb_client._fast: the end of an engine step in one call from Python into libeplb_client
 * (docs/python-client.md, "The step in one call").
 *
 * StepEnd(lib_path, region, counts, agree, slow, boundary)(step, phase="decode", tokens=0, moe_ns=0)
 * records step `step` from the engine's counts buffer and begins the boundary before step + 1
 * (eplb_step_end: eplb_record + eplb_boundary_begin under one lock), then calls the engine's
 * `agree`, and nothing else when no command is posted, which is nearly every step. It returns the
 * layer applied at that boundary, or -1.
 *
 * Everything that is not that common case goes back to Python, which owns the messages and the
 * checks: a call with other argument types or keywords, or one the library refuses, is handed
 * whole to `slow(step, phase, tokens, moe_ns)` (eplb_step_end checks everything before it
 * writes, so `slow` records it again or raises the error); a boundary with a command posted goes
 * to `boundary(step + 1)` (the two-phase boundary in Python, which begins it again: GPU address
 * checks, apply, log2phy). `agree`'s answer is checked by `check_agree`.
 *
 * Why a C extension and not ctypes: with the caches flushed by a forward pass, a ctypes call costs
 * 17-21 us on its own (argument conversion objects, libffi), more than this whole step; a
 * vectorcall into a C type costs about what a builtin's call does.
 *
 * The library is found by the path ctypes loaded it from (dlopen of the same path returns the
 * same handle), so both call into one copy with one region pointer. The GIL is held throughout:
 * every call takes microseconds. `detach()` (when the region is freed) makes every later call go
 * to `slow`, which raises. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>

#include "eplb_client.h"

typedef __typeof__(&eplb_step_end) step_end_fn;
typedef __typeof__(&eplb_abi_version) version_fn;

typedef struct {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  struct eplb_region *region; /* NULL once detached */
  step_end_fn step_end;
  void *dl;
  Py_buffer counts; /* the engine's [num_layers, count_cols] u64/i64 buffer, held */
  int have_counts;
  PyObject *agree; /* None or callable(have) -> (min, max) */
  PyObject *slow;
  PyObject *boundary;
  PyObject *check_agree;
  PyObject *phases[3]; /* "prefill", "decode", "mixed" */
  PyObject *zero;
  PyObject *weakrefs; /* the region's list of step ends to detach holds weak references */
} StepEnd;

/* Hands the whole call to `slow` (same arguments, keywords included). */
static PyObject *hand_over(StepEnd *s, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
  return PyObject_Vectorcall(s->slow, args, nargsf, kwnames);
}

/* A Python int in [0, 2^64) as *out; 0 on anything else (no exception left set). */
static int as_u64(PyObject *o, unsigned long long *out) {
  if (!PyLong_CheckExact(o)) return 0;
  unsigned long long v = PyLong_AsUnsignedLongLong(o);
  if (v == (unsigned long long)-1 && PyErr_Occurred()) {
    PyErr_Clear();
    return 0;
  }
  *out = v;
  return 1;
}

static PyObject *step_end_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
  StepEnd *s = (StepEnd *)self;
  Py_ssize_t n = PyVectorcall_NARGS(nargsf);
  unsigned long long step, tokens = 0, moe_ns = 0;
  uint32_t phase = EPLB_PHASE_DECODE;
  if (s->region == NULL || kwnames != NULL || n < 1 || n > 4 || !as_u64(args[0], &step))
    return hand_over(s, args, nargsf, kwnames);
  if (n > 1) {
    PyObject *p = args[1];
    phase = 0;
    for (uint32_t i = 0; i < 3; i++)
      if (p == s->phases[i]) phase = i + 1; /* the interned literal: one comparison */
    if (phase == 0 && PyUnicode_CheckExact(p))
      for (uint32_t i = 0; i < 3; i++)
        if (PyUnicode_Compare(p, s->phases[i]) == 0) phase = i + 1;
    if (phase == 0) return hand_over(s, args, nargsf, kwnames);
  }
  if ((n > 2 && !as_u64(args[2], &tokens)) || (n > 3 && !as_u64(args[3], &moe_ns)))
    return hand_over(s, args, nargsf, kwnames);
  const uint64_t *counts = (const uint64_t *)s->counts.buf;
  size_t num_counts = (size_t)(s->counts.len / 8);
  uint64_t have = 0, posted = 0;
  if (s->step_end(s->region, step, phase, counts, num_counts, tokens, moe_ns, &have, &posted) != EPLB_OK)
    return hand_over(s, args, nargsf, kwnames); /* nothing was written: Python records or raises */
  if (have != 0 || posted != 0) {
    PyObject *next = PyLong_FromUnsignedLongLong(step + 1);
    if (next == NULL) return NULL;
    PyObject *r = PyObject_CallOneArg(s->boundary, next);
    Py_DECREF(next);
    return r;
  }
  /* Nothing posted: this rank has nothing for the boundary, and whatever the other ranks have,
   * nothing is applied here. The engine's collective still runs (the other ranks wait in it). */
  if (s->agree != Py_None) {
    PyObject *r = PyObject_CallOneArg(s->agree, s->zero);
    if (r == NULL) return NULL;
    int ok = PyTuple_CheckExact(r) && PyTuple_GET_SIZE(r) == 2;
    for (Py_ssize_t i = 0; ok && i < 2; i++) {
      unsigned long long v;
      ok = as_u64(PyTuple_GET_ITEM(r, i), &v);
    }
    if (!ok) {
      PyObject *c = PyObject_CallOneArg(s->check_agree, r); /* raises, or accepts numpy integers */
      Py_DECREF(r);
      if (c == NULL) return NULL;
      Py_DECREF(c);
    } else {
      Py_DECREF(r);
    }
  }
  return PyLong_FromLong(-1);
}

static PyObject *step_end_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
  const char *path;
  unsigned long long region;
  PyObject *counts, *agree, *slow, *boundary, *check_agree;
  static char *names[] = {"lib_path", "region", "counts", "agree", "slow", "boundary", "check_agree", NULL};
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "sKOOOOO", names, &path, &region, &counts, &agree, &slow,
                                   &boundary, &check_agree))
    return NULL;
  if (region == 0) return PyErr_Format(PyExc_ValueError, "StepEnd: the region pointer is NULL");
  if (!PyCallable_Check(slow) || !PyCallable_Check(boundary) || !PyCallable_Check(check_agree) ||
      (agree != Py_None && !PyCallable_Check(agree)))
    return PyErr_Format(PyExc_TypeError, "StepEnd: agree (or None), slow, boundary and check_agree are callables");
  StepEnd *s = (StepEnd *)type->tp_alloc(type, 0);
  if (s == NULL) return NULL;
  s->vectorcall = step_end_call;
  if (PyObject_GetBuffer(counts, &s->counts, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
    Py_DECREF(s);
    return NULL;
  }
  s->have_counts = 1;
  const char *f = s->counts.format ? s->counts.format : "B";
  if (*f == '<' || *f == '=' || *f == '@') f++;
  if (s->counts.itemsize != 8 || (strcmp(f, "Q") && strcmp(f, "q") && strcmp(f, "L") && strcmp(f, "l"))) {
    PyErr_Format(PyExc_TypeError, "StepEnd: counts must be 64-bit integers (format %s, itemsize %zd)", f,
                 s->counts.itemsize);
    Py_DECREF(s);
    return NULL;
  }
  s->dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (s->dl == NULL) {
    PyErr_Format(PyExc_OSError, "StepEnd: %s", dlerror());
    Py_DECREF(s);
    return NULL;
  }
  version_fn version = (version_fn)dlsym(s->dl, "eplb_abi_version");
  s->step_end = (step_end_fn)dlsym(s->dl, "eplb_step_end");
  if (version == NULL || s->step_end == NULL) {
    PyErr_Format(PyExc_OSError, "StepEnd: %s lacks eplb_step_end", path);
    Py_DECREF(s);
    return NULL;
  }
  if (version() >> 16 != EPLB_VERSION) {
    PyErr_Format(PyExc_OSError, "StepEnd: %s speaks contract version %u, this module %d", path,
                 (unsigned)(version() >> 16), EPLB_VERSION);
    Py_DECREF(s);
    return NULL;
  }
  static const char *phase_names[3] = {"prefill", "decode", "mixed"};
  for (int i = 0; i < 3; i++) {
    s->phases[i] = PyUnicode_InternFromString(phase_names[i]);
    if (s->phases[i] == NULL) {
      Py_DECREF(s);
      return NULL;
    }
  }
  s->zero = PyLong_FromLong(0);
  s->region = (struct eplb_region *)(uintptr_t)region;
  Py_INCREF(agree);
  s->agree = agree;
  Py_INCREF(slow);
  s->slow = slow;
  Py_INCREF(boundary);
  s->boundary = boundary;
  Py_INCREF(check_agree);
  s->check_agree = check_agree;
  return (PyObject *)s;
}

static int step_end_traverse(StepEnd *s, visitproc visit, void *arg) {
  Py_VISIT(s->agree);
  Py_VISIT(s->slow);
  Py_VISIT(s->boundary);
  Py_VISIT(s->check_agree);
  return 0;
}

static int step_end_clear(StepEnd *s) {
  Py_CLEAR(s->agree);
  Py_CLEAR(s->slow);
  Py_CLEAR(s->boundary);
  Py_CLEAR(s->check_agree);
  return 0;
}

static void step_end_dealloc(StepEnd *s) {
  PyObject_GC_UnTrack(s);
  if (s->weakrefs != NULL) PyObject_ClearWeakRefs((PyObject *)s);
  step_end_clear(s);
  if (s->have_counts) PyBuffer_Release(&s->counts);
  for (int i = 0; i < 3; i++) Py_XDECREF(s->phases[i]);
  Py_XDECREF(s->zero);
  if (s->dl) dlclose(s->dl);
  Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *step_end_detach(StepEnd *s, PyObject *unused) {
  (void)unused;
  s->region = NULL;
  Py_RETURN_NONE;
}

static PyObject *step_end_attached(StepEnd *s, void *unused) {
  (void)unused;
  return PyBool_FromLong(s->region != NULL);
}

static PyMethodDef step_end_methods[] = {
    {"detach", (PyCFunction)step_end_detach, METH_NOARGS,
     "Every later call goes to slow (the region is being freed)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef step_end_getset[] = {
    {"attached", (getter)step_end_attached, NULL, "Calls go to the library (not detached).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject StepEndType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "eplb_client._fast.StepEnd",
    .tp_basicsize = sizeof(StepEnd),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "The end of an engine step (record + the next boundary) in one call into libeplb_client.",
    .tp_new = step_end_new,
    .tp_dealloc = (destructor)step_end_dealloc,
    .tp_traverse = (traverseproc)step_end_traverse,
    .tp_clear = (inquiry)step_end_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(StepEnd, vectorcall),
    .tp_weaklistoffset = offsetof(StepEnd, weakrefs),
    .tp_methods = step_end_methods,
    .tp_getset = step_end_getset,
};

static struct PyModuleDef fast_module = {
    PyModuleDef_HEAD_INIT, "eplb_client._fast",
    "The end of an engine step in one call into libeplb_client (see StepEnd).", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fast(void) {
  if (PyType_Ready(&StepEndType) < 0) return NULL;
  PyObject *m = PyModule_Create(&fast_module);
  if (m == NULL) return NULL;
  Py_INCREF(&StepEndType);
  if (PyModule_AddObject(m, "StepEnd", (PyObject *)&StepEndType) < 0) {
    Py_DECREF(&StepEndType);
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
