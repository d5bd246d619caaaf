"""Lets a source checkout import `fp8dispatch.backends` and `fp8dispatch.conformance`.

The repository keeps `backends/` and `conformance/` beside `fp8dispatch/`; an installed copy has
them inside it (pyproject's `package-dir`), which is the only layout Python finds on its own. In a
checkout this finder maps exactly those two names to those two folders and nothing else, so
`python -c "import fp8dispatch"` works from a fresh clone and every other import is untouched.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
FOLDERS = {"fp8dispatch.backends": _PACKAGE.parent / "backends",
           "fp8dispatch.conformance": _PACKAGE.parent / "conformance"}


class SourceFolders(importlib.abc.MetaPathFinder):
    """Finds the two mapped packages in the checkout's top-level folders."""

    def find_spec(self, name, path=None, target=None):
        folder = FOLDERS.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)])


def install() -> None:
    """Adds the finder when this package runs from a checkout (an installed copy needs none)."""
    installed = (_PACKAGE / "backends").is_dir()
    in_checkout = all((folder / "__init__.py").is_file() for folder in FOLDERS.values())
    if in_checkout and not installed and not any(isinstance(f, SourceFolders) for f in sys.meta_path):
        sys.meta_path.append(SourceFolders())
