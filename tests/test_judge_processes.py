"""Under a launcher the judges judge on the main process only and every process gets the same verdicts, even from a
judge that answers differently each time it is asked (an API judge at temperature > 0, a failing one)."""
import json
import subprocess
import sys
import textwrap

import pytest

from test_resume import REPO, cli_env

pytestmark = pytest.mark.slow  # two processes over gloo

SCRIPT = textwrap.dedent('''
    import json, os, random, sys
    from sgpo import distributed
    from sgpo.eval.base import Judge
    from sgpo.eval.judges import MainProcessJudge

    built = []

    class Moody(Judge):  # a judge that answers differently in every process
        def __init__(self, spec):
            self.spec = self.name = spec
            built.append(os.getpid())
        def prefer(self, prompts, a, b, references=None):
            if prompts and prompts[0] == "fail":
                raise ConnectionError("the judge's server went away")
            return [random.Random(os.getpid()).random() for _ in prompts]

    dist = distributed.setup("cpu")
    judge = MainProcessJudge("moody", dist, Moody)
    verdicts = judge.prefer(["a", "b", "c"], ["x"] * 3, ["y"] * 3)
    try:
        judge.prefer(["fail"], ["x"], ["y"])
        failed = None
    except Exception as e:
        failed = str(e)
    out = {"verdicts": verdicts, "built": len(built), "failed": failed}
    with open(os.path.join(sys.argv[1], f"rank{dist.rank}.json"), "w") as f:
        json.dump(out, f)
''')


def test_every_process_gets_the_main_process_verdicts(tmp_path):
    script = tmp_path / "judge.py"
    script.write_text(SCRIPT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                        str(tmp_path)], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    main, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert main["verdicts"] == other["verdicts"] and len(main["verdicts"]) == 3
    assert (main["built"], other["built"]) == (1, 0)  # the judge exists on the main process only
    assert "server went away" in main["failed"] and "server went away" in other["failed"]
