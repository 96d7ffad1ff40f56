"""The BES wire format and the throttle gate's decisions, with numbers for time."""

from __future__ import annotations

import json

import pytest

from orchestrator import errors
from orchestrator.backends.bes import protocol, throttle

FINISHED_BODY = {
    "StatusCode": "Finished",
    "Results": {
        "output1": {
            "ConnectionString": None,
            "BaseLocation": "https://acct.blob.core.windows.net/",
            "RelativeLocation": "results/job1/output1.csv",
            "SasBlobToken": "?sv=2021-08-06&sr=b&sp=r&sig=SECRETSIG%3D",
        }
    },
    "Details": None,
}


# ---- status ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("NotStarted", protocol.BesStatus.NOT_STARTED),
        ("running", protocol.BesStatus.RUNNING),
        ("FAILED", protocol.BesStatus.FAILED),
        (3, protocol.BesStatus.CANCELLED),
        (4, protocol.BesStatus.FINISHED),
        (0, protocol.BesStatus.NOT_STARTED),
        ("1", protocol.BesStatus.RUNNING),
    ],
)
def test_status_code_names_and_integers(value: str | int, expected: protocol.BesStatus) -> None:
    assert protocol.parse_status_code(value) is expected


@pytest.mark.parametrize("value", [5, -1, "Done", "", True])
def test_unknown_status_code_is_permanent(value: str | int) -> None:
    with pytest.raises(errors.PermanentError):
        protocol.parse_status_code(value)


def test_parse_finished_status_with_results() -> None:
    report = protocol.parse_status(FINISHED_BODY)
    assert report.status is protocol.BesStatus.FINISHED
    assert report.details == ""
    ref = report.results["output1"]
    assert ref.url == (
        "https://acct.blob.core.windows.net/results/job1/output1.csv"
        "?sv=2021-08-06&sr=b&sp=r&sig=SECRETSIG%3D"
    )
    assert ref.public_url == "https://acct.blob.core.windows.net/results/job1/output1.csv"
    assert ref.connection_string is None
    # The token must not leak through repr/str (a ref in an f-string or a log).
    assert "SECRETSIG" not in repr(ref) and "SECRETSIG" not in str(report)


def test_parse_status_integer_code_null_results_missing_details() -> None:
    report = protocol.parse_status({"StatusCode": 1, "Results": None})
    assert report.status is protocol.BesStatus.RUNNING
    assert report.results == {}
    assert report.details == ""


def test_parse_failed_status_keeps_details() -> None:
    report = protocol.parse_status(
        {"StatusCode": 2, "Results": None, "Details": "Error 0018: Dataset has no rows."}
    )
    assert report.status is protocol.BesStatus.FAILED
    assert report.details == "Error 0018: Dataset has no rows."


def test_result_ref_joins_base_and_relative_with_one_slash() -> None:
    a = protocol.ResultRef(base_location="http://h:1/acct", relative_location="c/b.csv",
                           sas_token="sv=1&sig=x")
    assert a.url == "http://h:1/acct/c/b.csv?sv=1&sig=x"
    b = protocol.ResultRef(base_location="http://h:1/acct/", relative_location="/c/b.csv")
    assert b.url == b.public_url == "http://h:1/acct/c/b.csv"


@pytest.mark.parametrize("body", [None, [], "x", {"Results": {}}])
def test_bad_status_bodies_are_refused(body: object) -> None:
    with pytest.raises(errors.PermanentError):
        protocol.parse_status(body)


def test_parse_job_id() -> None:
    assert protocol.parse_job_id("539d0bc2fde945b6ac986b851d0000f0") == (
        "539d0bc2fde945b6ac986b851d0000f0"
    )
    for bad in (None, 42, "", "../../etc", "a b", {"id": "x"}):
        with pytest.raises(errors.PermanentError):
            protocol.parse_job_id(bad)


# ---- request bodies -------------------------------------------------------------------------


def test_submit_body_multi_input_form_only() -> None:
    cs = "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=k"
    body = protocol.build_submit_body(
        inputs={"input1": protocol.blob_reference_connection_string(cs, "cont", "jobs/j/in/a.csv")},
        outputs={"output1": protocol.blob_reference_sas(
            "https://a.blob.core.windows.net", "cont", "jobs/j/out/output1.csv", "sv=1&sig=s")},
        global_parameters={"Bits": "3"},
    )
    assert set(body) == {"Inputs", "Outputs", "GlobalParameters"}
    assert "Input" not in body
    assert body["Inputs"]["input1"] == {
        "ConnectionString": cs, "RelativeLocation": "/cont/jobs/j/in/a.csv"
    }
    assert body["Outputs"]["output1"] == {
        "BaseLocation": "https://a.blob.core.windows.net/",
        "RelativeLocation": "cont/jobs/j/out/output1.csv",
        "SasBlobToken": "?sv=1&sig=s",
    }
    assert body["GlobalParameters"] == {"Bits": "3"}
    json.dumps(body)  # serialisable as is


