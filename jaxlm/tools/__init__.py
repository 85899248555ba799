"""Command-line tools that live inside the package (`python -m jaxlm.tools.<name>`)."""
