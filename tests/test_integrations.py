"""``ragserve.integrations`` without its frameworks: the package imports neither, and an
adapter whose framework is missing says which extra installs it."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import ragserve.integrations, ragserve.integrations.backend
assert not {"langchain_core", "llama_index"} & {m.split(".")[0] for m in sys.modules}, "a framework was imported"
for module in ("langchain_core", "llama_index", "llama_index.core"):
    sys.modules[module] = None   # as if not installed
from ragserve import FrameworkNotInstalledError
for adapter, extra in (("langchain", "langchain"), ("llamaindex", "llamaindex")):
    try:
        __import__(f"ragserve.integrations.{adapter}")
    except ImportError as e:
        assert isinstance(e, FrameworkNotInstalledError), type(e)
        assert f"pip install 'ragserve[{extra}]'" in str(e), str(e)
        print(adapter, "ok")
"""


def test_a_missing_framework_names_its_extra_and_the_package_imports_neither():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["langchain", "ok", "llamaindex", "ok"]
