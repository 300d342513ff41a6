"""bnpy/_core.pyi describes the extension as it is: same names, same parameters."""

import ast
import inspect
from pathlib import Path

import bnpy
from bnpy import _core

STUBS = ast.parse((Path(bnpy.__file__).parent / "_core.pyi").read_text())


def _stub_functions(body):
    return {node.name: node for node in body if isinstance(node, ast.FunctionDef)}


def _stub_parameters(node):
    args = node.args
    return [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]


def test_package_ships_the_stubs_and_py_typed():
    package = Path(bnpy.__file__).parent
    assert (package / "_core.pyi").is_file() and (package / "py.typed").is_file()


def test_stubbed_functions_match_the_extension():
    stubbed = {
        name: node for name, node in _stub_functions(STUBS.body).items() if not name.startswith("_")
    }
    public = {n for n in dir(_core) if not n.startswith("_") and callable(getattr(_core, n))}
    classes = {node.name for node in STUBS.body if isinstance(node, ast.ClassDef)}
    assert set(stubbed) | classes == public
    for name, node in stubbed.items():
        runtime = list(inspect.signature(getattr(_core, name)).parameters)
        assert _stub_parameters(node) == runtime, name


def test_stubbed_class_matches_batchnorm():
    cls = next(n for n in STUBS.body if isinstance(n, ast.ClassDef) and n.name == "BatchNorm")
    methods = _stub_functions(cls.body)
    attributes = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    runtime = {n for n in dir(bnpy.BatchNorm) if not n.startswith("_")}
    stubbed = {n for n in set(methods) | attributes if not n.startswith("_")}
    assert stubbed == runtime
    assert _stub_parameters(methods["__init__"])[1:] == list(
        inspect.signature(bnpy.BatchNorm).parameters
    )
    for name, node in methods.items():
        if name not in ("__init__", "__call__") and not node.decorator_list:  # not properties
            runtime = list(inspect.signature(getattr(bnpy.BatchNorm, name)).parameters)
            assert _stub_parameters(node) == runtime, name
