"""Code versions derived from what an asset computes, so results rerun exactly when their code changes.

Granularity: functions, not modules. An asset's code version hashes its compute function and, transitively,
every project function, class and module-level constant (packages ``core``, ``assets``, ``orchestration``)
that hashed code names. A name or ``module.attribute`` in a body, a default, a helper's decorator or an
annotation (annotations are how methods called on a typed argument are reached) is resolved statically:
through the defining module's top-level bindings and its ``from X import Y`` / ``import X`` lines, with the
names local to a function or comprehension (arguments, assignments) shadowing the module's, as in Python.
A class is hashed whole (every method and field), a constant as the statement(s) binding it (so a dict of
functions reaches every function in it; ``claims_report`` reads ``core.report.plots.PLOT_FILES``, the file names
alone, and so no plot's drawing code). The pieces are hashed in sorted order under module-relative
names, so a version is deterministic and the same in every checkout. Editing a helper changes only the
assets that reach it; editing a module an asset imports for something else does not. Not seen (and so not
hashed): module-level statements that bind no name (``matplotlib.use``), what is reached only through
``getattr`` or a module object handed around, and data files such as ``core/releases.yaml`` (the registry:
a new release adds partitions, it does not change the code that computes the old ones).

What is hashed of each piece: its syntax tree without docstrings (nor any other bare string statement),
comments, the decorators of the asset function itself (graph wiring, which Dagster tracks separately), the
text of error messages (string and f-string arguments of ``raise X(...)`` and ``assert`` messages; the
exception type stays) — none of which changes a result. Compute functions built by a factory (the plot
assets) add what their closure captured: captured functions are followed, literals (file names) hashed.

The native kernel: a string literal in hashed code that names a C/C++ source beside its module
(``SOURCE = Path(__file__).with_name("rowstats.cpp")`` in ``core.compute.rowstats``, read by ``build``, which
compiles it) adds that file's full text — comments included, as the compiled library is keyed by the same
text. It reaches ``lens_tables`` and ``circuit_tables`` (``core.compute.engine.row_stats``), no other asset.

Settings: a resource argument (a ``dg.ConfigurableResource`` subclass in an annotation) is hashed member by
member — only the fields and methods the code reads (``compute.top_k``, ``compute.engine()`` and through it
``self.dtype``...), fields as their declaration with its *default* value; a resource handed on as a whole
counts all its members. So ``ComputeResource.null_directions`` enters ``lens_tables`` only,
``circuit_layers`` ``circuit_tables`` only. :data:`NEUTRAL_SETTINGS` are left out: ``device`` (CPU and GPU
agree to float rounding; the float32/bfloat16 choice, ``dtype``, is hashed) and the hub/store locations.
A code version is static, so a run with settings other than the defaults is told apart by what Dagster and
the CLI record with it — its run config (the launchpad's resource config), the run tag
``weightlens/settings`` (``orchestration.cli``), the assets' metadata (``lens_tables``: ``dtype``,
``device``) — not by its version. Another mechanism was not needed: a data version that included the
settings would have to be returned by every asset, and code versions are what ``code_version_changed()``
automation and Dagster's staleness read.
"""

import ast
import hashlib
import importlib
import importlib.util
import inspect
import textwrap
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import dagster as dg

OWN_PACKAGES = ("core", "assets", "orchestration")
NATIVE_SUFFIXES = (".c", ".cc", ".cpp", ".cu", ".h")
NEUTRAL_SETTINGS = frozenset(
    {
        "ComputeResource.device",
        "HubResource.cache_dir",
        "HubResource.offline",
        "HubResource.planted_cache_dir",
        "StoreResource.data_dir",
    }
)
LITERALS = (str, bytes, int, float, bool, type(None))
ROOT = Path(__file__).resolve().parents[1]
COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, *COMPREHENSIONS)

Ref = tuple[str, str]  # (module, qualified name): "ComputeResource.top_k" for a resource member


