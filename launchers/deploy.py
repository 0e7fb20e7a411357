"""``mnemos deploy app.py``: package an app, register it, make it live.

1. Import the file and find its :class:`mnemos.App` (exactly one, or ``--app NAME``).
2. Package the file (and the app's ``include`` globs) into a directory; the version is
   ``h`` + the first 16 hex digits of a sha256 over the packaged files, the requirements
   and the entrypoint, so the same source is always the same version.
3. If that version is already live, stop: nothing changes. Otherwise push it to the
   registry (unless it is there from an earlier deploy: rolling back costs no upload) as
   a ``python`` model with ``isolation="process"``, and ask the control plane to make it
   live (``apps.deploy``), which also sizes the app's pool.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from mnemos.app import App, load_module
from mnemos.client import Client
from mnemos.config import NatsSettings
from mnemos.connection import connect
from mnemos.errors import AppNotFound, ModelNotFound, ValidationFailed
from mnemos.messages import AppDeployed, DeployApp

__all__ = ["LoadedApp", "load_app_file", "package", "deploy"]


@dataclass(frozen=True)
class LoadedApp:
    app: App
    path: Path
    variable: str
    module: ModuleType


def load_app_file(path: Path, name: str | None = None) -> LoadedApp:
    """Import ``path`` (as ``__mnemos_deploy__``, so its ``if __name__ == "__main__"``
    block does not run) and return its app; ValidationFailed says what is wrong."""
    path = Path(path).resolve()
    if not path.is_file() or path.suffix != ".py":
        raise ValidationFailed(f"{path} is not a Python file")
    sys.path.insert(0, str(path.parent))
    try:
        module = load_module(path, "mnemos_deploy_" + re.sub(r"[^A-Za-z0-9_]", "_", path.stem))
    except Exception as e:
        raise ValidationFailed(f"importing {path.name} raised {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.parent))
    apps = {var: value for var, value in vars(module).items() if isinstance(value, App)}
    if name is not None:
        apps = {var: a for var, a in apps.items() if a.name == name}
    if len(apps) != 1:
        found = ", ".join(f"{a.name} ({v})" for v, a in apps.items()) or "none"
        raise ValidationFailed(f"{path.name} must define exactly one mnemos.App"
                               f"{f' named {name!r}' if name else ''} at module level (found: {found})")
    (variable, app), = apps.items()
    if not app.members:
        raise ValidationFailed(f"app {app.name} defines no function or class")
    return LoadedApp(app=app, path=path, variable=variable, module=module)


def _files(loaded: LoadedApp) -> list[Path]:
    root = loaded.path.parent
    files = {loaded.path}
    for pattern in loaded.app.include:
        matched = [p for p in root.glob(pattern) if p.is_file()]
        if not matched:
            raise ValidationFailed(f"include pattern {pattern!r} matches no file next to {loaded.path.name}")
        for p in matched:
            if not p.resolve().is_relative_to(root):
                raise ValidationFailed(f"included file {p} is outside {root}")
            files.add(p.resolve())
    return sorted(files)


def package(loaded: LoadedApp, dest: Path) -> str:
    """Copy the app's files into ``dest``; return its content-addressed version."""
    root = loaded.path.parent
    digest = hashlib.sha256()
    digest.update(f"entry={loaded.path.name}:{loaded.variable}\n".encode())
    for req in loaded.app.requirements:
        digest.update(f"req={req}\n".encode())
    for path in _files(loaded):
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        digest.update(f"file={rel}\n{len(data)}\n".encode())
        digest.update(data)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return "h" + digest.hexdigest()[:16]


async def deploy(settings: NatsSettings, path: Path, *, app_name: str | None = None) -> AppDeployed:
    """Deploy the app in ``path`` (see the module docstring)."""
    from registry import Registry, RegistrySettings

    loaded = load_app_file(path, app_name)
    app = loaded.app
    with tempfile.TemporaryDirectory(prefix="mnemos-deploy-") as tmp:
        version = package(loaded, Path(tmp))
        nc = await connect(settings, "mnemos-deploy")
        try:
            client = Client(nc, settings.names)
            body = DeployApp(name=app.name, version=version, definitions=app.definitions,
                             requirements=list(app.requirements))
            try:
                live = await client.app(app.name)
            except AppNotFound:
                live = None
            if live is not None and live.version == version and live.definitions == body.definitions:
                return await client.deploy_app(body)  # the control plane says: unchanged
            async with Registry(nc.jetstream(), settings.names, RegistrySettings()) as registry:
                try:
                    await registry.get(f"{app.name}:{version}")  # deployed before: a rollback
                except ModelNotFound:
                    await registry.push(
                        Path(tmp), family=app.name, version=version, runtime="python",
                        runtime_config={"entrypoint": f"{loaded.path.name}:{loaded.variable}",
                                        "functions": app.targets, "isolation": "process",
                                        "requirements": list(app.requirements)},
                        description=f"app {app.name} ({', '.join(app.targets)})"[:1024],
                    )
            return await client.deploy_app(body)
        finally:
            await nc.drain()
