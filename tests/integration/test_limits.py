"""Limits hold across replicas: four gateway processes on one Redis, clients spread over them
(bench/limits.py with smaller numbers). The upstream is the bench's fake vLLM, which answers at once: the
point is the gateways' counting under concurrency, which vLLM's CPU build could not feed fast enough."""

from __future__ import annotations

from bench import limits as bench
from tests.integration.fleet import REDIS_URL


def test_four_replicas_admit_the_limit_exactly_and_leave_other_tenants_alone() -> None:
    args = bench.parse_args(
        [
            "--replicas", "4", "--clients", "60", "--seconds", "6",
            "--requests-per-minute", "150", "--tokens-per-minute", "6000", "--max-tokens", "16",
            "--redis", REDIS_URL, "--cache-ttl", "1",
        ]
    )  # fmt: skip
    ran = bench.run(args)
    print("\n" + bench.render(ran, args))  # noqa: T201
    results = {r.phase: r.as_dict() for r in ran}
    requests, tokens = results["requests"], results["tokens"]
    # Demand far above the limit (every client asks again at once), spread over four processes.
    assert requests["capped_refused"] > requests["capped_accepted"]
    assert abs(requests["capped_accepted"] - 150) <= 1.5  # within 1% of N
    assert requests["capped_other"] == 0 and tokens["capped_other"] == 0
    # Tokens served never exceed the limit by more than one request's reservation.
    assert tokens["capped_refused"] > 0
    assert tokens["capped_tokens_served"] <= 6000 + bench.reservation(16)
    assert tokens["capped_tokens_served"] >= 6000 * 0.8  # settlement gave the unused reservations back
    # The tenant without limits, on the same gateways at the same time, was never refused.
    for phase in (requests, tokens):
        assert phase["free_refused"] == 0 and phase["free_accepted"] > 0
