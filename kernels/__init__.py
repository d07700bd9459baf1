"""winnow.kernels: PyTorch references and Triton/CuPy kernels (see the modules).

This folder sits at the checkout root under the generic name ``kernels``, which is also the PyPI package
(Hugging Face's kernel hub) that transformers >= 5.25 imports from ``modeling_utils``. Started from the
checkout root with the root on ``sys.path`` (``python -m ...``, ``python -c``, a notebook), ``import
kernels`` finds this folder first and transformers fails with ``cannot import name 'CUDAProperties'``.
Imported under that top-level name, this module steps aside: it loads the installed package from
``sys.path`` without the checkout root and puts it in its own place in ``sys.modules`` (the import system
returns whatever ``sys.modules`` holds once the module has run), or raises ``ModuleNotFoundError`` when
none is installed. Imported as ``winnow.kernels`` (the editable or wheel install), it does nothing.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (the checkout's kernels/ folder is winnow.kernels)", name="kernels"
        )
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _real
    _spec.loader.exec_module(_real)
