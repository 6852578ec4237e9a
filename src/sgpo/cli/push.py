"""``sgpo push``: a run's final model with its model card to the Hugging Face Hub."""
from __future__ import annotations



def command(args) -> int:
    from sgpo.run.model_card import push

    print(push(args.run_dir, args.repo_id, private=args.private))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("push", help="upload a run's final model with its model card to the Hugging Face Hub")
    p.add_argument("run_dir", help="a finished run directory (its final/ is uploaded)")
    p.add_argument("--repo-id", required=True, help="hub repository, e.g. you/smollm2-135m-sgpo")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.set_defaults(func=command)
