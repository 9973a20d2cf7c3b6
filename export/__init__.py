"""The Keras side of cxrbatch: training, ONNX export, the source probe, int8 and float16 copies.

The repository keeps it in `export/`; a wheel installs it as the package `cxrbatch_export`, and
`cxrbatch.extras.export_module` imports it (from the checkout's `export/` when cxrbatch runs from
a source checkout). Its modules import each other relatively, so they work under either name.
Only this side imports TensorFlow; it needs the `export` extra.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before any module here imports TensorFlow
