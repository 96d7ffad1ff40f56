"""`[services.NAME]`: one model per backend `kind`, sharing limits, timeouts and policies."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic

from orchestrator.config import core
from orchestrator.storage import naming

DEFAULT_MAX_IN_FLIGHT = 20
DEFAULT_JOB_TIMEOUT_S = 24 * 3600.0
DEFAULT_OUTPUT_EXTENSION = ".csv"
#: Text in a failed BES job's Details that means the environment failed, not the input: such
#: a job is submitted again (up to max_resubmits) instead of failing. Case-insensitive.
DEFAULT_RESUBMIT_ON = (
    "cannot reach storage",  # the emulator, storage unreachable while the job ran
    "Unable to connect to the remote server",  # Azure ML classic, storage or network down
    "The remote server returned an error: (503)",
    "The remote server returned an error: (500)",
    "Operation could not be completed within the specified time",  # storage timeout
)
DEFAULT_MAX_RESUBMITS = 3
KINDS = ("bes", "rrs", "batch_endpoint")

_WORKSPACE_ID_RE = re.compile(
    r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/"
    r"Microsoft\.MachineLearningServices/workspaces/[^/]+", re.IGNORECASE)


def _check_workspace_id(value: str) -> str:
    if not _WORKSPACE_ID_RE.fullmatch(value):
        raise ValueError("must be the workspace's ARM id: /subscriptions/<id>/resourceGroups/"
                         "<group>/providers/Microsoft.MachineLearningServices/workspaces/<name>")
    return value


class PollPolicy(core.Model):
    """Exponential backoff for status polls: initial, ×multiplier each poll, capped, jittered.

    The defaults poll a 120 s job 14 times and see its end within 3 % of its run time
    (bench/polls.py); a steeper multiplier saves calls but sees long jobs' ends later."""

    initial_s: float = pydantic.Field(default=5.0, ge=0.01)
    multiplier: float = pydantic.Field(default=1.1, ge=1.0)
    max_s: float = pydantic.Field(default=30.0, ge=0.01)
    #: ± fraction of the delay, so thousands of jobs do not poll in step
    jitter: float = pydantic.Field(default=0.1, ge=0.0, lt=1.0)


class RetryPolicy(core.Model):
    """Backoff for transient errors (5xx, timeouts, dropped connections, storage down)."""

    initial_s: float = pydantic.Field(default=1.0, ge=0.01)
    multiplier: float = pydantic.Field(default=2.0, ge=1.0)
    max_s: float = pydantic.Field(default=60.0, ge=0.01)
    max_attempts: int = pydantic.Field(default=0, ge=0)  #: 0: retry transient errors forever


CredentialType = Literal["default", "managed_identity", "client_secret", "azure_cli",
                         "workload_identity", "environment"]


class CredentialConfig(core.Model):
    """Which azure-identity credential gets Entra ID tokens, and its options."""

    type: CredentialType = "default"
    client_id: core.Text | None = None  #: a user-assigned identity's or an app registration's id
    tenant_id: core.Text | None = None
    client_secret: core.Secret | None = None  #: type "client_secret" only
    token_file_path: core.ConfigPath | None = None  #: type "workload_identity" only
    authority: core.Text | None = None  #: e.g. login.microsoftonline.us; default: public cloud

    @pydantic.model_validator(mode="after")
    def _options_fit_type(self) -> CredentialConfig:
        if self.type == "client_secret":
            for key in ("tenant_id", "client_id"):
                if getattr(self, key) is None:
                    raise core.key_error(key, 'is required with type = "client_secret"')
            if self.client_secret is None:
                raise core.key_error("client_secret_env", 'is required with type = "client_secret"'
                                                      " (or _file/_credential)")
        elif self.client_secret is not None:
            raise core.key_error("client_secret", 'is only used with type = "client_secret"')
        if self.token_file_path is not None and self.type != "workload_identity":
            raise core.key_error("token_file_path", 'is only used with type = "workload_identity"')
        if self.type in ("environment", "azure_cli") and self.client_id is not None:
            raise core.key_error("client_id", f'is not used with type = "{self.type}"')
        return self


class ServiceBase(core.Model):
    """What every backend has: limits, timeouts, poll and retry policies, result folders."""

    name: core.Text
    kind: str
    max_in_flight: core.Positive = DEFAULT_MAX_IN_FLIGHT  #: remote jobs submitted and not yet ended
    job_timeout_s: float = pydantic.Field(default=DEFAULT_JOB_TIMEOUT_S, ge=1.0)
    request_timeout_s: float = pydantic.Field(default=60.0, ge=0.1)  #: one HTTP call
    poll: PollPolicy = PollPolicy()
    retry: RetryPolicy = RetryPolicy()
    #: A remote job that fails with one of these in its details failed because of its
    #: environment, not its input: it is submitted again, up to max_resubmits times.
    resubmit_on: Annotated[tuple[core.Text, ...], pydantic.Field(strict=False)] = (
        DEFAULT_RESUBMIT_ON)
    max_resubmits: int = pydantic.Field(default=DEFAULT_MAX_RESUBMITS, ge=0)
    #: Where results of queue-table jobs for this service go (watches name their own).
    output_dir: core.ConfigPath
    archive_dir: core.ConfigPath
    failed_dir: core.ConfigPath


def _outputs(value: Any) -> Any:
    if isinstance(value, list):
        value = {str(n): DEFAULT_OUTPUT_EXTENSION for n in value}
    if not isinstance(value, dict) or not value:
        raise ValueError("must be a table of output name = extension")
    out: dict[str, str] = {}
    for n, ext in value.items():
        if not isinstance(ext, str) or ext.lower() not in naming.OUTPUT_EXTENSIONS:
            raise core.key_error(str(n), f"extension must be one of {naming.OUTPUT_EXTENSIONS}")
        if not str(n) or "/" in str(n) or "\\" in str(n) or str(n).startswith("."):
            raise core.key_error(str(n), "is not a usable output name")
        out[str(n)] = ext.lower()
    return out


