"""The request/response field names of the pinned vLLM, read from its source with ast (no import,
no GPU), and the shipped copy of them (vllm_fields.json) that the tests check our JSON against.

The vLLM wheel is ~340 MB, too much for a test setup, so the names travel with the repository;
this module regenerates them and the tests compare the copy with the source whenever a vLLM
source is at hand (a wheel, or an unpacked/installed `vllm` package):

    pip download --no-deps vllm==0.33.0 -d /tmp/vllm
    python -m tests.engine.vllm_fields /tmp/vllm/vllm-0.33.0-*.whl > tests/engine/vllm_fields.json
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
import zipfile
from pathlib import Path

SHIPPED = Path(__file__).with_name("vllm_fields.json")

# (file inside the package, class) for every shape the vllm_http backend sends or reads, and the
# chat request `--engine openai --openai-server vllm` sends.
CLASSES = {
    "CompletionRequest": "entrypoints/openai/completion/protocol.py",
    "ChatCompletionRequest": "entrypoints/openai/chat_completion/protocol.py",
    "CompletionResponse": "entrypoints/openai/completion/protocol.py",
    "CompletionResponseChoice": "entrypoints/openai/completion/protocol.py",
    "StructuredOutputsParams": "sampling_params.py",
    "UsageInfo": "entrypoints/serve/engine/protocol.py",
    "PromptTokenUsageInfo": "entrypoints/serve/engine/protocol.py",
    "ModelCard": "entrypoints/serve/engine/protocol.py",
    "ModelList": "entrypoints/serve/engine/protocol.py",
    "ErrorResponse": "entrypoints/serve/engine/protocol.py",
    "ErrorInfo": "entrypoints/serve/engine/protocol.py",
}
FINISH_FILE = "v1/engine/__init__.py"  # FINISH_REASON_STRINGS


class Source:
    """Files of a vllm package, from a wheel (zip) or a directory holding `vllm/`'s contents."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.zip = zipfile.ZipFile(where) if where.is_file() else None

    def read(self, rel: str) -> str:
        if self.zip is not None:
            return self.zip.read(f"vllm/{rel}").decode()
        return (self.where / rel).read_text()


def _is_classvar(annotation: ast.expr) -> bool:
    node = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
    return name == "ClassVar"


def class_fields(source_text: str, class_name: str) -> list[str]:
    """Public annotated attributes of a pydantic model or dataclass (ClassVar and _private left out)."""
    for node in ast.parse(source_text).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return [
                s.target.id
                for s in node.body
                if isinstance(s, ast.AnnAssign)
                and isinstance(s.target, ast.Name)
                and not s.target.id.startswith("_")
                and not _is_classvar(s.annotation)
            ]
    raise LookupError(f"class {class_name} not found")


def module_tuple(source_text: str, name: str) -> list[str]:
    for node in ast.parse(source_text).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise LookupError(f"{name} not found")


def extract(where: Path) -> dict:
    src = Source(where)
    return {
        "vllm": _version(src.read("_version.py")),
        "classes": {cls: class_fields(src.read(rel), cls) for cls, rel in CLASSES.items()},
        "finish_reasons": module_tuple(src.read(FINISH_FILE), "FINISH_REASON_STRINGS"),
    }


def _version(text: str) -> str:
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise LookupError("__version__ not found")


def shipped() -> dict:
    return json.loads(SHIPPED.read_text())


def find_source() -> Path | None:
    """$SYSGEN_VLLM_SOURCE (a wheel or a vllm package directory), else an importable vllm."""
    env = os.environ.get("SYSGEN_VLLM_SOURCE")
    if env:
        return Path(env)
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.engine.vllm_fields VLLM_WHEEL_OR_PACKAGE_DIR")
    print(json.dumps(extract(Path(sys.argv[1])), indent=1))
