"""No pickle anywhere in the package (DESIGN: no pickle on a load path; JSON or msgpack).

An AST walk over every module of ``ragserve/``: a new ``import pickle``, a ``np.load``
that may unpickle, or a ``torch.load`` that may, fails CI with the file and line.
"""

import ast
from pathlib import Path

import ragserve

PACKAGE = Path(ragserve.__file__).parent
# Modules that (un)pickle, or load formats that embed pickles.
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "copyreg"}
BANNED_CALLS = {"read_pickle", "to_pickle"}  # pandas and friends


def _violations(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            kwargs = {k.arg: k.value for k in node.keywords}
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            if node.func.attr in BANNED_CALLS:
                found.append(f"{where}: {node.func.attr}()")
            elif node.func.attr == "load" and owner in ("np", "numpy"):
                flag = kwargs.get("allow_pickle")
                if not (isinstance(flag, ast.Constant) and flag.value is False):
                    found.append(f"{where}: np.load without allow_pickle=False")
            elif node.func.attr == "load" and owner == "torch":
                flag = kwargs.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
    return found


def test_the_package_never_pickles():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the walk sees the package
    problems = [v for f in files for v in _violations(f.read_text("utf-8"), str(f.relative_to(PACKAGE.parent)))]
    assert problems == []


def test_the_check_finds_what_it_looks_for():
    bad = """
import pickle
from joblib import load
import numpy as np
np.load(p)
np.load(p, allow_pickle=True)
np.load(p, allow_pickle=False)
torch.load(p)
df.read_pickle(p)
"""
    found = _violations(bad, "bad.py")
    assert [v.split(": ", 1)[1] for v in found] == [
        "import pickle", "from joblib import ...", "np.load without allow_pickle=False",
        "np.load without allow_pickle=False", "torch.load without weights_only=True", "read_pickle()"]