class BesService(ServiceBase):
    """A classic Azure ML web service driven through its batch execution service (BES)."""

    kind: Literal["bes"] = "bes"
    base_url: core.WebUrl  #: up to and excluding /workspaces/…, or an APIM gateway base
    workspace: core.Text
    service: core.Text
    api_key: core.Secret
    apim_key: core.Secret | None = None
    input_name: core.Text = "input1"
    #: Other inputs the service needs, bound to fixed blobs: name -> "container/blob.csv".
    extra_inputs: core.StrMap = pydantic.Field(default_factory=dict)
    #: Output name -> extension of the result file and blob.
    outputs: Annotated[dict[str, str], pydantic.BeforeValidator(_outputs)] = pydantic.Field(
        default_factory=lambda: {"output1": DEFAULT_OUTPUT_EXTENSION})
    global_parameters: core.StrMap = pydantic.Field(default_factory=dict)

    @property
    def jobs_url(self) -> str:
        return (
            f"{self.base_url.rstrip('/')}/workspaces/{self.workspace}/services/{self.service}/jobs"
        )


class RrsService(ServiceBase):
    """The same web service's request-response endpoint: small files only, no blob storage."""

    kind: Literal["rrs"] = "rrs"
    #: Either base_url + workspace + service (as for BES), or url: the full execute URL.
    base_url: core.WebUrl | None = None
    workspace: core.Text | None = None
    service: core.Text | None = None
    url: core.WebUrl | None = None
    api_key: core.Secret
    apim_key: core.Secret | None = None
    input_name: core.Text = "input1"
    output_name: core.FileName = "output1"
    global_parameters: core.StrMap = pydantic.Field(default_factory=dict)
    #: A file over either limit fails, telling the user to use kind = "bes".
    max_rows: core.Positive = 1000
    max_bytes: core.Positive = 1024 * 1024

    @pydantic.model_validator(mode="after")
    def _one_address(self) -> RrsService:
        parts = {"base_url": self.base_url, "workspace": self.workspace, "service": self.service}
        if self.url is not None:
            for key, value in parts.items():
                if value is not None:
                    raise core.key_error(key, "give either url or base_url, workspace and service")
        else:
            for key, value in parts.items():
                if value is None:
                    raise core.key_error(key, "is required (or url: the full execute URL)")
        return self

    @property
    def execute_url(self) -> str:
        """Without its query: the client adds api-version=2.0&details=true."""
        if self.url is not None:
            return self.url.split("?", 1)[0]
        assert self.base_url is not None
        return (f"{self.base_url.rstrip('/')}/workspaces/{self.workspace}/services/"
                f"{self.service}/execute")

    @property
    def outputs(self) -> dict[str, str]:
        return {self.output_name: DEFAULT_OUTPUT_EXTENSION}


class BatchEndpointService(ServiceBase):
    """An Azure Machine Learning batch endpoint: invoke on its scoring URI, control via ARM."""

    kind: Literal["batch_endpoint"] = "batch_endpoint"
    scoring_uri: core.WebUrl
    deployment: core.Text | None = None  #: default: the endpoint's default deployment
    workspace_id: Annotated[str, pydantic.AfterValidator(_check_workspace_id)]
    arm_url: core.WebUrl = "https://management.azure.com"
    api_version: core.Text = "2024-04-01"
    datastore: core.Text = "workspaceblobstore"  #: a Blob datastore on the [storage] account
    path_prefix: core.Text = "bes-orchestrator"  #: <prefix>/<job id>/<attempt>/in|out/ in it
    input_name: core.Text = "input_data"
    output_name: core.FileName = "score"
    output_file: core.FileName = "predictions.csv"
    mini_batch_size: core.Positive | None = None
    instance_count: core.Positive | None = None
    #: Failed mini-batches tolerated; -1: any number.
    error_threshold: int | None = pydantic.Field(default=None, ge=-1)
    max_retries: int | None = pydantic.Field(default=None, ge=0)
    retry_timeout_s: core.Positive | None = None
    #: ARM reads per second shared by every batch-endpoint service of one subscription.
    arm_reads_per_s: float = pydantic.Field(default=20.0, gt=0.0)
    #: After an invoke whose answer was lost, a tag lookup that finds no job is believed only
    #: this long after the invoke (ARM may list a new job late); until then nothing is invoked.
    invoke_lookup_grace_s: float = pydantic.Field(default=60.0, ge=0.0)
    credential: CredentialConfig = CredentialConfig()

    @property
    def subscription_id(self) -> str:
        return self.workspace_id.split("/")[2]

    @property
    def workspace_url(self) -> str:
        """The workspace on ARM, without a query: `{workspace_url}/jobs/{name}?api-version=…`."""
        return f"{self.arm_url.rstrip('/')}{self.workspace_id}"

    @property
    def outputs(self) -> dict[str, str]:
        return {self.output_name: Path(self.output_file).suffix.lower()}


def _service_kind(value: Any) -> Any:
    if isinstance(value, dict):
        return value.get("kind", "bes")
    return getattr(value, "kind", None)


ServiceConfig = Annotated[
    Annotated[BesService, pydantic.Tag("bes")]
    | Annotated[RrsService, pydantic.Tag("rrs")]
    | Annotated[BatchEndpointService, pydantic.Tag("batch_endpoint")],
    pydantic.Discriminator(_service_kind),
]
