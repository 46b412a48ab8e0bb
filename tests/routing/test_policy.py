"""Placement policies on hand-made snapshots: pure logic, no fixtures."""

from __future__ import annotations

from dataclasses import replace

from app.residency.state import BackendSlots, BackendState
from app.routing.policy import (
    Action,
    AffinityPolicy,
    Decision,
    LruPolicy,
    PackPolicy,
    RandomPolicy,
    Request,
    RoundRobinPolicy,
    make_policy,
)


def backend(
    id: str,
    *,
    slots: int = 2,
    capacity: int = 3,
    seats: int | None = None,
    registered: dict[str, float] | None = None,
    inflight: dict[str, int] | None = None,
    loading: set[str] | None = None,
    tenants: dict[str, str] | None = None,
) -> BackendState:
    registered = registered or {}
    return BackendState(
        id=id,
        slots=slots,
        capacity=capacity,
        seats=seats,
        registered=registered,
        inflight=inflight or {},
        tenants=tenants or dict.fromkeys(registered, "t1"),
        loading=loading or set(),
    )


def _home(adapter: str, ids: tuple[str, ...]) -> str:
    """AffinityPolicy's home for the adapter among these backend ids (its crc32 ring)."""
    import zlib

    return sorted(ids)[zlib.crc32(adapter.encode()) % len(ids)]


REQ = Request("x", "t1")


class TestLru:
    policy = LruPolicy()

    def test_live_with_room_is_used(self) -> None:
        b1 = backend("b1", registered={"x": 1.0})
        b2 = backend("b2")
        assert self.policy.decide(REQ, [b1, b2]) == Decision(Action.USE, "b1")

    def test_spreads_over_holders_by_inflight(self) -> None:
        b1 = backend("b1", registered={"x": 1.0}, inflight={"x": 3})
        b2 = backend("b2", registered={"x": 1.0}, inflight={"x": 1})
        assert self.policy.decide(REQ, [b1, b2]).backend == "b2"

    def test_loads_where_capacity_is_free_before_evicting(self) -> None:
        full = backend("b1", registered={"a": 1.0, "b": 2.0, "c": 3.0})
        roomy = backend("b2", registered={"d": 1.0})
        assert self.policy.decide(REQ, [full, roomy]) == Decision(Action.LOAD, "b2")

    def test_evicts_the_globally_least_recently_used_idle_adapter(self) -> None:
        b1 = backend("b1", registered={"a": 5.0, "b": 6.0, "c": 7.0})
        b2 = backend("b2", registered={"d": 2.0, "e": 8.0, "f": 9.0})
        assert self.policy.decide(REQ, [b1, b2]) == Decision(Action.LOAD, "b2", evict="d")

    def test_never_evicts_inflight_or_pinned(self) -> None:
        b1 = backend("b1", slots=4, registered={"a": 1.0, "b": 2.0, "c": 3.0}, inflight={"a": 1})
        assert self.policy.decide(REQ, [b1]).evict == "b"
        pinned = Request("x", "t1", pinned=frozenset({"b"}))
        assert self.policy.decide(pinned, [b1]).evict == "c"
        everything = Request("x", "t1", pinned=frozenset({"b", "c"}))
        assert self.policy.decide(everything, [b1]).action is Action.WAIT

    def test_keeps_active_adapters_within_gpu_slots(self) -> None:
        # Two slots, both active with other adapters: no load there, even with free capacity.
        busy = backend("b1", slots=2, capacity=4, registered={"a": 1.0, "b": 2.0}, inflight={"a": 1, "b": 1})
        assert self.policy.decide(REQ, [busy]).action is Action.WAIT
        idle = backend("b2", slots=2, capacity=2, registered={"c": 1.0, "d": 2.0})
        assert self.policy.decide(REQ, [busy, idle]) == Decision(Action.LOAD, "b2", evict="c")

    def test_live_but_slots_full_waits_rather_than_overfill(self) -> None:
        b1 = backend("b1", slots=2, registered={"x": 1.0, "a": 2.0, "b": 3.0}, inflight={"a": 1, "b": 1})
        assert self.policy.decide(REQ, [b1]).action is Action.WAIT
        # Once it has waited its patience out, it may go there rather than starve.
        assert self.policy.decide(Request("x", "t1", overfill=True), [b1]) == Decision(Action.USE, "b1")
        cold = backend("b2", slots=2, registered={"a": 2.0, "b": 3.0, "c": 1.0}, inflight={"a": 1, "b": 1})
        overfill = Request("x", "t1", overfill=True)
        assert self.policy.decide(overfill, [cold]) == Decision(Action.LOAD, "b2", evict="c")

    def test_a_load_under_way_holds_its_slot(self) -> None:
        # One slot active, one claimed by a load: an idle registered adapter may not take it.
        b1 = backend("b1", slots=2, registered={"x": 1.0, "a": 2.0}, inflight={"a": 1}, loading={"c"})
        assert self.policy.decide(REQ, [b1]).action is Action.WAIT

    def test_waits_for_a_load_under_way(self) -> None:
        b1 = backend("b1", loading={"x"})
        b2 = backend("b2")
        assert self.policy.decide(REQ, [b1, b2]).action is Action.WAIT

    def test_tenant_cap_makes_it_replace_its_own(self) -> None:
        b1 = backend(
            "b1", slots=4, capacity=4, registered={"mine": 5.0, "theirs": 1.0},
            tenants={"mine": "t1", "theirs": "t2"},
        )  # fmt: skip
        capped = Request("x", "t1", tenant_cap=1)
        assert self.policy.decide(capped, [b1]) == Decision(Action.LOAD, "b1", evict="mine")
        assert self.policy.decide(Request("x", "t1"), [b1]) == Decision(Action.LOAD, "b1")