def _own(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in OWN_PACKAGES


@cache
def _is_module(name: str) -> bool:
    parent, _, _ = name.rpartition(".")
    return hasattr(importlib.import_module(parent), "__path__") and importlib.util.find_spec(name) is not None


@cache
def _file(module: str) -> Path:
    return Path(inspect.getfile(importlib.import_module(module)))


@cache
def _bindings(module: str) -> dict[str, list[ast.stmt]]:
    """The top-level statements of ``module`` binding each name."""
    found: dict[str, list[ast.stmt]] = {}
    for stmt in ast.parse(_file(module).read_text()).body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [stmt.name]
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            names = [a.asname or a.name.split(".")[0] for a in stmt.names]
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        else:
            continue
        for name in names:
            found.setdefault(name, []).append(stmt)
    return found


@cache
def _resolve_name(module: str, name: str) -> Ref | None:
    """What ``name`` in ``module`` denotes: (defining module, name), (project module, "") or None (outside the
    project, a builtin or a local)."""
    for stmt in _bindings(module).get(name, []):
        if isinstance(stmt, ast.ImportFrom):
            original = next(a.name for a in stmt.names if (a.asname or a.name) == name)
            if not _own(stmt.module):
                return None
            target = f"{stmt.module}.{original}"
            return (target, "") if _is_module(target) else _resolve_name(stmt.module, original)
        if isinstance(stmt, ast.Import):
            alias = next(a for a in stmt.names if (a.asname or a.name.split(".")[0]) == name)
            target = alias.name if alias.asname else name
            return (target, "") if _own(target) else None
        return module, name
    return None


def _resolve(module: str, expr: ast.expr) -> Ref | None:
    """A name or a ``module.attribute`` chain, resolved."""
    if isinstance(expr, ast.Name):
        return _resolve_name(module, expr.id)
    if isinstance(expr, ast.Attribute) and (base := _resolve(module, expr.value)) and base[1] == "":
        submodule = f"{base[0]}.{expr.attr}"
        return (submodule, "") if _is_module(submodule) else _resolve_name(base[0], expr.attr)
    return None


def _resource(ref: Ref | None) -> type | None:
    """The resource class ``ref`` names, if it names one."""
    if ref is None or not ref[1] or "." in ref[1]:
        return None
    obj = getattr(importlib.import_module(ref[0]), ref[1], None)
    return obj if isinstance(obj, type) and issubclass(obj, dg.ConfigurableResource) else None


def _code_only(trees: list[ast.AST]) -> list[ast.AST]:
    """The trees without what cannot change a result, in place: bare string statements (docstrings) and the
    text of error messages (string and f-string arguments of ``raise X(...)``, ``assert`` messages)."""
    for node in (n for tree in trees for n in ast.walk(tree)):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if isinstance(body, list) and any(map(_is_string_statement, body)):
                setattr(node, field, [s for s in body if not _is_string_statement(s)] or [ast.Pass()])
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            node.exc.args = [ast.Constant("") if _is_text(a) else a for a in node.exc.args]
            for keyword in node.exc.keywords:
                keyword.value = ast.Constant("") if _is_text(keyword.value) else keyword.value
        elif isinstance(node, ast.Assert):
            node.msg = None
    return trees


def _is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def _is_string_statement(stmt: ast.AST) -> bool:
    return isinstance(stmt, ast.Expr) and _is_text(stmt.value)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _bound(scope: ast.AST) -> set[str]:
    """The names local to a function or comprehension: arguments and what its own body binds (not the bodies
    of the functions, classes and comprehensions nested in it), less those it declares ``global``."""
    if isinstance(scope, COMPREHENSIONS):
        return {n.id for g in scope.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}
    args = scope.args
    names = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg] if a}
    declared_global: set[str] = set()
    stack = list(scope.body) if isinstance(scope.body, list) else [scope.body]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        if isinstance(node, (ast.Lambda, *COMPREHENSIONS)):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(a.asname or a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.Global):
            declared_global.update(node.names)
        stack.extend(ast.iter_child_nodes(node))
    return names - declared_global


def _scoped(tree: ast.AST) -> Iterator[tuple[ast.AST, frozenset[str]]]:
    """Every node of ``tree`` with the names local to the scopes around it, which shadow the module's (a
    parameter ``circuit_stats`` is not the function ``core.lens.circuits.circuit_stats``)."""
    stack: list[tuple[ast.AST, frozenset[str]]] = [(tree, frozenset())]
    while stack:
        node, local = stack.pop()
        if isinstance(node, SCOPES):
            local = local | _bound(node)
        yield node, local
        stack.extend((child, local) for child in ast.iter_child_nodes(node))


def _chain_root(expr: ast.expr) -> ast.expr:
    while isinstance(expr, ast.Attribute):
        expr = expr.value
    return expr