def test_submit_body_refuses_output_extension_bes_rejects() -> None:
    with pytest.raises(errors.PermanentError, match="output1"):
        protocol.build_submit_body(
            inputs={"input1": {"ConnectionString": "x", "RelativeLocation": "/c/a.csv"}},
            outputs={"output1": {"ConnectionString": "x", "RelativeLocation": "/c/out.txt"}},
            global_parameters={},
        )


def test_submit_body_needs_an_input() -> None:
    with pytest.raises(errors.PermanentError):
        protocol.build_submit_body(inputs={}, outputs={}, global_parameters={})


# ---- errors ---------------------------------------------------------------------------------


def test_error_nested_details_prefer_specific_code_keep_outer_message() -> None:
    text = json.dumps({"error": {
        "code": "BadArgument", "message": "Invalid argument provided.",
        "details": [{"code": "InvalidInputNames", "message": "Input name 'x' is unknown."}],
    }})
    code, message = protocol.parse_error(400, text)
    assert code == "InvalidInputNames"
    assert message.startswith("Invalid argument provided.")
    assert "Input name 'x' is unknown." in message


def test_error_top_level_details() -> None:
    text = json.dumps({
        "error": {"code": "InvalidOperation", "message": "Cannot start job."},
        "details": [{"code": "CannotStartJob", "message": "Job is not in NotStarted state."}],
    })
    code, message = protocol.parse_error(400, text)
    assert code == "CannotStartJob"
    assert "Cannot start job." in message


def test_error_without_details() -> None:
    assert protocol.parse_error(503, json.dumps(
        {"error": {"code": "ServiceUnavailable", "message": "Busy"}}
    )) == ("ServiceUnavailable", "Busy")


def test_apim_error_body() -> None:
    code, message = protocol.parse_error(
        429, json.dumps({"statusCode": 429, "message": "Rate limit is exceeded. Try again in 5 s."})
    )
    assert code == "TooManyRequests"
    assert message == "Rate limit is exceeded. Try again in 5 s."


@pytest.mark.parametrize(("status", "text", "code"), [
    (502, "<html><body>Bad Gateway</body></html>", "BadGateway"),
    (401, "", "Unauthorized"),
    (599, "[1, 2]", "HTTP599"),
])
def test_non_json_error_bodies(status: int, text: str, code: str) -> None:
    got_code, message = protocol.parse_error(status, text)
    assert got_code == code
    assert message  # never empty


def test_long_error_messages_are_cut() -> None:
    _, message = protocol.parse_error(500, "x" * 5000)
    assert len(message) <= protocol.MAX_MESSAGE_CHARS


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses(status: int) -> None:
    assert protocol.is_transient(status)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413])
def test_permanent_statuses(status: int) -> None:
    assert not protocol.is_transient(status)


def test_parse_retry_after() -> None:
    assert protocol.parse_retry_after("7") == 7.0
    assert protocol.parse_retry_after(" 0.5 ") == 0.5
    assert protocol.parse_retry_after(None) is None
    assert protocol.parse_retry_after("soon") is None
    assert protocol.parse_retry_after("-3") == 0.0
    # HTTP-date form: 1994-11-06 08:49:37 GMT is 784111777 s after the epoch.
    assert protocol.parse_retry_after(
        "Sun, 06 Nov 1994 08:49:37 GMT", now_s=784111777 - 30
    ) == pytest.approx(30.0)


# ---- throttle gate --------------------------------------------------------------------------


def _drive(gate: throttle.ServiceGate, start: float, end: float, step: float) -> list[float]:
    """Offer a call every `step` s of fake time; return the times the gate let calls go."""
    sent: list[float] = []
    t = start
    while t < end:
        if gate.try_acquire(t) == 0.0:
            sent.append(t)
            gate.on_success(t)
        t += step
    return sent