class TestLruSeatsAndTarget:
    """The rules that keep batches full and each backend near its target T of active adapters."""

    policy = LruPolicy()  # T = 4 of 8 slots

    def test_target_derives_from_slots(self) -> None:
        # Half the slots, but never fewer than 4 (the flat part of the measured cost curve).
        assert [self.policy.target(s) for s in (1, 2, 4, 8, 16)] == [1, 2, 4, 4, 8]
        assert [self.policy.ceiling(s) for s in (1, 2, 4, 8, 16)] == [1, 2, 4, 6, 10]
        assert LruPolicy(target_share=1.0).target(8) == 8
        assert LruPolicy(target_share=3 / 8, target_floor=1).target(8) == 3
        assert RoundRobinPolicy().target(8) == 8

    def test_joins_an_active_adapter_only_where_a_seat_is_free(self) -> None:
        full = backend("b1", slots=8, seats=4, registered={"x": 1.0}, inflight={"x": 4})
        roomy = backend("b2", slots=8, seats=8, registered={"x": 1.0}, inflight={"x": 1, "a": 5})
        assert self.policy.decide(REQ, [full, roomy]) == Decision(Action.USE, "b2")
        # Unknown seats: no seat rule, the least busy holder.
        assert self.policy.decide(REQ, [replace(full, seats=None), roomy]) == Decision(Action.USE, "b1")

    def test_prefers_joining_an_active_copy_to_activating_an_idle_one(self) -> None:
        idle = backend("b1", slots=8, seats=64, registered={"x": 1.0})
        active = backend("b2", slots=8, seats=64, registered={"x": 1.0}, inflight={"x": 10})
        assert self.policy.decide(REQ, [idle, active]) == Decision(Action.USE, "b2")

    def test_full_batches_everywhere_wait_in_the_gateway(self) -> None:
        # Its only holder's batch is full and every other backend's too: WAIT, never queue inside.
        holder = backend("b1", slots=8, seats=2, capacity=8, registered={"x": 1.0}, inflight={"x": 2})
        other = backend("b2", slots=8, seats=2, capacity=8, registered={"a": 1.0}, inflight={"a": 2})
        assert self.policy.decide(REQ, [holder, other]).action is Action.WAIT
        # A free seat and slot elsewhere: a second copy spreads the hot adapter.
        spare = backend("b3", slots=8, seats=2, capacity=8)
        assert self.policy.decide(REQ, [holder, other, spare]) == Decision(Action.LOAD, "b3")

    def test_no_idle_adapter_activated_at_the_target(self) -> None:
        four = {f"a{i}": 1 for i in range(4)}
        at_target = backend("b1", slots=8, capacity=8, registered={"x": 0.5, **dict.fromkeys(four, 1.0)},
                            inflight=four)  # fmt: skip
        assert self.policy.decide(REQ, [at_target]).action is Action.WAIT
        # A load under way counts against the target too.
        three = {f"a{i}": 1 for i in range(3)}
        loading = backend("b1", slots=8, capacity=8, registered={"x": 0.5, **dict.fromkeys(three, 1.0)},
                          inflight=three, loading={"c"})  # fmt: skip
        assert self.policy.decide(REQ, [loading]).action is Action.WAIT
        below = backend("b1", slots=8, capacity=8, registered={"x": 0.5, **dict.fromkeys(three, 1.0)},
                        inflight=three)  # fmt: skip
        assert self.policy.decide(REQ, [below]) == Decision(Action.USE, "b1")

    def test_no_load_beyond_the_target_unless_overfill(self) -> None:
        four = {f"a{i}": 1 for i in range(4)}
        b1 = backend("b1", slots=8, capacity=8, registered=dict.fromkeys(four, 1.0), inflight=four)
        assert self.policy.decide(REQ, [b1]).action is Action.WAIT
        overfill = Request("x", "t1", overfill=True)
        assert self.policy.decide(overfill, [b1]) == Decision(Action.LOAD, "b1")
        # Overfill also ignores a full batch.
        full = backend("b2", slots=8, seats=1, registered={"x": 1.0}, inflight={"x": 1})
        assert self.policy.decide(overfill, [full]) == Decision(Action.USE, "b2")

    def test_waits_at_home_rather_than_load_a_copy(self) -> None:
        four = {f"a{i}": 1 for i in range(4)}
        home = backend("b1", slots=8, capacity=8, registered={"x": 0.5, **dict.fromkeys(four, 1.0)},
                       inflight=four)  # fmt: skip
        empty = backend("b2", slots=8, capacity=8)
        assert self.policy.decide(REQ, [home, empty]).action is Action.WAIT
        # Registered nowhere: loaded on the backend with room.
        assert self.policy.decide(Request("y", "t1"), [home, empty]) == Decision(Action.LOAD, "b2")

    def test_loads_on_the_least_busy_backend_with_room(self) -> None:
        busy = backend("b1", slots=8, seats=64, capacity=8, registered={"a": 1.0}, inflight={"a": 30})
        quiet = backend("b2", slots=8, seats=64, capacity=8, registered={"b": 1.0}, inflight={"b": 3})
        assert self.policy.decide(REQ, [busy, quiet]) == Decision(Action.LOAD, "b2")
        # A backend whose batch is full takes no new adapter, however quiet its slots.
        packed = backend("b3", slots=8, seats=3, capacity=8, registered={"b": 1.0}, inflight={"b": 3})
        assert self.policy.decide(REQ, [busy, packed]) == Decision(Action.LOAD, "b1")

    def test_tenant_cap_and_pins_still_honoured(self) -> None:
        b1 = backend(
            "b1", slots=8, seats=64, capacity=2, registered={"mine": 5.0, "theirs": 1.0},
            tenants={"mine": "t1", "theirs": "t2"},
        )  # fmt: skip
        capped = Request("x", "t1", tenant_cap=1)
        assert self.policy.decide(capped, [b1]) == Decision(Action.LOAD, "b1", evict="mine")
        assert self.policy.decide(Request("x", "t1"), [b1]) == Decision(Action.LOAD, "b1", evict="theirs")
        pinned = Request("x", "t1", pinned=frozenset({"mine"}), tenant_cap=1)
        assert self.policy.decide(pinned, [b1]).action is Action.WAIT


