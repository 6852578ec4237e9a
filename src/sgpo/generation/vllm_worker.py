"""vLLM's offline generation for sgpo's ``vllm`` backend, run as a script in the Python environment that has vLLM.

    python vllm_worker.py

One engine for the life of the process (a whole run): it reads the paths of job files from stdin, one a line, and
runs each job in turn; at the end of stdin it shuts vLLM down and exits. It imports nothing from sgpo (vLLM may live in
an environment of its own, with its own transformers). A job (written by ``sgpo.generation.vllm_backend``) holds the checkpoint,
the sampling settings, the EOS ids and the requests, the plan's batches grouped into vLLM calls: ``{"model", "load",
"engine": {"dtype", "seed", "max_model_len", "gpu_memory", "enforce_eager"}, "max_new_tokens", "temperature",
"top_p", "eos", "calls": [[[[index, prompt_ids, seed], ...] (a batch), ...] (a call), ...], "out"}``.

The first job starts the engine on its ``model`` with its ``engine`` settings (later jobs' ``engine`` is not read: the
caller starts another worker for other settings) and writes ``{"started": seconds}``; a later job with ``load`` set
loads its ``model``'s weights into the running engine (the same architecture: the caller checks) and writes
``{"loaded": seconds}``. The prefix cache is emptied before every call, so a call's answers depend on its own requests
and the weights only, not on what the engine ran before (a resumed or shared-out rollout runs other calls first).
After each call one JSON line is appended to ``out`` (``{"call": c, "batches": [[[index, token_ids, finished], ...],
...]}``, token ids without the EOS) and flushed, so the caller can save finished batches while the rest is generated;
``{"done": true}`` ends the job.
"""
import json
import os
import signal
import sys
import time


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


class WeightSwap:
    """Mixed into vLLM's worker (``worker_extension_cls``): new weights from a checkpoint folder, in place."""

    def sgpo_load_weights(self, path: str) -> list:
        self.reload_weights(weights_path=path)
        return _repack_cpu_weights(self.model_runner.get_model())


def _repack_cpu_weights(model) -> list:
    """On a CPU, vLLM multiplies with copies of the weights packed at load time. ``reload_weights`` packs those of
    every layer it loads again, but a layer whose weights it does not load (an ``lm_head`` tied to the embeddings,
    whose weight comes with them) keeps its old packed copy: its logits would come from the previous model. Such layers
    keep their weight beside the packed copy; they are packed again here. Returns their names."""
    try:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        from vllm.platforms import current_platform
    except ImportError:
        return []
    if not current_platform.is_cpu():
        return []
    names = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and weight is not None and weight.numel() > 0:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            names.append(name)
    return names


def _engine(job: dict):
    from vllm import LLM

    e = job["engine"]
    return LLM(model=job["model"], dtype=e["dtype"], seed=e["seed"], enforce_eager=e["enforce_eager"],
               max_model_len=e["max_model_len"], gpu_memory_utilization=e["gpu_memory"],
               skip_tokenizer_init=True,  # token ids in, token ids out: the folder need not hold a tokenizer
               generation_config="vllm",  # stop ids come with each job (the folder's EOS), not the first folder's
               worker_extension_cls="vllm_worker.WeightSwap")


def _run(llm, job: dict, out) -> None:
    """The job's calls, one ``LLM.generate`` each, an answer line after each."""
    from vllm.inputs import TokensPrompt

    eos = set(job["eos"])
    for c, call in enumerate(job["calls"]):
        llm.reset_prefix_cache()
        items = [item for batch in call for item in batch]
        prompts = [TokensPrompt(prompt_token_ids=ids) for _, ids, _ in items]
        outputs = llm.generate(prompts, [_params(job, seed) for _, _, seed in items], use_tqdm=False)
        results = {i: _result(i, o.outputs[0], eos) for (i, _, _), o in zip(items, outputs)}
        rows = [[results[i] for i, _, _ in batch] for batch in call]
        _line(out, {"call": c, "batches": rows})


def _line(out, row: dict) -> None:
    out.write(json.dumps(row) + "\n")
    out.flush()


def _end_group(signum, frame) -> None:
    """SIGTERM (the caller's, or its death: PR_SET_PDEATHSIG): end this process and vLLM's own (the group)."""
    os.killpg(os.getpgrp(), signal.SIGKILL)


def main() -> None:
    if os.getpgrp() == os.getpid():  # the leader of a group of its own (as the caller starts it)
        signal.signal(signal.SIGTERM, _end_group)
    llm = None
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(open(line.strip(), encoding="utf-8").read())
        with open(job["out"], "a", encoding="utf-8") as out:
            t0 = time.perf_counter()
            if llm is None:
                llm = _engine(job)
                _line(out, {"started": time.perf_counter() - t0})
            elif job.get("load"):
                llm.collective_rpc("sgpo_load_weights", args=(job["model"],))
                _line(out, {"loaded": time.perf_counter() - t0})
            _run(llm, job, out)
            _line(out, {"done": True})


if __name__ == "__main__":  # vLLM starts its workers with spawn: the guard is required
    main()
