"""The export side (training, ONNX export, probe, familiarity, referral head, int8 and float16
copies), imported only on demand.

The repository keeps it in its top-level `export/` folder; a wheel installs that folder as the
package `cxrbatch_export` (a package named `export` would collide in users' site-packages). When
cxrbatch runs from a source checkout (an editable install or a clone on the path), the checkout's
`export/` is imported under that name instead, the way `models.default_models_dir` prefers the
checkout's models/, so a developer always runs the code they are editing. Nothing here imports
TensorFlow before a command needs it, and a missing extra is an `ExtraMissing` with the command
that installs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from cxrbatch.errors import ExtraMissing

PACKAGE = "cxrbatch_export"
INSTALL_HINT = 'pip install "cxrbatch[export]" (in a source checkout: pip install -e ".[export]")'
_KERAS = ("tensorflow", "keras")
# The third-party packages each module of the export side needs; all come with the `export` extra.
NEEDS: dict[str, tuple[str, ...]] = {
    "config": (),
    "augment": (),
    "training": _KERAS,
    "probe": _KERAS,
    "onnx_export": (*_KERAS, "tf2onnx", "onnx"),
    "quantize": ("onnx",),
    "half": ("onnx", "onnxconverter_common"),
    "familiarity": ("onnx",),
    "referral_head": ("onnx",),
}


def export_module(name: str) -> ModuleType:
    """Import `cxrbatch_export.<name>`, or raise ExtraMissing naming what to install."""
    missing = [package for package in NEEDS.get(name, _KERAS) if importlib.util.find_spec(package) is None]
    if missing:
        raise ExtraMissing(f"this command needs the export extra ({', '.join(missing)} not installed): {INSTALL_HINT}")
    _export_package()
    return importlib.import_module(f"{PACKAGE}.{name}")


def checkout_export() -> Path | None:
    """The `export/` folder of the source checkout cxrbatch runs from; None in an installed wheel."""
    root = Path(__file__).resolve().parent.parent
    folder = root / "export"
    return folder if (root / "pyproject.toml").is_file() and (folder / "__init__.py").is_file() else None


def _export_package() -> ModuleType:
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    folder = checkout_export()
    if folder is None:
        try:
            return importlib.import_module(PACKAGE)
        except ModuleNotFoundError:
            raise ExtraMissing(f"this cxrbatch has no {PACKAGE} package; reinstall it: {INSTALL_HINT}") from None
    spec = importlib.util.spec_from_file_location(
        PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None  # a file location always has a loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module