class TestBaselines:
    def test_round_robin_ignores_where_it_lives(self) -> None:
        policy = RoundRobinPolicy()
        b1 = backend("b1", registered={"x": 1.0})
        b2 = backend("b2")
        got = [policy.decide(REQ, [b1, b2]) for _ in range(4)]
        assert [d.backend for d in got] == ["b1", "b2", "b1", "b2"]
        assert got[1].action is Action.LOAD  # loads a second copy rather than use the live one

    def test_random_is_seeded_and_uses_every_backend(self) -> None:
        policy = RandomPolicy(seed=1)
        backends = [backend(f"b{i}") for i in range(4)]
        assert {policy.decide(REQ, backends).backend for _ in range(64)} == {"b0", "b1", "b2", "b3"}

    def test_make_policy(self) -> None:
        assert make_policy("lru").name == "lru"
        assert make_policy("round-robin").prefers_live is False


class TestLruDrain:
    """Draining: an active adapter at a full target gives its slot up to a clearly larger waiting group."""

    policy = LruPolicy(drain_ratio=2.0, drain_min=4)  # target(2) = 2

    def full(self, **kw: object) -> BackendState:
        return backend(
            "b1",
            registered={"x": 1.0, "y": 1.0, "w": 1.0},
            inflight={"x": 2, "y": 5},
            **kw,  # type: ignore[arg-type]
        )

    def test_joins_while_no_larger_group_waits(self) -> None:
        assert self.policy.decide(Request("x", "t1", waiting={"w": 3}), [self.full()]) == Decision(
            Action.USE, "b1"
        )

    def test_drains_for_a_group_at_least_twice_its_size(self) -> None:
        assert self.policy.decide(Request("x", "t1", waiting={"w": 4}), [self.full()]) == Decision(
            Action.WAIT
        )
        # y holds 5: it keeps its slot; the drained adapter's own waiters count as what it holds.
        assert self.policy.decide(Request("y", "t1", waiting={"w": 4}), [self.full()]).action is Action.USE
        assert (
            self.policy.decide(Request("x", "t1", waiting={"w": 4, "x": 1}), [self.full()]).action
            is Action.USE
        )

    def test_no_drain_below_the_target_or_when_overfilled(self) -> None:
        b = backend("b1", slots=4, registered={"x": 1.0, "w": 1.0}, inflight={"x": 1})  # 1 of 3 taken
        assert self.policy.decide(Request("x", "t1", waiting={"w": 9}), [b]).action is Action.USE
        over = Request("x", "t1", overfill=True, waiting={"w": 9})
        assert self.policy.decide(over, [self.full()]).action is Action.USE

    def test_no_drain_for_a_group_that_could_not_take_the_slot(self) -> None:
        other = backend("b2", registered={"w": 1.0})  # w waits at home on b2, not for b1
        b1 = backend("b1", registered={"x": 1.0, "y": 1.0}, inflight={"x": 1, "y": 1})
        assert self.policy.decide(Request("x", "t1", waiting={"w": 9}), [b1, other]).action is Action.USE

    def test_a_free_slot_goes_to_the_larger_group(self) -> None:
        b = backend("b1", registered={"x": 1.0, "w": 1.0, "y": 1.0}, inflight={"y": 1})  # one slot free
        assert self.policy.decide(Request("x", "t1", waiting={"x": 1, "w": 4}), [b]) == Decision(Action.WAIT)
        assert self.policy.decide(Request("x", "t1", waiting={"x": 3, "w": 4}), [b]).action is Action.USE
        assert self.policy.decide(Request("x", "t1"), [b]).action is Action.USE


