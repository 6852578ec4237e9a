"""The ``sgpo`` command (``main``): parsing and error reporting only; the work happens in the modules it calls.
May import anything."""
