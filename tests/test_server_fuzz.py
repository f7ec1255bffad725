"""The real `histosearch serve` process under a property-based client (schemathesis) driven by
its own OpenAPI schema, and the connection a client keeps across refused requests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, StopReason, events

from histosearch.bench.serve import running_server

TOKEN = "fuzz-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FUZZ_SECONDS = 40
# A schema-valid search may still be refused for what no schema states: the upload's bytes
# (unreadable 400, too large 413, no image suffix 415) or options this archive cannot answer
# (a region with no tile, a `where` on an unknown column: 400).
SEARCH_REFUSALS = ["2XX", 400, 401, 404, 413, 415]


@pytest.fixture(scope="module")
def server(served_archive: Path) -> Iterator[str]:
    """The base URL of a real server over the shared archive, with a token and a 1 MB cap."""
    with running_server(served_archive, "--token", TOKEN, "--max-upload-mb", "1") as (url, _):
        yield url


def test_the_fuzzer_finds_no_server_error_and_no_schema_violation(server: str) -> None:
    """Every phase (examples, coverage, fuzzing, stateful) over every operation, with every
    default check, for FUZZ_SECONDS."""
    config = SchemathesisConfig.from_dict(
        {
            "seed": 18,
            "max-time": FUZZ_SECONDS,
            "headers": AUTH,
            "request-timeout": 60,
            "generation": {"max-examples": 10},
            "operations": [
                {
                    "include-path": "/api/search",
                    "include-method": "POST",
                    "checks": {"positive_data_acceptance": {"expected-statuses": SEARCH_REFUSALS}},
                }
            ],
        }
    )
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json", config=config)
    operations = {result.ok().label for result in schema.get_all_operations()}
    fuzzed: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures, errors = [], []
    finished = None
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for interaction in event.recorder.interactions.values():
                if event.phase == "fuzzing":
                    fuzzed[event.recorder.label] += 1
                if interaction.response is not None:
                    statuses[interaction.response.status_code] += 1
            for checks in event.recorder.checks.values():
                failures += [
                    f"{event.recorder.label} {check.name}: {check.failure_info.failure.message}\n"
                    f"{check.failure_info.code_sample}"
                    for check in checks
                    if check.status == Status.FAILURE and check.failure_info is not None
                ]
        elif isinstance(event, events.NonFatalError | events.FatalError):
            errors.append(repr(event))
        elif isinstance(event, events.EngineFinished):
            finished = event
    assert not failures, "\n\n".join(dict.fromkeys(failures))
    assert not errors
    assert finished is not None and not finished.failures
    assert finished.stop_reason in (StopReason.COMPLETED, StopReason.MAX_TIME)
    assert {"POST /api/search", "POST /api/feedback", "GET /slides/{slide_id}.dzi"} <= operations
    assert set(fuzzed) == operations, f"not fuzzed in {FUZZ_SECONDS} s: {operations - set(fuzzed)}"
    assert sum(statuses.values()) > 300 and not [s for s in statuses if s >= 500]
    print(f"{sum(statuses.values())} requests, statuses {sorted(statuses.items())}")
    assert httpx.get(f"{server}/api/health", headers=AUTH).status_code == 200
