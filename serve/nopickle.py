"""Refuses code that could run what a peer sends: pickle and its relatives,
`torch.load` without `weights_only=True`, object collectives, eval and exec.

Everything that crosses a process or a host travels as frames (tensors) or
protobuf; this check keeps it so. `python -m serve.nopickle serve clients
loadtests` exits 1 and names each finding.
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
    "dill",
    "cloudpickle",
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
}
BANNED_BUILTINS = {"eval", "exec"}


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


def check_source(source: str, filename: str = "<string>") -> list[str]:
    """Findings in one module, as 'file:line: message'."""
    findings: list[str] = []
    tree = ast.parse(source, filename)
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
            name = _call_name(node.func)
            if isinstance(node.func, ast.Name) and name in BANNED_BUILTINS:
                findings.append(f"{where}: calls {name}()")
            elif name in BANNED_CALLS:
                findings.append(f"{where}: calls {name}() (pickles objects)")
            elif name == "load" and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                owner_name = owner.id if isinstance(owner, ast.Name) else ""
                if owner_name == "torch" and not _keyword_true(node, "weights_only"):
                    findings.append(f"{where}: torch.load without weights_only=True")
                if owner_name in ("np", "numpy") and _keyword_true(node, "allow_pickle"):
                    findings.append(f"{where}: numpy load with allow_pickle=True")
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
