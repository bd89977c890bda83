"""Table tests for parsing Kubernetes label selectors and matching them against labels."""

from __future__ import annotations

from typing import Any

import pytest

from meshgress.selectors import (
    MATCH_EVERYTHING,
    LabelSelector,
    Operator,
    Requirement,
    label_key_problem,
    label_value_problem,
    matches,
    parse_label_selector,
)
from meshgress.validation import ValidationError

FIELD = "spec.podSelector"


def selector(doc: Any) -> LabelSelector:
    return parse_label_selector(doc, FIELD)


def in_(key: str, *values: str) -> dict[str, Any]:
    return {"key": key, "operator": "In", "values": list(values)}


def not_in(key: str, *values: str) -> dict[str, Any]:
    return {"key": key, "operator": "NotIn", "values": list(values)}


def exists(key: str) -> dict[str, Any]:
    return {"key": key, "operator": "Exists"}


def does_not_exist(key: str) -> dict[str, Any]:
    return {"key": key, "operator": "DoesNotExist"}


WEB = {"app": "web", "tier": "frontend"}

MATCH_TABLE = [
    pytest.param({}, {}, True, id="empty-selects-no-labels"),
    pytest.param({}, WEB, True, id="empty-selects-anything"),
    pytest.param({"matchLabels": {"app": "web"}}, WEB, True, id="labels-subset"),
    pytest.param({"matchLabels": WEB}, WEB, True, id="labels-exact"),
    pytest.param({"matchLabels": {"app": "api"}}, WEB, False, id="labels-other-value"),
    pytest.param({"matchLabels": {"team": "x"}}, WEB, False, id="labels-key-absent"),
    pytest.param({"matchLabels": {"app": ""}}, {"app": ""}, True, id="labels-empty-value"),
    pytest.param({"matchLabels": {"app": ""}}, {}, False, id="labels-empty-value-absent"),
    pytest.param({"matchExpressions": [in_("app", "web", "api")]}, WEB, True, id="in"),
    pytest.param({"matchExpressions": [in_("app", "api")]}, WEB, False, id="in-other"),
    pytest.param({"matchExpressions": [in_("team", "x")]}, WEB, False, id="in-key-absent"),
    pytest.param({"matchExpressions": [not_in("app", "api")]}, WEB, True, id="not-in"),
    pytest.param({"matchExpressions": [not_in("app", "web")]}, WEB, False, id="not-in-hit"),
    pytest.param(
        {"matchExpressions": [not_in("team", "x")]}, WEB, True, id="not-in-key-absent-matches"
    ),
    pytest.param({"matchExpressions": [exists("app")]}, WEB, True, id="exists"),
    pytest.param({"matchExpressions": [exists("team")]}, WEB, False, id="exists-absent"),
    pytest.param({"matchExpressions": [exists("app")]}, {"app": ""}, True, id="exists-empty-value"),
    pytest.param({"matchExpressions": [does_not_exist("team")]}, WEB, True, id="does-not-exist"),
    pytest.param(
        {"matchExpressions": [does_not_exist("app")]}, WEB, False, id="does-not-exist-present"
    ),
    pytest.param(
        {"matchLabels": {"app": "web"}, "matchExpressions": [not_in("tier", "frontend")]},
        WEB,
        False,
        id="labels-and-expressions-are-anded",
    ),
    pytest.param(
        {"matchExpressions": [exists("app"), in_("tier", "frontend"), does_not_exist("canary")]},
        WEB,
        True,
        id="all-expressions-hold",
    ),
    pytest.param(
        {"matchExpressions": [in_("example.com/team", "billing")]},
        {"example.com/team": "billing"},
        True,
        id="prefixed-key",
    ),
]


