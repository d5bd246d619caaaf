"""fp8dispatch's backends, one module each; `fp8dispatch.registry` loads the built-in ones.

This package is also the public function `fp8dispatch.backends()`: Python binds a subpackage to
its parent's attribute of the same name, so the package itself answers the call.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self) -> list[str]:
        """Registered backend names, highest default priority first."""
        from fp8dispatch.registry import backend_names

        return backend_names()


sys.modules[__name__].__class__ = _CallablePackage
