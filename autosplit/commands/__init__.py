"""Command implementations long enough to have their own module; ``cli.py`` keeps the parser,
``main`` and the short commands, and imports these without their heavy imports."""
