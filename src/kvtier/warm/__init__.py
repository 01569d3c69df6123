"""``kvtier warm``: pre-compute and store the KV of a document corpus before traffic arrives.

* ``corpus``: documents from text files, folders and JSONL files (one record per line).
* ``inproc``: each document through the in-process transformers engine, stored as prefix chunks
  (a request that starts with the document hits) or as blend segments (a RAG prompt that holds
  the document anywhere reuses it, ``kvtier.blend``); a document already stored is skipped (the
  engine's own lookup), so an interrupted run resumes where it stopped.
* ``http``: each document sent to an OpenAI-compatible server (``max_tokens=1``) whose kvtier
  connector stores it; resumable through a state file of the documents done.
* ``report``: documents, tokens and bytes stored per tier.
"""

from kvtier.warm.corpus import Document, WarmError, read_corpus
from kvtier.warm.report import WarmReport

__all__ = ["Document", "WarmError", "WarmReport", "read_corpus"]
