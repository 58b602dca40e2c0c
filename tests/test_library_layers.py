"""The library below its tools, as the folders show it: every root module of the package is classified (the
engine, the rest of the library, the bundled models, the tools in `apps/`), each imports only what its layer may
(the engine only the engine; the library neither a tool, nor the bundled models, nor the root package; nothing
outside `apps/` imports `apps`, except `__main__.py`); and the record of a prefill gives each sample's core neurons
at any batch size."""

import ast
from pathlib import Path

import pytest
import torch

from corematching.runtime.records import SparsityRecord

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "corematching"
ROOT = "corematching"  # what a module imports when it imports the root package itself (`import corematching as cm`)
# The engine: methods decide, adapters describe models, the runtime carries decisions out, the math selects.
ENGINE = {"methods", "models", "runtime", "selection", "neuron_rules", "errors"}
# The rest of the library: public helpers over the engine (cm.calibrate, cm.answer, plan_memory, FLOPs, layouts).
LIBRARY = ENGINE | {"calibrate", "flops", "layout", "plan", "processors", "stats", "vqa"}
BUNDLED = {"zoo"}  # the bundled models: weights, loading, data, training
APPS = "apps"  # every entry point and tool
# What each root module may import from the package (besides itself).
ALLOWED = {
    **{name: ENGINE for name in ENGINE},
    **{name: LIBRARY for name in LIBRARY - ENGINE},
    **{name: LIBRARY for name in BUNDLED},
    APPS: LIBRARY | BUNDLED | {ROOT},
    "__init__": LIBRARY | BUNDLED | {ROOT},  # the public names: the library and load_model, never a tool
    "__main__": {APPS},  # `python -m corematching` runs the CLI
}


def root_entries() -> list[str]:
    """The root package's modules and subpackages, by name (`plan` for plan.py, `apps` for apps/)."""
    return sorted([path.stem for path in PACKAGE.glob("*.py")]
                  + [path.parent.name for path in PACKAGE.glob("*/__init__.py")])


def layer_of(path: Path) -> str:
    """The root module or subpackage a file belongs to."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def root_imports(path: Path) -> list[str]:
    """What a module imports from the package: the root module or subpackage of each import (corematching.X ->
    X), or 'corematching' for the root package's own names, whatever the import's form (absolute or relative)."""
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for a module at the root
    entries = set(root_entries())

    def named(module: str, names: list[str]) -> list[str]:
        """`from corematching.<module> import <names>`, module "" for the root package."""
        if module:
            return [module.split(".")[0]]
        return [name if name in entries else ROOT for name in names]  # a submodule, else a name of the root

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == ROOT:
                    found += [parts[1]] if len(parts) > 1 else [ROOT]
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level == 0 and (node.module or "").split(".")[0] == ROOT:
                found += named(node.module.partition(".")[2], names)
            elif node.level == depth + 1:  # relative to the root package
                found += named(node.module or "", names)
    return found


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_root_module_is_classified():
    """A new module at the root must be put in a layer here (or in apps/, when it is a tool)."""
    unknown = sorted(set(root_entries()) - set(ALLOWED))
    assert not unknown, (f"corematching/{unknown} is neither library, bundled models nor apps: move a tool into "
                         "apps/, or add a library module to LIBRARY in this test")
    missing = sorted(set(ALLOWED) - set(root_entries()))
    assert not missing, f"classified but missing: {missing}"


@pytest.mark.parametrize("path", package_files(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_module_imports_only_its_layer(path):
    layer = layer_of(path)
    forbidden = sorted(set(root_imports(path)) - ALLOWED.get(layer, set()) - {layer})
    name = path.relative_to(PACKAGE)
    assert APPS not in forbidden, f"{name} imports {APPS}/: only the tools and __main__.py may"
    assert ROOT not in forbidden, f"{name} imports the root package: import what it needs directly"
    assert not forbidden, f"{name} ({layer}) imports {forbidden}, outside what its layer may import"


def record(batch_size: int) -> SparsityRecord:
    visual = torch.zeros(batch_size, 4, dtype=torch.bool)
    visual[0, 1:3] = True  # only the first sample has visual tokens: the others decode densely
    neurons = {2: torch.arange(3 * batch_size).view(batch_size, 3), 5: torch.arange(batch_size).view(batch_size, 1)}
    return SparsityRecord("CoreMatching", 1, torch.ones(batch_size, 4, dtype=torch.bool), visual, neurons)


def test_core_neurons_of_gives_each_sample_its_one_dimensional_sets_at_any_batch_size():
    single, batched = record(1), record(3)
    assert {layer: value.tolist() for layer, value in single.core_neurons_of(0).items()} == {2: [0, 1, 2], 5: [0]}
    assert {layer: value.tolist() for layer, value in batched.core_neurons_of(0).items()} == {2: [0, 1, 2], 5: [0]}
    assert batched.core_neurons_of(2) == {}  # no visual tokens: dense decoding
    with pytest.raises(IndexError, match="sample 3 is out of range: the batch has 3 samples"):
        batched.core_neurons_of(3)


def test_core_neurons_keeps_its_documented_shapes():
    assert all(value.dim() == 1 for value in record(1).core_neurons.values())  # the public contract at batch 1
    assert [tuple(value.shape) for value in record(3).core_neurons.values()] == [(3, 3), (3, 1)]