def _analyse(module: str, trees: list[ast.AST], self_class: Ref | None = None) -> tuple[str, tuple[Ref, ...]]:
    """Digest of normalised syntax trees of ``module`` and the project code, resource members and native
    sources (``("file", path)``) they name. ``self_class``: the resource class whose member the trees are."""
    nodes = [pair for tree in _code_only(trees) for pair in _scoped(tree)]
    typed = {"self": self_class} if self_class else {}  # argument name -> resource class
    for arg in (n for n, _ in nodes if isinstance(n, ast.arg) and n.annotation is not None):
        if _resource(ref := _resolve(module, arg.annotation)):
            typed[arg.arg] = ref
    bases = {id(n.value) for n, _ in nodes if isinstance(n, ast.Attribute)}
    refs: set[Ref] = set()
    for node, local in nodes:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in typed:
            cls = typed[node.value.id]
            refs.add((cls[0], f"{cls[1]}.{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in typed and isinstance(node.ctx, ast.Load):
            if id(node) not in bases:  # a resource handed on whole: every member counts
                refs.update(_members(typed[node.id]))
        elif isinstance(node, (ast.Name, ast.Attribute)):
            root = _chain_root(node)
            if isinstance(root, ast.Name) and isinstance(root.ctx, ast.Load) and root.id not in local:
                ref = _resolve(module, node)
                if ref and ref[1] and not _resource(ref):
                    refs.add(ref)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(NATIVE_SUFFIXES):
            if (path := _file(module).parent / node.value).is_file():
                refs.add(("file", path.resolve().relative_to(ROOT).as_posix()))
    return _digest("\n".join(map(ast.dump, trees))), tuple(sorted(refs))


def _member_name(stmt: ast.stmt) -> str | None:
    return getattr(stmt, "name", None) or getattr(getattr(stmt, "target", None), "id", None)


def _class_body(cls: Ref) -> list[ast.stmt]:
    return next(s for s in _bindings(cls[0])[cls[1]] if isinstance(s, ast.ClassDef)).body


def _members(cls: Ref) -> set[Ref]:
    return {(cls[0], f"{cls[1]}.{name}") for name in map(_member_name, _class_body(cls)) if name}


@cache
def _node(module: str, name: str) -> tuple[str, tuple[Ref, ...]] | None:
    """Digest and references of what ``name`` names in ``module`` (a native source's text for ``"file"``);
    None for a neutral setting or a member the class inherits."""
    if module == "file":
        return _digest((ROOT / name).read_text()), ()
    if "." not in name:
        return _analyse(module, [s for s in _bindings(module)[name] if not isinstance(s, (ast.Import, ast.ImportFrom))])
    cls_name, member = name.split(".")  # a resource member: a field declaration or a method
    stmts = [s for s in _class_body((module, cls_name)) if _member_name(s) == member]
    return _analyse(module, stmts, self_class=(module, cls_name)) if stmts and name not in NEUTRAL_SETTINGS else None


def _function_node(fn: Callable, root: bool) -> tuple[str, tuple[Ref, ...], list[Callable]]:
    """A function object's digest (its code without its decorators when it is the asset's own, and the
    literals its closure captured: a factory's arguments), references and captured project functions."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    if root:
        tree.decorator_list = []
    captured = [cell.cell_contents for cell in fn.__closure__ or ()]
    functions = [c for c in captured if inspect.isfunction(c) and _own(c.__module__)]
    literals = [c for c in captured if not any(c is f for f in functions)]
    if not all(map(_is_literal, literals)):
        raise TypeError(f"{fn.__qualname__} captures a value without a stable text: {literals!r}")
    digest, refs = _analyse(fn.__module__, [tree])
    return _digest(digest + repr(literals)), refs, functions


def _is_literal(value: object) -> bool:
    return isinstance(value, LITERALS) or (isinstance(value, tuple) and all(map(_is_literal, value)))


def dependencies(fn: Callable) -> dict[str, str]:
    """Every piece of code (``module:name``) and native source (``file:path``) that the compute function ``fn``
    reaches, with the digest of what is hashed of it, sorted by key."""
    digests: dict[str, str] = {}
    pending: list[Ref] = []
    functions = [fn]
    while functions:
        current = functions.pop()
        key = f"{current.__module__}:{current.__qualname__}"
        if key not in digests:
            digests[key], refs, captured = _function_node(current, root=current is fn)
            pending += refs
            functions += captured
    while pending:
        ref = pending.pop()
        if f"{ref[0]}:{ref[1]}" not in digests and (node := _node(*ref)) is not None:
            digests[f"{ref[0]}:{ref[1]}"] = node[0]
            pending += node[1]
    return dict(sorted(digests.items()))


def code_version(fn: Callable) -> str:
    """Hash of the code (not the docs, not the error messages) that the compute function ``fn`` reaches and of
    the default value of every result-changing setting it reads."""
    return _digest("".join(f"{key}\0{digest}\0" for key, digest in dependencies(fn).items()))[:12]
