"""Scheduler-side planning of the vLLM connector: which tokens to load from kvtier and which to save.

Pure Python (no vLLM, no torch), so the rules are unit-tested without a vLLM install; the
adapter in ``kvtier.integrations.vllm`` feeds it what the scheduler tells the connector.

Rules and why:
* A load covers ``[start, end)``: ``start`` is vLLM's own (block-aligned) prefix-cache hit,
  ``end`` the kvtier hit rounded *down* to a block, and at most ``prompt_len - 1`` rounded down:
  vLLM must compute at least one token to produce logits, and a load that ends mid-block would
  leave a partly filled block vLLM might share. ``end <= start`` means nothing to load.
* A save covers ``[saved_upto, end)`` where ``end`` is the last *full chunk* boundary whose KV
  this step writes (``num_computed + num_scheduled``, capped by the tokens known): only full
  chunks have keys another request can hit. Saves go on through decode, so a multi-round chat's
  next prompt finds the previous answer too. The worker skips chunks already cached.
* Blocks are tracked from the scheduler output (new requests carry their block list, running
  ones append, resumed-after-preemption ones replace it), so specs always name the blocks that
  hold the tokens in this step.
* Every spec is plain data (``TransferSpec``: ints, lists and the request's ``KeyExtras``),
  serialisable for vLLM's multiprocess executor.
* A request's key inputs beyond its tokens (LoRA adapter, cache salt, multimodal items:
  ``vllm_keys``) are fixed at its first ``match`` and travel in every spec, so the worker keys
  loads and saves exactly as the lookup did. A request ``match`` was given ``None`` for cannot
  be keyed: kvtier neither loads nor saves it (``uncacheable``).
* The instance's ``kv_role`` (``Role``) gates both directions for every request: a
  ``kv_producer`` (the prefill side of a disaggregated pair) never looks up and never loads, so
  its scheduler reports 0 external tokens; a ``kv_consumer`` (the decode side) never saves.
  ``kv_both`` does both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvtier.errors import KVTierError, StateError
from kvtier.keys import NO_EXTRAS, KeyExtras


def align_down(n: int, step: int) -> int:
    return n - n % step


class ConnectorError(KVTierError, ValueError):
    """vLLM handed the connector something it cannot work with (names what and why)."""


class ConnectorVersionError(KVTierError, RuntimeError):
    """The installed vLLM is outside the range this connector supports."""


class ConnectorStateError(StateError):
    """vLLM and the connector's plan disagree (a bug on one side): refuse rather than load wrong KV."""


@dataclass(frozen=True)
class Role:
    """What one vLLM instance's connector does (its ``kv_role``)."""

    name: str
    loads: bool
    saves: bool


ROLES = {
    "kv_both": Role("kv_both", loads=True, saves=True),
    "kv_producer": Role("kv_producer", loads=False, saves=True),
    "kv_consumer": Role("kv_consumer", loads=True, saves=False),
}
BOTH = ROLES["kv_both"]


def parse_role(kv_role: object) -> Role:
    """The ``Role`` of vLLM's ``kv_role``; ``ConnectorError`` (one line naming the fix) otherwise."""
    role = ROLES.get(kv_role) if isinstance(kv_role, str) else None
    if role is None:
        raise ConnectorError(
            f"kv_transfer_config kv_role {kv_role!r} is not a role kvtier's connector knows: use "
            "'kv_producer' (prefill: saves, never loads), 'kv_consumer' (decode: loads, never saves) "
            "or 'kv_both'"
        )
    return role


@dataclass
class TransferSpec:
    """Move the KV of tokens ``[start, end)`` of one request between its blocks and kvtier.

    ``tokens`` are the request's token ids from 0 to at least ``end`` (the chunk keys chain over
    the whole prefix). ``block_ids[i]`` holds tokens ``[first_token + i*block_size, ...)`` with
    ``first_token = start - start % block_size``; only the blocks the range touches are listed.
    """

    req_id: str
    tokens: list[int]
    start: int
    end: int
    block_ids: list[int]
    extras: KeyExtras = NO_EXTRAS
    """The request's adapter, salt and multimodal items: part of every chunk key."""

    def first_token(self, block_size: int) -> int:
        return align_down(self.start, block_size)


@dataclass
class _Req:
    tokens: Sequence[int]
    """The request's live token list (prompt + outputs so far), owned by vLLM."""
    block_ids: list[int] = field(default_factory=list)
    saved_upto: int = 0
    pending_end: int = 0
    """Last full-chunk boundary whose KV exists once this step has run."""
    load: tuple[int, int] | None = None
    extras: KeyExtras | None = NO_EXTRAS
    """``None``: the request cannot be keyed (never loaded, never saved)."""


@dataclass
class _Match:
    num_computed: int
    load_end: int


