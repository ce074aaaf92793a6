"""Install llama-cpp-python built from its sdist with Tandem's patch to the vendored llama.cpp.

    python patches/build.py VERSION PATCH

Run by the Makefile with the project's virtualenv Python, before Tandem itself is installed (so pip keeps
this build for Tandem's `llama-cpp-python==VERSION` requirement). The wheel is built once per (version,
patch, CMAKE_ARGS) and kept in ~/.cache/tandem/wheels; later installs reuse it. Standard library only.
The runtime checks that the library it loads carries the patch (tandem.engine.llama.patch_level) and says
so on /health when it does not, so a stock build still works, without what the patch adds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def _run(*cmd: str, cwd: str | None = None, stdin: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    with open(stdin, "rb") if stdin else open(os.devnull, "rb") as f:
        subprocess.run(cmd, cwd=cwd, stdin=f, check=True)


def main(version: str, patch: Path) -> None:
    key = hashlib.sha256(patch.read_bytes() + version.encode() + os.environ.get("CMAKE_ARGS", "").encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tandem" / "wheels" / key.hexdigest()[:16]
    pip = (sys.executable, "-m", "pip")
    wheels = sorted(cache.glob("llama_cpp_python-*.whl"))
    if not wheels:
        with tempfile.TemporaryDirectory(prefix="tandem-llama-") as tmp:
            _run(*pip, "download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", tmp)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            src = next(p for p in Path(tmp).iterdir() if p.is_dir())
            if shutil.which("patch"):
                _run("patch", "-p1", "--forward", cwd=str(src), stdin=patch)
            else:  # git applies a unified diff to a plain folder too
                _run("git", "apply", "-p1", str(patch.resolve()), cwd=str(src))
            _run(*pip, "wheel", "--no-deps", str(src), "-w", str(cache))
        wheels = sorted(cache.glob("llama_cpp_python-*.whl"))
    _run(*pip, "install", "--no-deps", "--force-reinstall", str(wheels[-1]))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], Path(sys.argv[2]))
