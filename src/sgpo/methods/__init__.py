"""Alignment methods, one module each (``sgpo``, ``spin``, ``synpo``, ``dpo``, ``sft``). A method says how a round
makes its preference pairs and which model is the reference; the recipe (``sgpo.run.recipe``) does everything else.
Add one by writing a module with a ``Method`` (``base``) and registering it in ``sgpo.core.registry.METHODS``
(name → "module:Class"). What methods make and share lives beside them: pairs and their gates (``pairs``, ``gates``)
and the improver role, its targets and its training (``improver``: SGPO's own part, used by SynPO too).
May import ``core``, ``config``, ``models``, ``data``, ``generation``, ``training``, ``eval`` and, for type hints only,
``run.session``."""