class TestLruHandover:
    """Matched draining and handover on an 8-slot backend: T = 4, up to 6 slots while adapters drain."""

    policy = LruPolicy(drain_ratio=2.0, drain_min=8)

    def at_target(self, **kw: object) -> BackendState:
        # Four active adapters holding 1, 2, 3 and 20 requests; the claimer "w" registered, idle.
        active = {"a1": 1, "a2": 2, "a3": 3, "hot": 20}
        registered = {**dict.fromkeys(active, 1.0), "w": 0.5, "v": 0.5, "u": 0.5}
        return backend("b1", slots=8, seats=64, capacity=16, registered=registered, inflight=active, **kw)  # type: ignore[arg-type]

    def test_one_claimer_drains_only_the_weakest(self) -> None:
        b = self.at_target()
        waiting = {"w": 10}
        assert self.policy.decide(Request("a1", "t1", waiting=waiting), [b]).action is Action.WAIT
        # a2 (2 held) is also outranked by w (10 >= 2 x 2), but one slot is all w needs: a2 keeps taking.
        assert self.policy.decide(Request("a2", "t1", waiting=waiting), [b]) == Decision(Action.USE, "b1")
        # Two claimers: the two weakest drain, the hot adapter never does.
        two = {"w": 10, "v": 9}
        assert self.policy.decide(Request("a2", "t1", waiting=two), [b]).action is Action.WAIT
        assert self.policy.decide(Request("hot", "t1", waiting=two), [b]).action is Action.USE

    def test_the_claimer_starts_at_once_above_the_target(self) -> None:
        b = self.at_target()
        # a1 drains; w need not wait for its last request: it takes a fifth slot now.
        assert self.policy.decide(Request("w", "t1", waiting={"w": 10}), [b]) == Decision(Action.USE, "b1")
        # A group too small to claim a slot (below drain_min) does not.
        assert self.policy.decide(Request("w", "t1", waiting={"w": 7}), [b]).action is Action.WAIT
        # Nor one that does not outrank the weakest active adapter by drain_ratio.
        stronger = self.at_target()
        stronger.inflight.update({"a1": 5, "a2": 5, "a3": 5})
        assert self.policy.decide(Request("w", "t1", waiting={"w": 9}), [stronger]).action is Action.WAIT

    def test_handover_stops_at_the_ceiling(self) -> None:
        b = self.at_target()
        b.inflight.update({"x1": 9, "x2": 9})  # six slots taken: T + handover
        b.registered.update({"x1": 1.0, "x2": 1.0})
        assert self.policy.decide(Request("w", "t1", waiting={"w": 40}), [b]).action is Action.WAIT

    def test_above_the_target_the_weakest_give_slots_back(self) -> None:
        b = self.at_target()
        b.inflight.update({"a2": 5, "a3": 5, "x1": 9})  # five taken, one above T
        b.registered["x1"] = 1.0
        # While a claimer waits, the weakest beyond T drains even if the claimer does not outrank it ...
        assert self.policy.decide(Request("a1", "t1", waiting={"w": 8}), [b]).action is Action.WAIT
        assert self.policy.decide(Request("a2", "t1", waiting={"w": 8}), [b]).action is Action.USE
        # ... and that slot goes back: it is no handover, the claimer waits.
        assert self.policy.decide(Request("w", "t1", waiting={"w": 8}), [b]).action is Action.WAIT
        # A claimer that outranks the next weakest too drains it, and takes the sixth slot at once.
        assert self.policy.decide(Request("a2", "t1", waiting={"w": 10}), [b]).action is Action.WAIT
        assert self.policy.decide(Request("w", "t1", waiting={"w": 10}), [b]) == Decision(Action.USE, "b1")
        # With nothing large enough waiting, nothing drains.
        assert self.policy.decide(Request("a1", "t1", waiting={"w": 7}), [b]).action is Action.USE

    def test_nothing_waiting_no_slot_above_the_target(self) -> None:
        # decide agrees with the store's touch when nothing waits: an idle adapter waits at T.
        b = self.at_target()
        assert self.policy.decide(Request("w", "t1"), [b]).action is Action.WAIT
        assert self.policy.decide(Request("a1", "t1"), [b]) == Decision(Action.USE, "b1")


