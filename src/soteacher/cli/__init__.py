"""Command-line interface (``soteacher ...`` or ``python -m soteacher ...``)."""
