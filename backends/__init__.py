"""fp8dispatch's backends, one module each; `fp8dispatch.registry` loads the built-in ones."""
