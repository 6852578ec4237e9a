"""A run: the recipe every method shares (``recipe``), what its stages share (``session``), the run directory and
its stages (``stages``), the training calls on the current model (``trainer``), the dry run's counting parts
(``dry_run``), ``--show-prompts`` (``show_prompts``), the report (``report``) and the model card (``model_card``).
May import anything but ``cli`` and ``compare``."""