class Planner:
    """Per-request bookkeeping of the scheduler-side connector.

    ``lookup(tokens, extras) -> int`` returns how many leading tokens kvtier holds (a chunk prefix).
    ``role``: which directions this instance moves KV in (``kv_role``).
    """

    def __init__(
        self,
        lookup: Callable[[Sequence[int], KeyExtras], int],
        *,
        block_size: int,
        chunk_tokens: int,
        role: Role = BOTH,
    ) -> None:
        if block_size <= 0 or chunk_tokens <= 0:
            raise ConnectorError(
                f"block_size and chunk_tokens must be positive, got {block_size}, {chunk_tokens}"
            )
        self._lookup = lookup
        self.role = role
        self.block_size = block_size
        self.chunk_tokens = chunk_tokens
        self._reqs: dict[str, _Req] = {}
        self._matches: dict[str, _Match] = {}
        self._extras: dict[str, KeyExtras | None] = {}
        """Key inputs of requests matched but not allocated yet."""

    # -- lookup / allocation --------------------------------------------------------------------
    def match(
        self, req_id: str, tokens: Sequence[int], num_computed: int, extras: KeyExtras | None = NO_EXTRAS
    ) -> int:
        """Tokens kvtier can supply beyond vLLM's ``num_computed`` (0 if none); remembers the plan.

        ``extras``: the request's key inputs; ``None`` marks it uncacheable (0, and no saves).
        A request already tracked (resumed after preemption) keeps the extras it had.
        """
        st = self._reqs.get(req_id)
        if st is not None:
            extras = st.extras
        else:
            extras = self._extras.setdefault(req_id, extras)
        if extras is None or not self.role.loads:  # NOTE: a producer does not even look
            self._matches.pop(req_id, None)
            return 0
        limit = align_down(len(tokens) - 1, self.block_size) if tokens else 0
        if limit <= num_computed:
            self._matches.pop(req_id, None)
            return 0
        hit = self._lookup(tokens, extras)
        load_end = align_down(min(hit, limit), self.block_size)
        if load_end <= num_computed:
            self._matches.pop(req_id, None)
            return 0
        self._matches[req_id] = _Match(num_computed, load_end)
        return load_end - num_computed

    def after_alloc(
        self, req_id: str, tokens: Sequence[int], num_external: int, extras: KeyExtras | None = NO_EXTRAS
    ) -> None:
        """vLLM allocated blocks; ``num_external`` > 0 means it accepted our load. ``extras`` are
        the request's key inputs (what ``match`` was given takes precedence)."""
        st = self._reqs.get(req_id)
        if st is None:
            st = self._reqs[req_id] = _Req(tokens, extras=self._extras.pop(req_id, extras))
        st.tokens = tokens
        m = self._matches.pop(req_id, None)
        if num_external > 0:
            if m is None or m.num_computed + num_external > m.load_end:
                raise ConnectorStateError(
                    f"request {req_id}: vLLM accepted {num_external} external tokens but kvtier planned "
                    f"{'none' if m is None else m.load_end - m.num_computed}"
                )
            st.load = (m.num_computed, m.num_computed + num_external)

    # -- per step -------------------------------------------------------------------------------
    def new_request(
        self,
        req_id: str,
        tokens: Sequence[int] | None,
        block_ids: Sequence[int],
        num_computed: int,
        num_scheduled: int,
    ) -> None:
        st = self._reqs.get(req_id)
        if st is None:
            # never matched nor allocated through this connector: its key inputs are unknown
            st = self._reqs[req_id] = _Req(tokens or [], extras=self._extras.pop(req_id, None))
        st.block_ids = list(block_ids)
        self._advance(st, num_computed + num_scheduled)

    def running_request(
        self,
        req_id: str,
        new_block_ids: Sequence[int] | None,
        resumed: bool,
        num_computed: int,
        num_scheduled: int,
    ) -> None:
        st = self._reqs.get(req_id)
        if st is None:  # not seen by this connector (e.g. created before it): nothing to save
            return
        if resumed:
            st.block_ids = list(new_block_ids or [])
        elif new_block_ids:
            st.block_ids.extend(new_block_ids)
        self._advance(st, num_computed + num_scheduled)

    def _advance(self, st: _Req, computed_after: int) -> None:
        st.pending_end = align_down(min(computed_after, len(st.tokens)), self.chunk_tokens)

    def take_specs(self, scheduled: Sequence[str]) -> tuple[list[TransferSpec], list[TransferSpec]]:
        """The loads and saves of this step for the ``scheduled`` request ids; resets pending loads."""
        loads: list[TransferSpec] = []
        saves: list[TransferSpec] = []
        for rid in scheduled:
            st = self._reqs.get(rid)
            if st is None or st.extras is None:
                continue
            if st.load is not None:
                s, e = st.load
                st.load = None
                loads.append(self._spec(rid, st, s, e))
            end = st.pending_end
            if self.role.saves and end > st.saved_upto:
                saves.append(self._spec(rid, st, st.saved_upto, end))
                st.saved_upto = end
        return loads, saves

    def _spec(self, rid: str, st: _Req, start: int, end: int) -> TransferSpec:
        bs = self.block_size
        b0, b1 = start // bs, -(-end // bs)
        if len(st.block_ids) < b1:
            raise ConnectorStateError(
                f"request {rid}: tokens [{start}, {end}) need {b1} blocks, vLLM gave {len(st.block_ids)}"
            )
        key_end = min(len(st.tokens), -(-end // self.chunk_tokens) * self.chunk_tokens)
        assert st.extras is not None
        return TransferSpec(rid, list(st.tokens[:key_end]), start, end, st.block_ids[b0:b1], st.extras)

    def finished(self, req_id: str) -> None:
        self._reqs.pop(req_id, None)
        self._matches.pop(req_id, None)
        self._extras.pop(req_id, None)

    def __len__(self) -> int:
        return len(self._reqs)