def test_gate_is_open_until_throttled() -> None:
    gate = throttle.ServiceGate(window_s=10.0)
    assert all(gate.try_acquire(t * 0.001) == 0.0 for t in range(1000))
    assert gate.rate_per_s is None


def test_gate_pauses_for_retry_after() -> None:
    gate = throttle.ServiceGate(window_s=10.0)
    gate.on_throttled(5.0, now=100.0)
    assert gate.paused(100.0) and gate.paused(104.9)
    assert gate.try_acquire(101.0) == pytest.approx(4.0)
    assert gate.next_allowed(101.0) == pytest.approx(105.0)
    assert gate.try_acquire(105.0) == 0.0


def test_gate_default_pause_when_no_retry_after() -> None:
    gate = throttle.ServiceGate()
    gate.on_throttled(None, now=10.0)
    assert gate.next_allowed(10.0) == pytest.approx(10.0 + throttle.DEFAULT_RETRY_AFTER_S)


def test_gate_caps_rate_at_what_the_gateway_allowed() -> None:
    # Gateway: 20 calls per 10 s window. We sent 20 good calls in the first 4 s, then a 429
    # with Retry-After 6 s (the window renews at t=10).
    gate = throttle.ServiceGate(window_s=10.0)
    for i in range(20):
        assert gate.try_acquire(i * 0.2) == 0.0
        gate.on_success(i * 0.2)
    gate.on_throttled(6.0, now=4.0)
    assert gate.rate_per_s is not None
    assert gate.rate_per_s <= 2.0  # 20 per 10 s, a little below
    assert gate.rate_per_s >= 1.5
    # Offer a call every 10 ms for the next window: the gateway's allowance is respected.
    sent = _drive(gate, 4.0, 20.0, 0.01)
    assert sent[0] >= 10.0  # nothing during the pause
    in_next_window = [t for t in sent if 10.0 <= t < 20.0]
    assert len(in_next_window) <= 20


def test_gate_many_in_flight_429s_are_one_event() -> None:
    gate = throttle.ServiceGate(window_s=10.0)
    for i in range(10):
        gate.try_acquire(i * 0.1)
        gate.on_success(i * 0.1)
    gate.on_throttled(5.0, now=1.0)
    rate = gate.rate_per_s
    for k in range(50):  # the calls already in flight all come back 429
        gate.on_throttled(5.0, now=1.0 + k * 0.001)
    assert gate.rate_per_s == rate
    assert gate.throttle_count == 51


def test_gate_each_later_throttle_lowers_the_cap() -> None:
    gate = throttle.ServiceGate(window_s=10.0)
    for i in range(50):
        gate.try_acquire(i * 0.1)
        gate.on_success(i * 0.1)
    gate.on_throttled(5.0, now=5.0)
    first = gate.rate_per_s
    assert first is not None
    gate.on_throttled(1.0, now=11.0)  # after the pause: a new event
    assert gate.rate_per_s is not None and gate.rate_per_s <= first * throttle.DECREASE_FACTOR


def test_gate_relaxes_slowly_and_lifts_cap_eventually() -> None:
    gate = throttle.ServiceGate(window_s=10.0)
    for i in range(10):
        gate.try_acquire(i * 1.0)
        gate.on_success(i * 1.0)
    gate.on_throttled(1.0, now=10.0)
    capped = gate.rate_per_s
    assert capped is not None
    gate.on_success(21.0)  # one quiet window later: +10 %
    assert gate.rate_per_s == pytest.approx(capped * 1.1, rel=0.02)
    gate.on_success(21.0 + 10.0 * 200)  # a long quiet time lifts the cap
    assert gate.rate_per_s is None


def test_gate_never_freezes_a_service() -> None:
    gate = throttle.ServiceGate(window_s=10.0)
    gate.on_throttled(1.0, now=0.0)  # throttled before any success
    assert gate.rate_per_s is not None and gate.rate_per_s >= throttle.MIN_RATE_PER_S
    assert gate.next_allowed(1.0) < 1.0 + 1.0 / throttle.MIN_RATE_PER_S + 1e-6


def test_gate_huge_retry_after_is_bounded() -> None:
    gate = throttle.ServiceGate()
    gate.on_throttled(10**9, now=0.0)
    assert gate.paused_until <= throttle.MAX_PAUSE_S


async def test_gate_wait_sleeps_until_pause_ends() -> None:
    gate = throttle.ServiceGate(window_s=1.0)
    now = gate.now()
    gate.on_throttled(0.2, now=now)
    await gate.wait()
    assert gate.now() >= now + 0.2
