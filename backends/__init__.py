"""fp8dispatch's built-in backends, one module each (a backend with kernels is a folder).

Installed, this folder is the package `fp8dispatch.backends`; `fp8dispatch.registry` loads the
modules it lists in `BUILTIN_MODULES`. Modules here import each other relatively.
"""
