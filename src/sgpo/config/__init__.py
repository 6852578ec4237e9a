"""The configuration: the schema, its sections with their docs and checks beside the fields (``schema``), read
from YAML and ``--set``; and the reference generated from it (``reference``, ``docs/config.md``).
May import ``core`` only."""