@pytest.mark.parametrize(("doc", "labels", "expected"), MATCH_TABLE)
def test_matches(doc: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    assert matches(selector(doc), labels) is expected


def test_empty_and_null_selectors_select_everything() -> None:
    assert selector({}) == MATCH_EVERYTHING
    assert selector(None) == MATCH_EVERYTHING
    assert selector({"matchLabels": None, "matchExpressions": None}) == MATCH_EVERYTHING
    assert selector({"matchLabels": {}, "matchExpressions": []}) == MATCH_EVERYTHING
    assert MATCH_EVERYTHING.is_empty
    assert not selector({"matchLabels": {"a": "b"}}).is_empty


def test_parsed_selector_is_sorted_and_deduplicated() -> None:
    parsed = selector(
        {
            "matchLabels": {"tier": "api", "app": "billing"},
            "matchExpressions": [
                in_("zone", "b", "a", "b"),
                exists("app"),
                exists("app"),
                {"key": "canary", "operator": "DoesNotExist", "values": []},
            ],
        }
    )
    assert parsed == LabelSelector(
        match_labels=(("app", "billing"), ("tier", "api")),
        match_expressions=(
            Requirement("app", Operator.EXISTS),
            Requirement("canary", Operator.DOES_NOT_EXIST),
            Requirement("zone", Operator.IN, ("a", "b")),
        ),
    )


def test_match_expressions_can_be_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_label_selector(
            {"matchExpressions": [exists("a")]}, "spec.nodeSelector", allow_match_expressions=False
        )
    assert str(caught.value) == (
        "spec.nodeSelector.matchExpressions: not supported here; use matchLabels"
    )
    only_labels = parse_label_selector(
        {"matchLabels": {"a": "b"}}, "spec.nodeSelector", allow_match_expressions=False
    )
    assert only_labels == LabelSelector(match_labels=(("a", "b"),))


BAD_SELECTORS = [
    pytest.param(["app"], "spec.podSelector: must be an object, got list", id="not-an-object"),
    pytest.param({1: "x"}, "spec.podSelector: keys must be strings, got integer 1", id="int-key"),
    pytest.param(
        {"matchLabels": {"app": None}},
        'spec.podSelector.matchLabels["app"]: must be a string, got null',
        id="null-label-value",
    ),
    pytest.param(
        {"matchLabels": {"app": "x" * 64}},
        'spec.podSelector.matchLabels["app"]: "' + "x" * 64 + '" is not a valid label value: '
        "must be no more than 63 characters",
        id="label-value-too-long",
    ),
    pytest.param(
        {"matchLabels": {"Example.com/app": "x"}},
        'spec.podSelector.matchLabels: "Example.com/app" is not a valid label key: '
        "prefix part must be a lowercase RFC 1123 subdomain: lowercase alphanumeric "
        "characters, '-' or '.', starting and ending with an alphanumeric character",
        id="uppercase-prefix",
    ),
    pytest.param(
        {"matchExpressions": {"key": "app", "operator": "Exists"}},
        "spec.podSelector.matchExpressions: must be a list, got object",
        id="expressions-not-a-list",
    ),
    pytest.param(
        {"matchExpressions": ["app"]},
        'spec.podSelector.matchExpressions[0]: must be an object, got string "app"',
        id="expression-not-an-object",
    ),
    pytest.param(
        {"matchExpressions": [{"key": "app"}]},
        "spec.podSelector.matchExpressions[0].operator: required",
        id="expression-without-operator",
    ),
    pytest.param(
        {"matchExpressions": [{"key": "app", "operator": "in", "values": ["a"]}]},
        'spec.podSelector.matchExpressions[0].operator: "in" is not one of '
        "In, NotIn, Exists, DoesNotExist",
        id="operator-wrong-case",
    ),
    pytest.param(
        {"matchExpressions": [{"key": "a/b/c", "operator": "Exists"}]},
        'spec.podSelector.matchExpressions[0].key: "a/b/c" is not a valid label key: '
        "must be a name with an optional DNS subdomain prefix and '/'",
        id="key-with-two-slashes",
    ),
    pytest.param(
        {"matchExpressions": [{"key": "app", "operator": "In", "values": "web"}]},
        'spec.podSelector.matchExpressions[0].values: must be a list, got string "web"',
        id="values-not-a-list",
    ),
    pytest.param(
        {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", 7]}]},
        "spec.podSelector.matchExpressions[0].values[1]: must be a string, got integer 7",
        id="value-not-a-string",
    ),
    pytest.param(
        {"matchExpressions": [{"key": "app", "operator": "In", "values": ["-web"]}]},
        'spec.podSelector.matchExpressions[0].values[0]: "-web" is not a valid label value: '
        "must be empty or consist of alphanumeric characters, '-', '_' or '.', and must "
        "start and end with an alphanumeric character",
        id="value-bad-characters",
    ),
    pytest.param(
        {"matchExpressions": [{"key": "app", "operator": "DoesNotExist", "values": ["x"]}]},
        "spec.podSelector.matchExpressions[0].values: must be empty when operator is DoesNotExist",
        id="does-not-exist-with-values",
    ),
]


@pytest.mark.parametrize(("doc", "message"), BAD_SELECTORS)
def test_bad_selector_is_rejected(doc: object, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        selector(doc)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "key",
    [
        "app",
        "a",
        "A_b.c-d9",
        "app.kubernetes.io/name",
        "example.com/x",
        "x" * 63,
        "a" * 253 + "/" + "b" * 63,
    ],
)
def test_valid_label_keys(key: str) -> None:
    assert label_key_problem(key) is None


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        pytest.param("", "name part must not be empty", id="empty"),
        pytest.param("example.com/", "name part must not be empty", id="prefix-only"),
        pytest.param("/app", "prefix part must not be empty", id="empty-prefix"),
        pytest.param("x" * 64, "name part must be no more than 63 characters", id="name-too-long"),
        pytest.param(
            "a" * 254 + "/app",
            "prefix part must be no more than 253 characters",
            id="prefix-too-long",
        ),
        pytest.param(
            "app_",
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
            "start and end with an alphanumeric character",
            id="ends-with-underscore",
        ),
        pytest.param(
            "app\n",
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
            "start and end with an alphanumeric character",
            id="trailing-newline",
        ),
    ],
)
def test_invalid_label_keys(key: str, problem: str) -> None:
    assert label_key_problem(key) == problem


@pytest.mark.parametrize("value", ["", "v1", "x" * 63, "a.b_c-d"])
def test_valid_label_values(value: str) -> None:
    assert label_value_problem(value) is None


@pytest.mark.parametrize("value", ["x" * 64, "-x", "x-", "x y", "x/y", "é"])
def test_invalid_label_values(value: str) -> None:
    assert label_value_problem(value) is not None
