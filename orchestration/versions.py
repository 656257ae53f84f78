"""Code versions derived from the code itself, so results rerun exactly when their code changes.

An asset's code version is a hash of the syntax trees (docstrings and comments excluded) of the module
defining it and of every ``core``/``assets`` module it reaches through its imports. Editing a formula
changes the version of every asset that depends on it; editing documentation changes nothing; modules
an asset never imports (plots, for a lens) do not touch it.
"""

import ast
import hashlib
import inspect
import sys
from types import ModuleType

OWN_PACKAGES = ("core", "assets")


def _own_module(obj: object) -> ModuleType | None:
    module = obj if isinstance(obj, ModuleType) else sys.modules.get(getattr(obj, "__module__", None) or "")
    if module is not None and module.__name__.split(".")[0] in OWN_PACKAGES:
        return module
    return None


def module_closure(module: ModuleType) -> list[ModuleType]:
    """``module`` and every project module reachable from its namespace, sorted by name."""
    seen: dict[str, ModuleType] = {}
    stack = [module]
    while stack:
        current = stack.pop()
        if current.__name__ in seen:
            continue
        seen[current.__name__] = current
        stack += [m for m in map(_own_module, vars(current).values()) if m is not None]
    return [seen[name] for name in sorted(seen)]


def _code_only(source: str) -> str:
    """The module's syntax tree without docstrings (comments are not in the tree)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def code_version(module: ModuleType) -> str:
    """Hash of the code (not the docs) of ``module`` and its project imports."""
    digest = hashlib.sha256()
    for m in module_closure(module):
        digest.update(m.__name__.encode())
        digest.update(_code_only(inspect.getsource(m)).encode())
    return digest.hexdigest()[:12]
