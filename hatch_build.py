"""Hatch build hook: bundle the chat panel's front end (js/) into llava_nb/static/.

Runs on every build (`pip install -e .`, `pip wheel .`, sdist): `npm ci` when js/node_modules is
missing or older than the lock file, then esbuild through `npm run build`. Skipped when the
bundle is newer than every source file, so rebuilding the package does not need Node.js again
(and an sdist, which carries the bundle, installs without it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

BUNDLE = ("llava_nb/static/panel.js", "llava_nb/static/panel.css")


class FrontEndBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        root = Path(self.root)
        js = root / "js"
        bundle = [root / path for path in BUNDLE]
        sources = [js / "package.json", js / "package-lock.json", *(js / "src").rglob("*")]
        sources = [path for path in sources if path.is_file()]
        if not sources:  # an sdist without js/: the bundle it carries is all there is
            if not all(path.is_file() for path in bundle):
                raise RuntimeError("llava_nb: js/ and the built front end are both missing")
            return
        newest_source = max(path.stat().st_mtime for path in sources)
        if all(path.is_file() and path.stat().st_mtime >= newest_source for path in bundle):
            return  # up to date
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(
                "llava_nb: building the chat panel's front end (js/) needs Node.js and npm, "
                "and npm is not on PATH; install Node.js 18+ (https://nodejs.org, or "
                "apt-get install nodejs npm) and run the install again"
            )
        lock = js / "package-lock.json"
        installed = js / "node_modules" / ".package-lock.json"
        if not installed.is_file() or installed.stat().st_mtime < lock.stat().st_mtime:
            self._run([npm, "ci", "--no-audit", "--no-fund"], js)
        self._run([npm, "run", "build"], js)
        for path in bundle:
            if not path.is_file():
                raise RuntimeError(f"llava_nb: npm run build did not write {path}")
            path.touch()  # newer than the sources, so the next build skips this step

    def _run(self, command: list[str], cwd: Path) -> None:
        self.app.display_info(f"llava_nb: npm {' '.join(command[1:])} (in js/)")
        try:
            subprocess.run(command, cwd=cwd, check=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(
                f"llava_nb: '{' '.join(command[1:])}' failed in js/ (exit {e.returncode}); "
                "see npm's output above"
            ) from None
