"""The ``sgpo`` command: the parser and error reporting (``main``), one module per command (``run``, ``evaluate``,
``metrics``, ``compare``, ``improver_eval``, ``report``, ``config``, ``push``): parsing only, the work happens in the
modules they call.
May import anything."""
