"""Training: NLL on completion tokens (SFT, improver) and DPO, in a lean loop of our own (``loop``, see README),
with batching, losses and adapters beside it; ``memory`` measures the peaks of these calls.
May import ``core``, ``config``, ``models``, ``data`` and ``generation``."""
