"""The improver role: how its training targets are built (``targets``) and how good its rewrites are (``figures``)."""