class TestPack:
    """PackPolicy: keeps an adapter's requests where it is active, lets vLLM queue what cannot run yet,
    and holds in the gateway only what no backend can hold, or a tenant's share beyond its fair part."""

    policy = PackPolicy()

    def test_joins_where_active_with_a_seat(self) -> None:
        b1 = backend("b1", slots=2, seats=4, registered={"x": 1.0, "y": 1.0}, inflight={"x": 2, "y": 1})
        b2 = backend("b2", slots=2, seats=4)
        assert self.policy.decide(REQ, [b1, b2]) == Decision(Action.USE, "b1")

    def test_a_second_copy_where_a_slot_and_seat_are_free_when_holders_are_full(self) -> None:
        full = backend("b1", slots=2, seats=2, registered={"x": 1.0}, inflight={"x": 2})
        free = backend("b2", slots=2, seats=2)
        assert self.policy.decide(REQ, [full, free]) == Decision(Action.LOAD, "b2")

    def test_queues_in_vllm_rather_than_waiting_when_every_slot_is_busy(self) -> None:
        # Both backends have every slot active: the request goes through to its holder, where vLLM
        # runs it as soon as a slot frees there; the old rule (lru) held it in the gateway.
        others = {"a": "t2", "b": "t2", "c": "t2", "d": "t2"}
        b1 = backend(
            "b1",
            slots=2,
            seats=8,
            registered={"x": 1.0, "a": 2.0, "b": 3.0},
            inflight={"a": 1, "b": 1},
            tenants={"x": "t1", **others},
        )
        b2 = backend(
            "b2", slots=2, seats=8, registered={"c": 1.0, "d": 1.0}, inflight={"c": 1, "d": 1}, tenants=others
        )
        assert self.policy.decide(REQ, [b1, b2]) == Decision(Action.USE, "b1")
        assert LruPolicy().decide(REQ, [b1, b2]).action is Action.WAIT

    def test_waits_only_when_no_backend_can_hold_it(self) -> None:
        busy = backend(
            "b1",
            slots=2,
            capacity=2,
            seats=8,
            registered={"a": 1.0, "b": 1.0},
            inflight={"a": 1, "b": 1},
            tenants={"a": "t2", "b": "t2"},
        )
        assert self.policy.decide(REQ, [busy]).action is Action.WAIT
        idle = backend("b1", slots=2, capacity=2, seats=8, registered={"a": 1.0, "b": 2.0}, inflight={"b": 1})
        assert self.policy.decide(REQ, [idle]) == Decision(Action.LOAD, "b1", "a")

    def test_single_flight_while_a_load_is_under_way(self) -> None:
        b1 = backend("b1", slots=2, seats=8, loading={"x"})
        b2 = backend("b2", slots=2, seats=8)
        assert self.policy.decide(REQ, [b1, b2]).action is Action.WAIT

    @staticmethod
    def _seat_bound(queued: int) -> BackendState:
        """x's holder: both slots active, its 4 seats taken by x, `queued` more requests behind them."""
        return backend(
            "b1", slots=2, seats=4, registered={"x": 1.0, "h": 1.0}, inflight={"x": 3 + queued, "h": 1}
        )

    @staticmethod
    def _slot_bound(registered: dict[str, float]) -> BackendState:
        """Both slots active with one request each, the other two seats idle for want of a slot."""
        return backend(
            "b2",
            slots=2,
            capacity=4,
            seats=4,
            registered={"a": 1.0, "b": 1.0, **registered},
            inflight={"a": 1, "b": 1},
            tenants={"a": "t2", "b": "t3", **dict.fromkeys(registered, "t1")},  # x's tenant has no slot there
        )

    def test_a_whole_batch_queued_at_the_holder_spills_to_a_less_busy_backend(self) -> None:
        # Holder at 8 requests, the other backend at 2 (8 - 2 >= 4 seats): x's copy there serves sooner.
        assert self.policy.decide(REQ, [self._seat_bound(4), self._slot_bound({"x": 1.0})]) == Decision(
            Action.USE, "b2"
        )
        # No copy there: a second copy is loaded, into free capacity.
        assert self.policy.decide(REQ, [self._seat_bound(4), self._slot_bound({})]) == Decision(
            Action.LOAD, "b2"
        )

    def test_less_than_a_batch_of_difference_stays_with_its_running_group(self) -> None:
        # 5 against 2: under a batch apart, joining the holder's running group is the better wait.
        assert self.policy.decide(REQ, [self._seat_bound(1), self._slot_bound({"x": 1.0})]) == Decision(
            Action.USE, "b1"
        )

    def test_no_spill_while_the_pool_is_loading(self) -> None:
        # A second copy needs a load: at the pool's load cap the request joins its holder's queue.
        capped = PackPolicy()
        capped.pool_loads = 1
        b2 = replace(self._slot_bound({}), loading={"z"})
        assert capped.decide(REQ, [self._seat_bound(4), b2]) == Decision(Action.USE, "b1")

    @staticmethod
    def _crowded() -> BackendState:
        """4 slots, all active, 3 of them the greedy tenant's; x (greedy) and y (other) registered, idle."""
        tenants = {"g1": "greedy", "g2": "greedy", "g3": "greedy", "o1": "other", "x": "greedy", "y": "other"}
        return backend(
            "b1",
            slots=4,
            capacity=8,
            seats=64,
            registered=dict.fromkeys(tenants, 1.0),
            inflight={"g1": 3, "g2": 3, "g3": 1, "o1": 1},
            tenants=tenants,
        )

    def test_one_tenants_cold_burst_cannot_take_every_slot(self) -> None:
        # The greedy tenant's share (1/2 of the slots) is used up, so its next cold adapter waits in the
        # gateway; another tenant's cold adapter still queues in vLLM for a slot.
        b = self._crowded()
        assert self.policy.decide(Request("x", "greedy"), [b]).action is Action.WAIT
        assert self.policy.decide(Request("y", "other"), [b]) == Decision(Action.USE, "b1")

    def test_near_its_deadline_a_request_is_not_held_for_fairness(self) -> None:
        b = self._crowded()
        almost = Request("x", "greedy", waited_s=self.policy.urgent_after_s - 0.1)
        assert self.policy.decide(almost, [b]).action is Action.WAIT
        urgent = Request("x", "greedy", waited_s=self.policy.urgent_after_s)
        assert self.policy.decide(urgent, [b]) == Decision(Action.USE, "b1")

    def test_touch_and_decide_agree_with_a_free_slot(self) -> None:
        # The store's hot path (BackendSlots.has_room with T = all slots) takes what steps 1-2 would.
        assert self.policy.target(8) == 8
        slots = BackendSlots("b1", slots=2, capacity=4, seats=4, target=self.policy.target(2))
        assert slots.has_room(mine=0, requests=1, taken=1)
        b = backend("b1", slots=2, capacity=4, seats=4, registered={"x": 1.0, "a": 1.0}, inflight={"a": 1})
        assert self.policy.decide(REQ, [b]) == Decision(Action.USE, "b1")


