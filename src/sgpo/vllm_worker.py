"""vLLM's offline generation for sgpo's ``vllm`` backend, run as a script in the Python environment that has vLLM.

    python vllm_worker.py JOB.json

It imports nothing from sgpo (vLLM may live in an environment of its own, with its own transformers). ``JOB.json``
(written by ``sgpo.vllm_backend``) holds the checkpoint, the sampling settings, the EOS ids and the requests grouped
into the plan's batches: ``{"model", "dtype", "seed", "max_new_tokens", "temperature", "top_p", "eos", "max_model_len",
"gpu_memory", "min_call", "batches": [[[index, prompt_ids, seed], ...], ...], "out"}``. Consecutive batches are sent
to vLLM together, at least ``min_call`` sequences per call; after each call one JSON line per batch is appended to
``out`` (``{"batch": k, "results": [[index, token_ids, finished], ...]}``, token ids without the EOS) and flushed, so
the caller can save finished batches while the rest is generated. The first line, ``{"started": true}``, says that
vLLM has started (the caller times its start-up).
"""
import json
import sys


def _calls(batches: list, min_call: int) -> list[list[int]]:
    """Batch numbers grouped into vLLM calls of at least ``min_call`` sequences (the last may be smaller)."""
    calls, cur, n = [], [], 0
    for k, b in enumerate(batches):
        cur.append(k)
        n += len(b)
        if n >= min_call:
            calls.append(cur)
            cur, n = [], 0
    return calls + ([cur] if cur else [])


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
    batches = job["batches"]
    with open(job["out"], "a", encoding="utf-8") as out:
        out.write(json.dumps({"started": True}) + "\n")
        out.flush()
        for call in _calls(batches, job["min_call"]):
            items = [item for k in call for item in batches[k]]
            prompts = [TokensPrompt(prompt_token_ids=ids) for _, ids, _ in items]
            outputs = llm.generate(prompts, [_params(job, seed) for _, _, seed in items], use_tqdm=False)
            results = {i: _result(i, o.outputs[0], eos) for (i, _, _), o in zip(items, outputs)}
            for k in call:
                out.write(json.dumps({"batch": k, "results": [results[i] for i, _, _ in batches[k]]}) + "\n")
            out.flush()


if __name__ == "__main__":  # vLLM starts its workers with spawn: the guard is required
    main(sys.argv[1])
