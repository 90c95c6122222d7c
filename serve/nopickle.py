"""Refuses code that could run what a peer sends: pickle and its relatives,
`torch.load` without `weights_only=True`, numpy loads that allow pickles, YAML
loads that build arbitrary objects, object collectives, eval and exec.

Everything that crosses a process or a host travels as frames (tensors) or
protobuf; this check keeps it so. `python -m serve.nopickle serve clients
loadtests` exits 1 and names each finding.

Calls are resolved through the module's imports, so `import torch as th;
th.load(p)`, `from torch import load`, `builtins.eval(s)` and
`importlib.import_module("pickle")` are found as well as the plain spellings.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

BANNED_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "pickle5",
    "dill",
    "cloudpickle",
    "jsonpickle",
    "marshal",
    "shelve",
    "joblib",
}
BANNED_CALLS = {
    "broadcast_object_list",
    "all_gather_object",
    "gather_object",
    "scatter_object_list",
    "send_object_list",
    "recv_object_list",
    "recv_pyobj",
    "send_pyobj",
    "read_pickle",
}
BANNED_BUILTINS = {"eval", "exec"}
# Loads that must say they are safe: qualified name -> the keyword that makes them so.
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
YAML_LOADS = {"yaml.load", "yaml.load_all"}
YAML_UNSAFE = {"yaml.unsafe_load", "yaml.unsafe_load_all"}
IMPORTERS = {"__import__", "importlib.import_module", "importlib.__import__"}
# Names a module uses without importing them in a snippet (the usual spellings).
DEFAULT_ALIASES = {
    "torch": "torch",
    "np": "numpy",
    "numpy": "numpy",
    "yaml": "yaml",
    "builtins": "builtins",
    "importlib": "importlib",
}


def _keyword_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def _call_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> qualified name, from the module's imports."""
    names = dict(DEFAULT_ALIASES)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    root = alias.name.split(".")[0]
                    names[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _qualified(func: ast.expr, names: dict[str, str]) -> str:
    """`th.serialization.load` -> `torch.serialization.load` (empty when unknown)."""
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return ""
    base = names.get(func.id, func.id)
    return ".".join([base, *reversed(parts)])


def _is_safe_yaml_loader(call: ast.Call) -> bool:
    for k in call.keywords:
        if k.arg == "Loader":
            return _call_name(k.value) in ("SafeLoader", "CSafeLoader", "BaseLoader")
    if len(call.args) >= 2:
        return _call_name(call.args[1]) in ("SafeLoader", "CSafeLoader", "BaseLoader")
    return False


def _imported_module(call: ast.Call) -> str:
    """The module an __import__/import_module call names, when it is a literal."""
    if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value
    return ""


def _check_call(call: ast.Call, names: dict[str, str]) -> str:
    """What is wrong with one call, or ''."""
    name = _call_name(call.func)
    qualified = _qualified(call.func, names)
    if isinstance(call.func, ast.Name) and name in BANNED_BUILTINS:
        return f"calls {name}()"
    if qualified in {f"builtins.{b}" for b in BANNED_BUILTINS}:
        return f"calls {qualified}()"
    if name in BANNED_CALLS:
        return f"calls {name}() (pickles objects)"
    if qualified in TORCH_LOADS and not _keyword_true(call, "weights_only"):
        return "torch.load without weights_only=True"
    if qualified == "numpy.load" and _keyword_true(call, "allow_pickle"):
        return "numpy load with allow_pickle=True"
    if qualified in YAML_UNSAFE or (qualified in YAML_LOADS and not _is_safe_yaml_loader(call)):
        return f"{qualified} can build arbitrary objects (use yaml.safe_load)"
    if qualified in IMPORTERS or name == "__import__":
        module = _imported_module(call)
        if module.split(".")[0] in BANNED_MODULES:
            return f"imports {module}"
    return ""


def check_source(source: str, filename: str = "<string>") -> list[str]:
    """Findings in one module, as 'file:line: message'."""
    findings: list[str] = []
    tree = ast.parse(source, filename)
    names = _aliases(tree)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in BANNED_MODULES:
                    findings.append(f"{where}: imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in BANNED_MODULES:
                findings.append(f"{where}: imports from {node.module}")
        elif isinstance(node, ast.Call):
            problem = _check_call(node, names)
            if problem:
                findings.append(f"{where}: {problem}")
    return findings


def check_paths(paths: Iterable[str | Path]) -> list[str]:
    findings: list[str] = []
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for path in files:
            findings.extend(check_source(path.read_text(encoding="utf-8"), str(path)))
    return findings


def main(argv: list[str] | None = None) -> int:
    paths = (argv if argv is not None else sys.argv[1:]) or ["serve", "clients", "loadtests"]
    findings = check_paths(paths)
    for f in findings:
        print(f)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
