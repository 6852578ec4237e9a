"""Models: loading a hub name, a local path or an embedded model (``loading``), every prompt the models see
(``templates``), sizes and memory plans (``sizes``), and the run's current model and where it lives (``policy``).
May import ``core`` and ``config``."""
