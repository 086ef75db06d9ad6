"""Every Redis key metrix-s2s writes, named in this one module.

``P`` is ``METRIX_KEY_PREFIX`` (default ``metrix``). All keys live on one Redis (or a Sentinel
set): the scripts append event ids to the stems they are given, so Redis Cluster is not supported.

===========================  ======  =======  =====================================================
key                          type    owner    what it holds
===========================  ======  =======  =====================================================
``P:delivered:{event_id}``   string  ledger   ``"<status>:<ms>"``: delivered; TTL the ledger TTL
``P:inflight:{event_id}``    string  ledger   the token of the attempt sending it now; TTL the
                                              attempt's hard limit plus a margin
``P:tries:{event_id}``       string  ledger   ``"<n>:<first>"``: attempts claimed, ms of the
                                              first; counts claims of workers that died
                                              mid-attempt (0.1.0 kept a hash under
                                              ``P:attempts:``, left to expire)
``P:pending``                zset    ledger   event ids neither delivered nor dead-lettered, scored
                                              by when last seen alive (ms)
``P:pending:msg``            hash    ledger   event id -> JSON ``[app_id, event]``, to re-enqueue
``P:rl:{app_id}``            string  ledger   the app's GCRA arrival time (us of Redis' clock)
``P:rl:*``                   string  ledger   the same for the overall limit, when one is set
``P:rl:{app_id}:later``      string  ledger   the end of the app's line of deferred events (us)
``P:pause:{app_id}``         string  ledger   the app is paused (after a 429) while it exists
``P:dlq:entry:{event_id}``   hash    dlq      one dead letter (:mod:`metrix_s2s.deadletter`)
``P:dlq:by_time``            zset    dlq      every dead letter's id, scored by its last failure
``P:dlq:app:{app_id}``       zset    dlq      the same, for one app
``P:dlq:reason:{reason}``    zset    dlq      the same, for one reason
``P:dlq:apps``               set     dlq      app ids that have (or had) dead letters
``P:dlq:reasons``            set     dlq      reasons that have (or had) dead letters
``P:redriven``               hash    dlq      event id -> times re-driven; kept until delivered
``P:lock:{name}``            string  locks    a periodic run's lock (``redrive``, ``reconcile``)
``P:probe``                  string  workers  a starting worker's write check (TTL 1 s)
``P:last_run:{task}``        string  ops      unix time of the last periodic run (``redrive``,
                                              ``reconcile``), for the exporter and ``health``
===========================  ======  =======  =====================================================

The owners: the delivery ledger (:mod:`metrix_s2s.ledger`), the dead-letter store (``dlq``,
:mod:`metrix_s2s.deadletter`), the periodic runs' locks (:mod:`metrix_s2s.locks`) and a starting
worker (:mod:`metrix_s2s.workers.signals`).
Two scripts cross an owner's line on purpose, to stay atomic: a re-drive's take moves a dead
letter to the pending records, and a delivery's finish forgets the event's re-drive count.

By hand: ``redis-cli ZREVRANGE metrix:dlq:by_time 0 9`` lists the ten newest dead letters,
``redis-cli HGETALL metrix:dlq:entry:<id>`` shows one, ``redis-cli ZCARD metrix:pending`` counts
the events on their way.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Key prefix when ``METRIX_KEY_PREFIX`` is not set.
DEFAULT_PREFIX = "metrix"


@dataclass(frozen=True)
class Keyspace:
    """The key names under one prefix. Methods give one key; ``*_stem`` attributes give the start
    of a family of keys, to which a Lua script appends an id."""

    prefix: str = DEFAULT_PREFIX

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # -- the ledger ------------------------------------------------------------------------

    def delivered(self, event_id: str) -> str:
        return self._key("delivered", event_id)

    def inflight(self, event_id: str) -> str:
        return self._key("inflight", event_id)

    def attempts(self, event_id: str) -> str:
        return self._key("tries", event_id)

    @property
    def delivered_stem(self) -> str:
        return self.delivered("")

    @property
    def inflight_stem(self) -> str:
        return self.inflight("")

    @property
    def attempts_stem(self) -> str:
        return self.attempts("")

    @property
    def pending(self) -> str:
        return self._key("pending")

    @property
    def pending_messages(self) -> str:
        return self._key("pending", "msg")

    def rate(self, app_id: str) -> str:
        return self._key("rl", app_id)

    @property
    def overall_rate(self) -> str:
        return self._key("rl", "*")

    def rate_line(self, app_id: str) -> str:
        return self._key("rl", app_id, "later")

    def pause(self, app_id: str) -> str:
        return self._key("pause", app_id)

    # -- the dead-letter store -------------------------------------------------------------

    def dead_letter(self, event_id: str) -> str:
        return self._key("dlq", "entry", event_id)

    @property
    def dead_letter_stem(self) -> str:
        return self.dead_letter("")

    def dead_letters_of_app(self, app_id: str) -> str:
        return self._key("dlq", "app", app_id)

    @property
    def dead_letters_of_app_stem(self) -> str:
        return self.dead_letters_of_app("")

    def dead_letters_for_reason(self, reason: str) -> str:
        return self._key("dlq", "reason", reason)

    @property
    def dead_letters_for_reason_stem(self) -> str:
        return self.dead_letters_for_reason("")

    @property
    def dead_letters_by_time(self) -> str:
        return self._key("dlq", "by_time")

    @property
    def dead_letter_apps(self) -> str:
        return self._key("dlq", "apps")

    @property
    def dead_letter_reasons(self) -> str:
        return self._key("dlq", "reasons")

    @property
    def redriven(self) -> str:
        return self._key("redriven")

    # -- locks -----------------------------------------------------------------------------

    def lock(self, name: str) -> str:
        return self._key("lock", name)

    @property
    def probe(self) -> str:
        """A key a starting worker writes to learn whether Redis takes writes."""
        return self._key("probe")

    def last_run(self, task: str) -> str:
        """When the periodic ``task`` (``redrive``, ``reconcile``) last ran."""
        return self._key("last_run", task)
