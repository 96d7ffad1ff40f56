"""The batch-endpoint wire format, pure: bodies, job resources, paging, errors."""

from __future__ import annotations

import json

import pytest

from orchestrator.backends.batch_endpoint import protocol


def test_invoke_body_has_one_uri_file_each_way_our_tags_and_only_given_overrides() -> None:
    body = protocol.build_invoke_body(
        input_name="heart_dataset", input_uri=protocol.datastore_uri("ds", "/p/j1/1/in/a.csv"),
        output_name="score", output_uri=protocol.datastore_uri("ds", "p/j1/1/out/predictions.csv"),
        job_id="j1", attempt="1",
        overrides=protocol.Overrides(mini_batch_size=10, max_retries=3, retry_timeout_s=30),
    )
    props = body["properties"]
    assert props["InputData"] == {"heart_dataset": {
        "JobInputType": "UriFile", "Uri": "azureml://datastores/ds/paths/p/j1/1/in/a.csv"}}
    assert props["OutputData"]["score"]["JobOutputType"] == "UriFile"
    assert props["Tags"] == {"bes-orchestrator.job": "j1", "bes-orchestrator.attempt": "1",
                             "bes-orchestrator.job.j1": "1"}  # the key a lookup asks ARM for
    assert props["MiniBatchSize"] == 10
    assert props["RetrySettings"] == {"MaxRetries": 3, "Timeout": "PT30S"}
    assert "Compute" not in props and "ErrorThreshold" not in props


@pytest.mark.parametrize(("word", "state"), [
    ("Preparing", protocol.RemoteState.QUEUED), ("Queued", protocol.RemoteState.QUEUED),
    ("Running", protocol.RemoteState.RUNNING), ("NotResponding", protocol.RemoteState.RUNNING),
    ("Paused", protocol.RemoteState.RUNNING), ("Unknown", protocol.RemoteState.RUNNING),
    ("SomethingNew", protocol.RemoteState.RUNNING), ("Completed", protocol.RemoteState.FINISHED),
    ("Failed", protocol.RemoteState.FAILED), ("Canceled", protocol.RemoteState.CANCELLED),
])
def test_only_completed_failed_and_canceled_are_final(
    word: str, state: protocol.RemoteState
) -> None:
    assert protocol.remote_state(word) is state


TAGS = {"bes-orchestrator.job": "j", "bes-orchestrator.attempt": "2"}


def test_job_resource_in_either_casing() -> None:
    camel = {"name": "batchjob-1", "properties": {
        "status": "Preparing", "tags": TAGS,
        "interactionEndpoints": {"Studio": {"endpoint": "https://ml.azure.com/runs/batchjob-1"}}}}
    pascal = {"name": "batchjob-1", "Properties": {
        "Status": "Preparing", "Tags": TAGS,
        "InteractionEndpoints": {"Studio": {"Endpoint": "https://ml.azure.com/runs/batchjob-1"}}}}
    for body in (camel, pascal):
        job = protocol.parse_job(body)
        assert job.name == "batchjob-1" and job.status == "Preparing"
        assert job.studio_url == "https://ml.azure.com/runs/batchjob-1"
        assert protocol.matches(job, "j", "2") and not protocol.matches(job, "j", "1")


def test_a_job_name_that_is_not_a_plain_token_never_reaches_a_url() -> None:
    with pytest.raises(ValueError):
        protocol.parse_job({"name": "../../subscriptions/x", "properties": {}})


def test_job_pages_skip_foreign_items_and_give_the_next_link() -> None:
    page = {"value": [{"name": "batchjob-1", "properties": {"status": "Running"}}, {"x": 1}],
            "nextLink": "https://management.azure.com/next?skip=1"}
    jobs, nxt = protocol.parse_job_page(page)
    assert [j.name for j in jobs] == ["batchjob-1"]
    assert nxt == "https://management.azure.com/next?skip=1"
    assert protocol.parse_job_page({"value": []}) == ([], None)


def test_next_links_must_stay_on_the_configured_arm_host() -> None:
    base = "https://management.azure.com"
    assert protocol.same_origin("https://management.azure.com/a?b", base)
    assert not protocol.same_origin("https://evil.example/a", base)
    assert not protocol.same_origin("http://management.azure.com/a", base)


def test_errors_from_the_envelope_a_validation_list_or_plain_text() -> None:
    msg = "No valid deployments to route to."
    env = json.dumps({"error": {"code": "UserError", "message": msg}})
    assert protocol.parse_error(400, env) == ("UserError", msg)
    items = [{"PropertyName": "InputData", "ErrorMessage": "must be UriFile",
              "AttemptedValue": "x", "ErrorCode": "Invalid"}]
    env = json.dumps({"error": {"code": "BadRequest",
                                "message": "Validation failed: " + json.dumps(items)}})
    expected = ("BadRequest", "Validation failed: InputData: must be UriFile")
    assert protocol.parse_error(400, env) == expected
    denied = "token denied by policy"
    assert protocol.parse_error(403, denied) == ("HTTP403", denied)


def test_a_401_says_which_audience_each_plane_needs() -> None:
    hint = protocol.wrong_audience_hint(401, "")
    assert "https://ml.azure.com" in hint and "https://management.azure.com" in hint
    assert protocol.wrong_audience_hint(404, "") == ""
