"""Generation: the batched sampling engine (``engine``) and its KV decoder (``kv_decoder``), the vLLM backend
(``vllm_backend``) and the script it runs in vLLM's own environment (``vllm_worker``, which imports nothing of
sgpo), and rollouts: records in, answers on disk, resumable (``rollout``).
May import ``core``, ``config``, ``models`` and ``data``."""
