"""Training: NLL on completion tokens (SFT, improver) and DPO, in a lean loop of our own (see README)."""
