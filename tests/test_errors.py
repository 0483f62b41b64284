"""One error tree: every exception class the package defines lives in shadowvmm.errors and
derives from ShadowVmmError, and the package raises no bare builtin exception."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import shadowvmm
from shadowvmm import errors

PACKAGE = Path(shadowvmm.__file__).parent
BUILTIN = {"ValueError", "TypeError", "KeyError", "IndexError", "RuntimeError", "OSError", "OverflowError",
           "LookupError", "Exception", "IOError", "EnvironmentError"}
#: Test harnesses signal a broken invariant the way pytest expects.
ALLOWED_CLASSES = {("testing/chaos.py", "Violation")}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(), str(path))


def test_every_error_in_errors_py_derives_from_the_root() -> None:
    classes = [obj for _, obj in inspect.getmembers(errors, inspect.isclass)
               if issubclass(obj, BaseException) and obj.__module__ == errors.__name__]
    assert len(classes) > 30
    assert all(issubclass(cls, errors.ShadowVmmError) for cls in classes), \
        [cls.__name__ for cls in classes if not issubclass(cls, errors.ShadowVmmError)]


def test_no_exception_class_outside_errors_py() -> None:
    found = []
    for name, tree in modules():
        if name == "errors.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and (name, node.name) not in ALLOWED_CLASSES:
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if any(b.endswith(("Error", "Exception")) or b in BUILTIN for b in bases):
                    found.append(f"{name}:{node.lineno} {node.name}")
    assert not found, found


#: The container protocols' own errors, raised where the protocol asks for them.
PROTOCOL_RAISES = {"__getitem__": {"KeyError", "IndexError"}, "__next__": {"StopIteration"},
                   "__getattr__": {"AttributeError"}}


def test_no_builtin_exception_raised() -> None:
    found = []
    for name, tree in modules():
        allowed: dict[int, set[str]] = {}
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and fn.name in PROTOCOL_RAISES:
                for inner in ast.walk(fn):
                    allowed[id(inner)] = PROTOCOL_RAISES[fn.name]
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                if isinstance(func, ast.Name) and func.id in BUILTIN \
                        and func.id not in allowed.get(id(node), set()):
                    found.append(f"{name}:{node.lineno} {func.id}")
    assert not found, found
