"""The names (and fixed choices) of SGLang's `ServerArgs` fields, read from SGLang's source with `ast`.

Importing `sglang.srt.server_args` needs torch, CUDA libraries and more; parsing the files needs
only the installed wheel (`pip install --no-deps sglang==<pin>` is enough). Two layouts are read:
the one where `ServerArgs` is assembled from namespace classes listed in `_INPUT_NAMESPACES`
(sglang >= 0.5.2x, fields in `srt/arg_groups/fields/*.py`) and the older single dataclass.
"""

from __future__ import annotations

import ast
import importlib.machinery
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class ServerArgField:
    name: str
    cli_flag: str  # "--mem-fraction-static"
    choices: tuple[object, ...] | None  # None when SGLang declares none, or builds them at run time
    is_bool: bool


def sglang_root() -> Path | None:
    """Directory of the installed `sglang` package, found without importing it."""
    try:  # PathFinder looks at sys.path only, not at an already imported (or stand-in) module
        spec = importlib.machinery.PathFinder.find_spec("sglang")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def sglang_version(root: Path) -> str | None:
    """`__version__` from sglang/_version.py (written at build time), parsed, not imported."""
    for name in ("_version.py", "version.py"):  # _version.py holds the real one
        path = root / name
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = node.targets if isinstance(node, ast.Assign) else []
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and any(isinstance(t, ast.Name) and t.id in ("__version__", "version") for t in names)
            ):
                return str(node.value.value)
    return None


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _constant_lists(tree: ast.Module) -> dict[str, tuple[object, ...]]:
    """Module-level `NAME = [literal, ...]` assignments (choice lists)."""
    out: dict[str, tuple[object, ...]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.List, ast.Tuple)):
            try:
                values = tuple(ast.literal_eval(node.value))
            except ValueError:
                continue
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = values
    return out


def _is_classvar(annotation: ast.expr) -> bool:
    node = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    return (isinstance(node, ast.Name) and node.id == "ClassVar") or (
        isinstance(node, ast.Attribute) and node.attr == "ClassVar"
    )


def _annotation_parts(annotation: ast.expr) -> tuple[ast.expr, ast.Call | None]:
    """(type, Arg(...) call or None) from `A[T, Arg(...)]` / `Annotated[T, ...]` / plain `T`."""
    if isinstance(annotation, ast.Subscript):
        head = annotation.value
        head_name = head.id if isinstance(head, ast.Name) else getattr(head, "attr", "")
        if head_name in ("A", "Annotated") and isinstance(annotation.slice, ast.Tuple):
            elts = annotation.slice.elts
            meta = next((e for e in elts[1:] if isinstance(e, ast.Call)), None)
            return elts[0], meta
    return annotation, None


def _is_bool(type_node: ast.expr) -> bool:
    src = ast.unparse(type_node)
    return src in ("bool", "Optional[bool]", "bool | None")


def _field(stmt: ast.AnnAssign, lists: dict[str, tuple[object, ...]]) -> ServerArgField:
    name = stmt.target.id  # type: ignore[union-attr]
    type_node, meta = _annotation_parts(stmt.annotation)
    cli_flag = "--" + name.replace("_", "-")
    choices: tuple[object, ...] | None = None
    for kw in meta.keywords if meta else ():
        if kw.arg == "cli_name" and isinstance(kw.value, ast.Constant):
            cli_flag = str(kw.value.value)
        elif kw.arg == "choices":
            if isinstance(kw.value, (ast.List, ast.Tuple)):
                try:
                    choices = tuple(ast.literal_eval(kw.value))
                except ValueError:
                    choices = None
            elif isinstance(kw.value, ast.Name):
                choices = lists.get(kw.value.id)
    return ServerArgField(name, cli_flag, choices, _is_bool(type_node))


def _class_fields(tree: ast.Module, class_name: str, lists: dict) -> list[ServerArgField]:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return [
                _field(s, lists)
                for s in node.body
                if isinstance(s, ast.AnnAssign)
                and isinstance(s.target, ast.Name)
                and not _is_classvar(s.annotation)
            ]
    raise LookupError(f"class {class_name} not found")


def _namespace_imports(tree: ast.Module) -> dict[str, str]:
    """Imported name -> module for `from sglang.srt.arg_groups.fields.X import (Name, ...)`."""
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                out[alias.asname or alias.name] = node.module
    return out


def _module_path(root: Path, module: str) -> Path:
    parts = module.split(".")
    if parts[0] != "sglang":
        raise LookupError(f"namespace class imported from outside sglang: {module}")
    base = root.joinpath(*parts[1:])
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


@lru_cache(maxsize=4)
def server_arg_fields(root: Path | None = None) -> dict[str, ServerArgField]:
    """Every `ServerArgs` field of the SGLang installed at `root` (default: the importable one).

    Raises LookupError when SGLang is not installed or its layout is not one this reader knows."""
    root = root or sglang_root()
    if root is None:
        raise LookupError("sglang is not installed; pip install --no-deps sglang==<pin from pyproject.toml>")
    path = root / "srt" / "server_args.py"
    if not path.is_file():
        raise LookupError(f"{path} not found: is {root} an SGLang package?")
    tree = _parse(path)
    choices_path = root / "srt" / "arg_groups" / "choices.py"
    lists = _constant_lists(_parse(choices_path)) if choices_path.is_file() else {}
    lists.update(_constant_lists(tree))
    fields = {f.name: f for f in _class_fields(tree, "ServerArgs", lists)}
    namespaces = _input_namespaces(tree)
    imports = _namespace_imports(tree)
    for cls in namespaces:
        if cls not in imports:
            raise LookupError(f"{path}: namespace {cls} in _INPUT_NAMESPACES is not imported by name")
        ns_path = _module_path(root, imports[cls])
        ns_tree = _parse(ns_path)
        ns_lists = {**lists, **_constant_lists(ns_tree)}
        for f in _class_fields(ns_tree, cls, ns_lists):
            fields[f.name] = f
    if not fields:
        raise LookupError(f"{path}: no ServerArgs fields found; the reader needs updating for this layout")
    return fields


def _input_namespaces(tree: ast.Module) -> list[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_INPUT_NAMESPACES" for t in node.targets
        ):
            if not isinstance(node.value, (ast.List, ast.Tuple)):
                raise LookupError("_INPUT_NAMESPACES is not a literal list")
            return [e.id for e in node.value.elts if isinstance(e, ast.Name)]
    return []  # older layout: every field is declared on ServerArgs itself


def class_field_names(path: Path, class_name: str) -> set[str]:
    """Annotated attribute names of a class in a source file (msgspec Structs, dataclasses)."""
    return {f.name for f in _class_fields(_parse(path), class_name, {})}


def method_params(path: Path, class_name: str, method: str) -> tuple[set[str], bool]:
    """(parameter names, accepts **kwargs) of `class_name.method` in a source file."""
    for node in _parse(path).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for fn in node.body:
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name == method:
                    a = fn.args
                    names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs} - {"self"}
                    return names, a.kwarg is not None
    raise LookupError(f"{path}: {class_name}.{method} not found")
