"""Evaluation: judges (``base``, ``judges`` and one module per kind), their cache and the check before a run
(``cache``, ``preflight``), win rates (``winrate``), benchmarks and their leaderboard metrics (``alpaca_eval``,
``arena_hard``, ``ifeval``, ``sgpo eval`` in ``benchmark``), the figures a run computes about its own models
(``evaluator``, ``held_out``) and the improver's (``improver``).
May import ``core``, ``config``, ``models``, ``data`` and ``generation``."""
