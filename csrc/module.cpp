// `import dynasparse._C` loads this library, whose static initializers register the
// ops with the torch dispatcher; the Python module itself is intentionally empty.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
