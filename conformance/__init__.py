"""The conformance suite: every registered backend held to the reference, as pytest and as `fp8dispatch conformance`."""
