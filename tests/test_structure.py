"""
The import rules of the layout (shared/design.md): model/ never imports the service, FastAPI or Redis; each
API face (service/faces/) stands on the shared modules and imports no other face and not the app
(service/api.py); the shared modules import no face and not the app. Read from the source with ast, so a
new import that breaks a rule fails here, whatever imports it at run time.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"
FACES = sorted(p.stem for p in (SERVICE / "faces").glob("*.py") if p.stem != "__init__")


def imports(file: Path) -> set[str]:
    """The absolute module names `file` imports (relative imports resolved against its package)."""
    package = file.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}  # `from . import x` imports module x
    return found


def test_the_faces_are_the_ones_the_design_names():
    assert {"native", "openai", "a1111"} <= set(FACES)


def test_no_face_imports_another_face_or_the_app():
    for face in FACES:
        found = imports(SERVICE / "faces" / f"{face}.py")
        others = {f"service.faces.{other}" for other in FACES if other != face}
        assert not found & others, f"faces/{face}.py imports {found & others}"
        assert "service.api" not in found, f"faces/{face}.py imports the app"


def test_shared_modules_import_no_face_and_not_the_app():
    for file in SERVICE.glob("*.py"):
        if file.stem in ("api", "cli"):  # the app assembles the faces; the CLI starts the app
            continue
        found = imports(file)
        bad = {m for m in found if m == "service.api" or m.startswith("service.faces")}
        assert not bad, f"service/{file.name} imports {bad}"


def test_model_never_imports_the_service_or_web_or_queue_libraries():
    for file in (ROOT / "model").glob("*.py"):
        found = imports(file)
        bad = {m for m in found if m.split(".")[0] in ("service", "fastapi", "starlette", "redis", "uvicorn")}
        assert not bad, f"model/{file.name} imports {bad}"