class TestOneLoadAtATime:
    """vLLM runs a runtime load inside its engine loop and decodes nothing meanwhile: no policy sends a
    backend a second load while one is under way there, nor any load while the pool is at its cap
    (GATEWAY_PLACEMENT_POOL_LOADS, for backends sharing one GPU)."""

    POLICIES = ("pack", "lru", "affinity", "round-robin", "random")

    def test_a_backend_loading_gets_no_second_load(self) -> None:
        for name in self.POLICIES:
            b = backend("b1", slots=4, capacity=8, seats=64, loading={"y"})
            assert make_policy(name).decide(REQ, [b]).action is Action.WAIT, name

    def test_the_load_goes_to_a_backend_that_is_not_loading(self) -> None:
        for name in ("pack", "lru", "round-robin", "random"):  # affinity waits for its home: below
            b1 = backend("b1", slots=4, capacity=8, seats=64, loading={"y"})
            b2 = backend("b2", slots=4, capacity=8, seats=64)
            assert make_policy(name).decide(REQ, [b1, b2]) == Decision(Action.LOAD, "b2"), name

    def test_affinity_waits_for_its_home_rather_than_spilling(self) -> None:
        home, other = sorted(("b1", "b2"), key=lambda b: b != _home("x", ("b1", "b2")))
        loading = backend(home, slots=4, capacity=8, seats=64, loading={"y"})
        free = backend(other, slots=4, capacity=8, seats=64)
        assert AffinityPolicy().decide(REQ, [loading, free]).action is Action.WAIT
        idle = backend(home, slots=4, capacity=8, seats=64)
        assert AffinityPolicy().decide(REQ, [idle, free]) == Decision(Action.LOAD, home)

    def test_at_the_pool_cap_nothing_loads_anywhere(self) -> None:
        for name in self.POLICIES:
            b1 = backend("b1", slots=4, capacity=8, seats=64, loading={"y"})
            b2 = backend("b2", slots=4, capacity=8, seats=64)
            assert make_policy(name, pool_loads=1).decide(REQ, [b1, b2]).action is Action.WAIT, name
            assert make_policy(name, pool_loads=2).decide(REQ, [b1, b2]) == Decision(Action.LOAD, "b2"), name

    def test_the_cap_never_holds_an_adapter_that_is_registered(self) -> None:
        # Only loads wait for the cap: a holder still takes the request (pack queues it in vLLM there).
        b1 = backend(
            "b1",
            slots=1,
            capacity=8,
            seats=64,
            registered={"x": 1.0, "a": 1.0},
            inflight={"a": 2},
            tenants={"x": "t1", "a": "t2"},
        )
        # b2 could take a load (idle, free capacity, no load of its own): only the cap (b3's load) stops
        # it, and the request still goes to its holder.
        b2 = backend("b2", slots=4, capacity=8, seats=64)
        b3 = backend("b3", slots=4, capacity=8, seats=64, loading={"y"})
        assert make_policy("pack").decide(REQ, [b1, b2, b3]) == Decision(Action.LOAD, "b2")
        capped = make_policy("pack", pool_loads=1)
        assert capped.decide(REQ, [b1, b2, b3]) == Decision(Action.USE, "b1")

    def test_the_settings_reach_the_policy(self) -> None:
        from app.main import placement_policy
        from app.settings import Settings

        # _env_file=None and explicit values: the developer's .env or environment cannot decide it.
        default = placement_policy(Settings(_env_file=None, PLACEMENT_POLICY="pack"))  # type: ignore[call-arg]
        assert default.name == "pack" and default.pool_loads is None  # 0 (the default): no cap
        capped = placement_policy(
            Settings(_env_file=None, PLACEMENT_POLICY="affinity", PLACEMENT_POOL_LOADS=1)  # type: ignore[call-arg]
        )
        assert capped.name == "affinity" and capped.pool_loads == 1
        assert Settings.model_fields["PLACEMENT_POLICY"].default == "pack"
        assert Settings.model_fields["PLACEMENT_POOL_LOADS"].default == 0


