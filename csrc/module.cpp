// The resnet_bk._C Python module is empty on purpose: importing it runs the static TORCH_LIBRARY
// registrations of the ops, which are then reached through torch.ops.resnet_bk.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "resnet_bk compiled ops (see torch.ops.resnet_bk)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
}
