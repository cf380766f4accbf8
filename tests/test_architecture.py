"""The package's structure: data flows one way through the stages, and modules keep their privates.

Stages, lowest first (README, "Architecture"): a module may import from its own stage or a lower one,
never from a higher one, and the import graph has no cycles (function-level imports included, so a
deferred import cannot hide one). No module reads another module's private names, and none is
longer than a file one can read in a sitting.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tf_influence"
MAX_LINES = 450

STAGES = [
    ("errors", "arguments", "files", "layers", "compiled"),
    ("data", "params", "losses", "output_losses", "loss_checks", "objective", "distribute", "traps", "normalization",
     "normalization_rules", "normalization_tf_keras"),
    ("problem",),
    ("curvature", "linalg"),
    ("operators",),
    ("solvers",),
    ("influence",),
    ("export", "diagnostics"),
    ("validation", "demo", "__main__", "cli_io", "__init__"),
]
# Private names of other libraries that have no public equivalent.
EXTERNAL_PRIVATE = {"_get_regularization_losses"}


def _modules():
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _stage(module):
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for rank, names in enumerate(STAGES):
        if top in names:
            return rank
    raise AssertionError(f"module {module} is in no stage; add it to STAGES in {__file__}")


def _imports(module, path, modules):
    """The tf_influence modules `module` imports, with the names it takes from them."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.startswith("tf_influence")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tf_influence"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append((submodule, None) if submodule in modules else (node.module, alias.name))
    return found


def test_every_import_goes_to_the_same_or_a_lower_stage():
    modules = _modules()
    upward = [f"{m} (stage {_stage(m)}) imports {target} (stage {_stage(target)})"
              for m, path in modules.items() for target, _ in _imports(m, path, modules)
              if _stage(target) > _stage(m)]
    assert not upward, "imports from a lower stage to a higher one:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycles():
    modules = _modules()
    graph = {m: {t for t, _ in _imports(m, p, modules) if t != m and t in modules} for m, p in modules.items()}
    # A package's __init__ imports its own submodules; a submodule importing its package is what would cycle.
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "active"
        for target in graph[node]:
            if state.get(target) == "active":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_reads_another_modules_private_names():
    modules = _modules()
    problems = []
    for module, path in modules.items():
        text = path.read_text()
        if "noqa: SLF001" in text:
            problems.append(f"{module}: a 'noqa: SLF001' private access")
        tree = ast.parse(text)
        problems += [f"{module}: imports {name} from {target}" for target, name in _imports(module, path, modules)
                     if name and name.startswith("_") and target != module]
        own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        own |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                and isinstance(n.ctx, ast.Store)}
        own |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and node.attr not in own and node.attr not in EXTERNAL_PRIVATE):
                problems.append(f"{module}:{node.lineno}: reads .{node.attr}, a private name defined elsewhere")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_readable_in_one_sitting(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines; split it (one concept per file)"