class TestAffinity:
    policy = AffinityPolicy()

    def test_same_home_every_time_whatever_the_load_elsewhere(self) -> None:
        homes = {
            self.policy.decide(Request(f"a{i}", "t1"), [backend("b1"), backend("b2")]).backend
            for i in range(40)
        }
        assert homes == {"b1", "b2"}  # spread by the hash...
        first = self.policy.decide(Request("a7", "t1"), [backend("b1"), backend("b2")])
        again = self.policy.decide(Request("a7", "t1"), [backend("b2"), backend("b1", inflight={"z": 5})])
        assert first == again  # ...and stable: the order and load of the list do not move it

    def test_spills_to_the_next_backend_when_home_seats_are_full(self) -> None:
        home = self.policy.decide(REQ, [backend("b1"), backend("b2")]).backend
        other = "b2" if home == "b1" else "b1"
        full = backend(home, seats=2, inflight={"z": 2}, registered={"z": 1.0})
        assert self.policy.decide(REQ, [full, backend(other, seats=2)]) == Decision(Action.LOAD, other)

    def test_never_holds_a_request_a_backend_could_take(self) -> None:
        b1 = backend("b1", slots=1, seats=1, registered={"x": 1.0}, inflight={"y": 1})
        b2 = backend("b2", slots=1, seats=1, registered={"x": 1.0}, inflight={"y": 1})
        assert self.policy.decide(REQ, [b1, b2]).action is Action.USE
