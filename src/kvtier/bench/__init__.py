"""``kvtier bench``: seeded workloads (chat, document QA, RAG, cache pressure), drivers (in-process
transformers with/without kvtier, any OpenAI-compatible HTTP server), reports, plots and comparisons."""
