"""``sgpo config [SECTION]``: every config key with its type, default, allowed values and meaning."""
from __future__ import annotations



def command(args) -> int:
    from sgpo.config.reference import text

    print(text(args.section), end="")
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("config", help="every config key with its type, default, allowed values and meaning")
    c.add_argument("section", nargs="?", help="only this section (model, data, generation, improver, train, dpo, "
                                              "pairs, eval; '' for the top-level keys)")
    c.set_defaults(func=command)
