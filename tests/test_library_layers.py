"""The library below its tools: methods, models, runtime and the selection math import neither an entry point
(CLI, server, bench, evaluation, calibration, integrations) nor the bundled models nor the root package; and the
record of a prefill gives each sample's core neurons at any batch size."""

import ast
from pathlib import Path

import pytest
import torch

from corematching.runtime.records import SparsityRecord

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "corematching"
LIBRARY = ["methods", "models", "runtime", "selection.py", "neuron_rules.py"]
# Modules of the root package that run models or serve users: the library never imports them.
TOOLS = {"bench", "calibrate", "cli", "distributed", "evaluate", "flops", "integrations", "method_spec", "serve",
         "viz", "vqa", "zoo", "__main__"}


def library_files() -> list[Path]:
    files = []
    for entry in LIBRARY:
        path = PACKAGE / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def root_imports(path: Path) -> list[str]:
    """What a module imports from the root package: 'corematching' for the package itself, else the name of
    the root's module or subpackage (corematching.X), whatever the import's form."""
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for a module at the root
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name.split(".")[1] if "." in alias.name else alias.name
                      for alias in node.names if alias.name.split(".")[0] == "corematching"]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] == "corematching":
                parts = node.module.split(".")
                found += [parts[1]] if len(parts) > 1 else ["corematching"]
            elif node.level == depth + 1:  # relative to the root package
                found += [node.module.split(".")[0]] if node.module else ["corematching"]
    return found


@pytest.mark.parametrize("path", library_files(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_library_module_imports_no_tool_and_not_the_root_package(path):
    imported = root_imports(path)
    assert "corematching" not in imported, f"{path.name} imports the root package: import what it needs directly"
    assert not TOOLS & set(imported), f"{path.name} imports {sorted(TOOLS & set(imported))}"


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
