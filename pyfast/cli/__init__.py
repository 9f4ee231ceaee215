"""Command-line entry points. They parse arguments and call into the library; no logic lives here."""
