"""Import paths that moved in 0.2 (the perf/, parallel/ and cli/ packages), kept importable for one release.

Importing an old path returns the new module itself (one module object: state and monkeypatching are shared)
and warns once with a DeprecationWarning naming the new path. An import hook, not stub files, so that no package
file imports upward (tests/test_layering.py). Remove this file and its installation in __init__.py in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED: dict[str, str] = {
    "lavin_fast.ops.sass_model": "lavin_fast.perf.sass_model",
    "lavin_fast.ops.perf_anchors": "lavin_fast.perf.anchors",
    "lavin_fast.ops.perf_baseline": "lavin_fast.perf.baseline",
    "lavin_fast.ops.csrc_report": "lavin_fast.perf.csrc_report",
    "lavin_fast.ops.kernel_report": "lavin_fast.perf.kernel_report",
    "lavin_fast.ops.kernels_cli": "lavin_fast.cli.kernels",
    "lavin_fast.train.distributed": "lavin_fast.parallel.distributed",
    "lavin_fast.train.context_parallel": "lavin_fast.parallel.context_parallel",
    "lavin_fast.train.cp_attention": "lavin_fast.parallel.cp_attention",
    "lavin_fast.train.cli": "lavin_fast.cli.train",
    "lavin_fast.flow.cli": "lavin_fast.cli.sample",
    "lavin_fast.data.cli": "lavin_fast.cli.data",
    "lavin_fast.eval.cli": "lavin_fast.cli.eval",
    "lavin_fast.cli_args": "lavin_fast.cli.args",
    "lavin_fast.info": "lavin_fast.cli.info",
    "lavin_fast.demo": "lavin_fast.cli.demo",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module) -> None:  # already executed; importlib replaced its __spec__: put it back
        module.__spec__ = self.spec


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; the old path goes away in lavin-fast 0.3",
                      DeprecationWarning, stacklevel=3)  # fmt: skip
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())  # before the path finders: an old path is never a file
