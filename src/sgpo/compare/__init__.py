"""``sgpo compare``: several methods and seeds from the same start model, prompts and budget, judged alike
(``runs``); the paired figures (``paired``) and what is written (``report``).
May import anything but ``cli``."""
