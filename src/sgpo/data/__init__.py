"""Data: datasets in the formats people have turned into ``Record``s (``records``), the built-in verifiable
instructions (``verifiable``), and the run's fixed split into training, development and test prompts (``splits``).
May import ``core``, ``config``, ``models.templates`` and IFEval's checkers (``eval.ifeval``)."""
