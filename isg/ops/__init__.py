"""Faces of the native kernels.

Each op follows one pattern (after pytorch/extension-cpp and stylegan2-ada's
``torch_utils/ops``):

* a pure-PyTorch reference (``*_reference``) that is the test oracle and the
  fallback when ``isg._C`` or its CUDA part is missing;
* a ``torch.library.custom_op`` in the ``isg`` namespace that calls the native
  C++ (CPU) or CUDA function on raw pointers with the GIL released, plus its
  fake (meta) and autograd registrations, so the op works under
  ``torch.compile`` and passes ``torch.library.opcheck``; every face launches
  through :func:`isg.ops.native.call` (``isg._C.<op>_cpu`` / ``<op>_cuda``);
* a public function that picks the native op when it is available for the
  input's device, else the reference (with a warning, once, that says why).
"""
