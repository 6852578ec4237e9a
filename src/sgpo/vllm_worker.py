"""vLLM's offline generation for sgpo's ``vllm`` backend, run as a script in the Python environment that has vLLM.

    python vllm_worker.py JOB.json

It imports nothing from sgpo (vLLM may live in an environment of its own, with its own transformers). ``JOB.json``
(written by ``sgpo.vllm_backend``) holds the checkpoint, the sampling settings, the EOS ids and the requests: the
plan's batches grouped into vLLM calls, ``{"model", "dtype", "seed", "max_new_tokens", "temperature", "top_p", "eos",
"max_model_len", "gpu_memory", "enforce_eager", "calls": [[[[index, prompt_ids, seed], ...] (a batch), ...] (a call),
...], "out"}``. The calls run in order, each one ``LLM.generate``; after each, one JSON line is appended to ``out``
(``{"call": c, "batches": [[[index, token_ids, finished], ...], ...]}``, token ids without the EOS) and flushed, so
the caller can save finished batches while the rest is generated. The first line, ``{"started": true}``, says that
vLLM has started (the caller times its start-up).
"""
import json
import sys


def _params(job: dict, seed: int):
    from vllm import SamplingParams

    greedy = job["temperature"] <= 0
    return SamplingParams(n=1, temperature=0.0 if greedy else job["temperature"], top_p=1.0 if greedy else job["top_p"],
                          top_k=0, max_tokens=job["max_new_tokens"], seed=None if greedy else seed,
                          stop_token_ids=job["eos"], detokenize=False)


def _result(index: int, output, eos: set) -> list:
    ids = list(output.token_ids)
    finished = output.finish_reason == "stop"
    while ids and ids[-1] in eos:  # the EOS that ended the answer is not part of it
        ids.pop()
    return [index, ids, finished]


def main(job_path: str) -> None:
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    job = json.loads(open(job_path, encoding="utf-8").read())
    llm = LLM(model=job["model"], dtype=job["dtype"], seed=job["seed"], enforce_eager=job["enforce_eager"],
              max_model_len=job["max_model_len"], gpu_memory_utilization=job["gpu_memory"],
              skip_tokenizer_init=True)  # token ids in, token ids out: the folder need not hold a tokenizer
    eos = set(job["eos"])
    with open(job["out"], "a", encoding="utf-8") as out:
        out.write(json.dumps({"started": True}) + "\n")
        out.flush()
        for c, call in enumerate(job["calls"]):
            items = [item for batch in call for item in batch]
            prompts = [TokensPrompt(prompt_token_ids=ids) for _, ids, _ in items]
            outputs = llm.generate(prompts, [_params(job, seed) for _, _, seed in items], use_tqdm=False)
            results = {i: _result(i, o.outputs[0], eos) for (i, _, _), o in zip(items, outputs)}
            rows = [[results[i] for i, _, _ in batch] for batch in call]
            out.write(json.dumps({"call": c, "batches": rows}) + "\n")
            out.flush()


if __name__ == "__main__":  # vLLM starts its workers with spawn: the guard is required
    main(sys.argv[1])
