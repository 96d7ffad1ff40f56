"""Secrets never survive redaction: known values and secret-shaped values alike."""

from __future__ import annotations

from orchestrator import azurite, redact

SAS_URL = (
    "https://acct.blob.core.windows.net/c/out.csv"
    "?sv=2021-08-06&se=2030-01-01T00%3A00%3A00Z&sp=r&sig=AbCdEf%2Bghij%3D&sr=b"
)


def test_known_secret_values_are_masked() -> None:
    text = "calling with key s3cretApiKey-123 and again s3cretApiKey-123"
    out = redact.redact(text, ["s3cretApiKey-123"])
    assert "s3cretApiKey-123" not in out
    assert out.count("***") == 2


def test_short_or_empty_secrets_do_not_mask_ordinary_text() -> None:
    assert redact.redact("a job failed", ["", "a", "job"]) == "a job failed"


def test_longer_secret_masked_whole_when_it_contains_a_shorter_one() -> None:
    out = redact.redact("token=abcdef123456", ["abcdef", "abcdef123456"])
    assert out == "token=***"


def test_sas_signature_masked_but_rest_of_url_kept() -> None:
    out = redact.redact(f"GET {SAS_URL} failed")
    assert "AbCdEf" not in out
    assert "sig=***" in out
    assert "sp=r" in out and "acct.blob.core.windows.net/c/out.csv" in out


def test_url_encoded_sig_is_masked() -> None:
    out = redact.redact("next=https%3A%2F%2Fx%2Fb%3Fsv%3D1%26sig%3DSECRETSIG%26sp%3Dr")
    assert "SECRETSIG" not in out


def test_account_key_in_connection_string_masked() -> None:
    cs = azurite.connection_string("127.0.0.1", 10000)
    out = redact.redact(f"bad connection string {cs}")
    assert azurite.ACCOUNT_KEY not in out
    assert "AccountKey=***" in out
    assert "AccountName=devstoreaccount1" in out


def test_shared_access_signature_bearer_and_apim_key_masked() -> None:
    text = (
        "SharedAccessSignature=sv=2020&sig=zzz;BlobEndpoint=https://a "
        "Authorization: Bearer eyJhbGciOi.payload.sig "
        '{"Ocp-Apim-Subscription-Key": "0123456789abcdef"}'
    )
    out = redact.redact(text)
    assert "zzz" not in out
    assert "eyJhbGciOi" not in out
    assert "0123456789abcdef" not in out
    assert "Bearer ***" in out


def test_redact_url_keeps_location_and_masks_sig() -> None:
    out = redact.redact_url(SAS_URL)
    assert out.startswith("https://acct.blob.core.windows.net/c/out.csv?")
    assert "sig=***" in out
    assert "AbCdEf" not in out
    assert "sv=2021-08-06" in out


def test_redact_url_masks_password_in_userinfo() -> None:
    out = redact.redact_url("postgresql://user:hunter2pw@db:5432/x")
    assert "hunter2pw" not in out
    assert out.startswith("postgresql://user:***@db:5432/x")


def test_redact_url_without_query_unchanged() -> None:
    url = "http://127.0.0.1:10000/devstoreaccount1/c/b.csv"
    assert redact.redact_url(url) == url


def _every_pattern(text: str) -> str:
    """The patterns applied with no shortcut: what `redact` must equal."""
    for pattern in redact._PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + redact.MASK, text)
    return text


def test_the_quick_check_never_skips_a_secret_shaped_value() -> None:
    # `redact` returns text without any trigger word unscanned; every spelling a pattern
    # accepts (its case-insensitive flag included) must still be masked.
    shapes = [
        "?sv=1&sig=AbC%2Bd&se=2", "?SIG=AbCd", "&Sig=x1", "%26sig%3DAbCd%2B", "%26SIG%3dAbCd",
        "AccountKey=abc/def==;", "ACCOUNTKEY=abc", "accountkey=abc", "SharedAccessSignature=sv=1",
        "sharedaccesssignature=x", "Authorization: Bearer eyJ0.eyJ1.c2ln", "BEARER\tabc.def",
        "bearer  abc", "Ocp-Apim-Subscription-Key: 0123456789", "OCP-APIM-SUBSCRIPTION-KEY='k1'",
        'ocp-apim-subscription-key": "k2"', "design=fine", "a signature", "no secret here",
        "claimed /in/f-000123.csv", "",
    ]
    for shape in shapes:
        for text in (shape, f"before {shape} after", shape.upper(), shape.lower()):
            assert redact.redact(text) == _every_pattern(text), text
    assert redact.redact("x AccountKey=abc") == "x AccountKey=***"
