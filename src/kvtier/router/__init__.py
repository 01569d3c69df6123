"""``kvtier router``: an OpenAI-compatible HTTP proxy that sends each request to the vLLM instance
holding the longest cached prefix of its prompt (asked of each instance's kvtier daemon, ``POST
/lookup``), then to the least loaded one; other policies: round-robin, session, least-load.

Modules, one job each: ``config`` (flags -> ``RouterConfig``), ``backends`` (per-instance state:
in-flight count, cool-down after a failure), ``policies`` (pure ordering of instances, no I/O),
``lookup`` (the concurrent ``/lookup`` fan-out), ``tokenize`` (the model's tokenizer and chat
template), ``openai_errors`` (the error JSON shape), ``proxy`` (forwarding, retry and stream
resume), ``metrics`` (Prometheus), ``app`` (the aiohttp application and the PD two-step).

Invariant: a dead or slow daemon or instance costs the client at most a routing choice (the next
policy, another instance), never a failed request, as long as one instance answers.
"""
