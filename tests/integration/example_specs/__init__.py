"""Per-method example workflow specs, collected by example_builder and test_example_workflows.

Each module here may define:
  SOCKETS   {node type: ([(input name, type)], [(output name, type)])} for the pack's node types it uses
  GRAPHS    {example name: callable(builder) -> UI workflow dict}; ``builder`` is the example_builder
            module (use its ``build``, ``build_patch`` and ``_assemble``)
  FOR_TEST  {node type: {input: value}} overrides that make the example fast on the tiny test models
  LOADERS   {loader node type: example file whose run writes the file the loader reads}
  ARCHS     {example name: [tiny archs it is run on]} (default: ["sd15", "flux"])
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path


def modules():
    here = Path(__file__).parent
    return [importlib.import_module(f"{__name__}.{m.name}") for m in sorted(pkgutil.iter_modules([str(here)]),
                                                                         key=lambda m: m.name)]


def collect(attr: str) -> dict:
    out = {}
    for m in modules():
        out.update(getattr(m, attr, {}))
    return out
