"""Schemathesis against the live server's own `/openapi.json`, with the admin key, so that every
operation runs, admin ones included.

Two passes over every operation: schemathesis's boundary cases (its coverage phase: edge values,
missing and wrong-typed fields, methods the operation does not have; about a thousand today) and
about a thousand cases Hypothesis draws from the schema, valid and invalid. Each response is held
to the schema: no 5xx, a status, content type, headers and body the operation documents, invalid
data refused with a 4xx, declared auth enforced, a 405 with `Allow` for another method, and every
error in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`. Failures are gathered
over the whole pass and reported together, one entry per operation and kind, with a curl command
that reproduces one. After each pass the server must still be healthy and complete a prompt.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from schemathesis import Case, CheckContext, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from server.settings import KeyPolicy
from tests.server.api.live import demo_settings, serving

pytestmark = pytest.mark.slow

ADMIN_KEY = "sk-admin-schemathesis"
USER_KEY = "sk-user-schemathesis"
GENERATED_CASES = 1000  # Hypothesis's cases over all operations and both modes
# Operations the server must document: the tokenizer routes at the root, as vLLM has them.
REQUIRED = {
    "GET /tokenizer_info",
    "POST /tokenize",
    "POST /detokenize",
    "POST /v1/completions",
    "POST /v1/chat/completions",
    "GET /v1/models",
    "GET /health",
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    missing_required_header,
    ignored_auth,
    unsupported_method,
    allow_header_conformance,
]
ERROR_FIELDS = {"message": str, "type": str, "param": (str, type(None)), "code": (str, type(None))}


def openai_error_shape(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx and 5xx is JSON `{"error": {"message", "type", "param", "code"}}`."""
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"a {response.status_code} whose body is not JSON") from None
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict), f"a {response.status_code} without an 'error' object: {body}"
    assert set(error) == set(ERROR_FIELDS), f"error fields {sorted(error)}"
    for name, kind in ERROR_FIELDS.items():
        assert isinstance(error[name], kind), f"error.{name} is {error[name]!r}"
    assert error["message"], "an empty error message"
    return None


@dataclass
class Findings:
    """The cases sent, and the failures grouped by operation, mode and kind with a first example."""

    base_url: str
    session: requests.Session
    cases: int = 0
    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    examples: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def send(self, case: Case, mode: str) -> None:
        self.cases += 1
        try:
            case.call_and_validate(
                base_url=self.base_url,
                session=self.session,
                checks=CHECKS,
                additional_checks=[openai_error_shape],
            )
        except FailureGroup as group:
            for failure in group.exceptions:
                key = (case.operation.label, mode, failure.title)
                self.counts[key] += 1
                if key not in self.examples:
                    curl = case.as_curl_command(base_url=self.base_url)
                    self.examples[key] = f"{failure.message.strip()[:600]}\n    {curl[:600]}"

    def check(self) -> None:
        report = "\n\n".join(
            f"{op} [{mode}] {title} (x{self.counts[(op, mode, title)]})\n    {example}"
            for (op, mode, title), example in self.examples.items()
        )
        failed = sum(self.counts.values())
        assert not failed, f"{failed} failures in {self.cases} cases:\n\n{report}"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = demo_settings(
        tmp_path_factory.mktemp("schemathesis") / "state",
        admin_key=ADMIN_KEY,
        api_keys={USER_KEY: KeyPolicy()},
        # Small limits keep every valid generation short.
        max_tokens_limit=16,
        max_n=2,
        max_prompts=4,
    )
    with serving(settings) as url:
        yield url


@pytest.fixture(scope="module")
def schema(base_url: str) -> Any:
    config = schemathesis.Config.from_dict(
        {
            "headers": {"Authorization": f"Bearer {ADMIN_KEY}"},
            # Reports keep the bodies as sent: the sanitizer hides fields named like `tokens`.
            "output": {"sanitization": {"enabled": False}},
        }
    )
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config)


@pytest.fixture
def findings(base_url: str) -> Iterator[Findings]:
    with requests.Session() as session:
        yield Findings(base_url, session)


def operations(schema: Any) -> list[Any]:
    """Every operation, those without a request body first (their few cases run out early)."""
    ops = [result.ok() for result in schema.get_all_operations()]
    return sorted(ops, key=lambda op: bool(list(op.body)))


def assert_still_serving(base_url: str) -> None:
    with httpx.Client(base_url=base_url, trust_env=False, timeout=30) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        done = client.post(
            "/v1/completions",
            headers={"Authorization": f"Bearer {USER_KEY}"},
            json={"prompt": "The atomic number of Iron is", "max_tokens": 4, "temperature": 0},
        )
        assert done.status_code == 200, done.text
        assert done.json()["choices"][0]["text"]


def test_every_operation_is_documented(schema: Any) -> None:
    ops = operations(schema)
    missing = REQUIRED - {op.label for op in ops}
    assert not missing, f"undocumented: {sorted(missing)}"
    for op in ops:
        if op.method.upper() == "POST":
            assert list(op.body), f"{op.label} documents no request body"
        if "security" in op.definition.raw:
            assert "401" in op.definition.raw["responses"], f"{op.label} documents no 401"


def test_boundary_cases_keep_to_the_schema(schema: Any, base_url: str, findings: Findings) -> None:
    for op in operations(schema):
        for case in schema.iter_coverage_cases(
            op,
            generation_modes=list(GenerationMode),
            generation_config=schema.config.generation_for(operation=op, phase="coverage"),
        ):
            mode = "negative" if case.meta and case.meta.generation.mode.is_negative else "positive"
            findings.send(case, f"coverage, {mode}")
    assert findings.cases >= 5 * len(operations(schema)), f"only {findings.cases} boundary cases"
    findings.check()
    assert_still_serving(base_url)


def fuzz(op: Any, mode: GenerationMode, *, budget: int, findings: Findings) -> None:
    """Send up to `budget` cases Hypothesis draws for `op` in `mode`, derandomized."""

    @hypothesis.settings(
        max_examples=budget,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def generated(case: Case) -> None:
        findings.send(case, mode.value)

    try:
        generated()
    except hypothesis.errors.Unsatisfiable:
        # Nothing invalid can be sent here (no body, a path parameter any string fills).
        if mode is GenerationMode.POSITIVE:
            raise


def test_generated_cases_keep_to_the_schema(schema: Any, base_url: str, findings: Findings) -> None:
    runs = [(op, mode) for op in operations(schema) for mode in GenerationMode]
    for i, (op, mode) in enumerate(runs):
        # Share what is left among the runs still to come: the first ones often run out early.
        budget = max(1, (GENERATED_CASES - findings.cases) // (len(runs) - i))
        fuzz(op, mode, budget=budget, findings=findings)
    assert findings.cases >= GENERATED_CASES * 0.9, f"only {findings.cases} generated cases"
    findings.check()
    assert_still_serving(base_url)
