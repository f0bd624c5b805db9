"""Fill a wheelhouse with every wheel the install tests need, so that they install with --no-index (no network).

    python tests/wheelhouse.py DIR

.ci/run runs this before pytest (and exports GPTEXPORT_WHEELHOUSE=DIR); run locally, tests/packaging/test_wheel.py
fills the default one (build/wheelhouse) itself. It holds the runtime's dependencies, the `export` extra's,
torch==2.13.0 (the CPU wheel; never a newer torch) and the build backend (`python -m build` makes its isolated
environment from it). A file named COMPLETE is written last: a wheelhouse without it is not used.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "build" / "wheelhouse"
TORCH = "torch==2.13.0"
MARKER = "COMPLETE"


def requirements() -> list[str]:
    """What the install tests install: the project's runtime and export requirements, torch pinned, the backend."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    export = [r for r in project["project"]["optional-dependencies"]["export"] if not r.startswith("torch")]
    return [*project["project"]["dependencies"], *export, TORCH, *build, "wheel"]


def fill(directory: Path = DEFAULT) -> Path:
    """Wheels of `requirements()` and all they need into `directory` (sdists such as `future` are built); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(directory), *requirements()],
                   check=True)
    (directory / MARKER).write_text("\n".join(requirements()) + "\n")
    return directory


if __name__ == "__main__":
    print(fill(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT))
