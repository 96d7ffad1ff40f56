"""`bes-orchestrator emulator`: serve BES, RRS and batch endpoints until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys

import click

from orchestrator import logs
from orchestrator.emulator import models, server
from orchestrator.emulator import options as options_mod

_PROB = click.FloatRange(0.0, 1.0)


@click.command("emulator")
@click.option("--host", default=options_mod.DEFAULT_HOST, show_default=True,
              help="Address to listen on.")
@click.option("--port", default=options_mod.DEFAULT_PORT, type=click.IntRange(0, 65535),
              show_default=True, help="Port; 0 picks a free one (printed on start).")
@click.option("--seed", type=int, default=None, help="Seed for every simulated random choice.")
@click.option("--model", "default_model", default=options_mod.DEFAULT_MODEL, show_default=True,
              type=click.Choice(sorted(models.REGISTRY)),
              help="Model for services not named by --service.")
@click.option("--service", "services", multiple=True, metavar="NAME=MODEL",
              help="Bind a service name to a model (repeatable). Models: "
                   + ", ".join(sorted(models.REGISTRY)) + ".")
@click.option("--inputs", default="input1", show_default=True,
              help="Comma-separated input names the services take.")
@click.option("--outputs", default="output1", show_default=True,
              help="Comma-separated output names the services write.")
@click.option("--global-parameters", default=None,
              help="Comma-separated global parameter names swagger.json lists and submit "
                   "accepts (default: the model's own, e.g. 'Hashing bitsize,N-grams,"
                   "Target column').")
@click.option("--api-key", default=None, envvar="BES_EMULATOR_API_KEY",
              help="Require 'Authorization: Bearer KEY' (401 otherwise). "
                   "Env: BES_EMULATOR_API_KEY.")
@click.option("--apim-key", default=None, envvar="BES_EMULATOR_APIM_KEY",
              help="Act as API Management: require header Ocp-Apim-Subscription-Key "
                   "(401 otherwise). Env: BES_EMULATOR_APIM_KEY.")
@click.option("--rate-limit", default=None, metavar="N/Ss",
              help="Gateway rate limit, e.g. 100/1s: calls over it get 429 + Retry-After.")
@click.option("--quota", default=None, metavar="N/Ss",
              help="Gateway call quota, e.g. 10000/3600s: calls over it get 403 + Retry-After.")
@click.option("--queue-delay-s", default="0",
              metavar="MIN[,MAX]", help="Seconds a started job stays NotStarted.")
@click.option("--run-time-s", default="0", metavar="MIN[,MAX]",
              help="Seconds a job stays Running (at least the real scoring time).")
@click.option("--failure-rate", type=_PROB, default=0.0,
              help="Fraction of jobs that end Failed with --failure-details.")
@click.option("--failure-details", default=options_mod.DEFAULT_FAILURE_DETAILS,
              help="Details text of simulated failures.")
@click.option("--max-running", type=click.IntRange(0), default=0,
              help="Jobs running at once; others wait FIFO in NotStarted (0: no limit).")
@click.option("--error-503-rate", type=_PROB, default=0.0,
              help="Fraction of service calls answered 503 ServiceUnavailable "
                   "(TooManyConcurrentRequests / RequestThrottled) with Retry-After.")
@click.option("--retry-after-s", type=click.IntRange(1), default=1, show_default=True,
              help="Retry-After seconds sent with simulated 503s.")
@click.option("--drop-rate", type=_PROB, default=0.0,
              help="Fraction of calls whose connection is closed without a response; half of "
                   "them after the call took effect (e.g. a start whose 204 is lost).")
@click.option("--slow-response-s", default="0",
              metavar="MIN[,MAX]", help="Delay before each answer.")
@click.option("--int-status", is_flag=True, help="Send StatusCode as an integer 0..4.")
@click.option("--sas-lifetime-s", type=click.FloatRange(min=1), default=86400.0,
              show_default=True, help="Lifetime of the read SAS tokens in Results.")
@click.option("--identity-header", default=None, envvar="BES_EMULATOR_IDENTITY_HEADER",
              help="Batch endpoints: the managed-identity secret clients send as "
                   "X-IDENTITY-HEADER (their IDENTITY_HEADER); unset: any value is accepted. "
                   "Env: BES_EMULATOR_IDENTITY_HEADER.")
@click.option("--token-lifetime-s", type=float, default=options_mod.DEFAULT_TOKEN_LIFETIME_S,
              show_default=True, help="Lifetime of the tokens GET /msi/token issues.")
@click.option("--be-deployment", "be_deployments", multiple=True, metavar="NAME=MODEL",
              help="A deployment every batch endpoint has (repeatable; default "
                   f"'{options_mod.DEFAULT_DEPLOYMENT}={options_mod.DEFAULT_MODEL}').")
@click.option("--be-default-deployment", default=None, metavar="NAME",
              help="The endpoints' default deployment (default: the first --be-deployment).")
@click.option("--be-no-default-deployment", is_flag=True,
              help="Endpoints have no default deployment: an invoke must name one.")
@click.option("--be-workspace-id", default=None, metavar="ARM_ID",
              help="Serve only this workspace (/subscriptions/../workspaces/NAME); "
                   "default: any workspace path.")
@click.option("--be-datastore", default=options_mod.DEFAULT_DATASTORE, show_default=True,
              help="The Blob datastore batch jobs read and write through.")
@click.option("--be-account-name", default=None,
              help="The datastore's account (default: the AccountName of the storage "
                   "connection string).")
@click.option("--be-container", default=options_mod.DEFAULT_BE_CONTAINER, show_default=True,
              help="The datastore's container.")
@click.option("--be-storage-connection-string", default=None,
              envvar="BES_EMULATOR_BE_STORAGE",
              help="How the emulator reads and writes the datastore's blobs (better through "
                   "the env: BES_EMULATOR_BE_STORAGE).")
@click.option("--prepare-s", default="0", metavar="MIN[,MAX]",
              help="Seconds a batch job stays Preparing.")
@click.option("--finalize-s", default="0", metavar="MIN[,MAX]",
              help="Seconds a batch job stays Finalizing.")
@click.option("--cancel-s", default="0.2", metavar="MIN[,MAX]", show_default=True,
              help="Seconds a batch job stays CancelRequested.")
@click.option("--not-responding-rate", type=_PROB, default=0.0,
              help="Fraction of batch jobs that detour through NotResponding while running.")
@click.option("--not-responding-s", default="1", metavar="MIN[,MAX]", show_default=True,
              help="Length of a NotResponding detour.")
@click.option("--arm-reads", default=options_mod.DEFAULT_ARM_READS, show_default=True,
              metavar="CAPACITY/REFILL_PER_S",
              help="ARM read token bucket; empty -> 429 + Retry-After. 'off': no limit.")
@click.option("--arm-writes", default=options_mod.DEFAULT_ARM_WRITES, show_default=True,
              metavar="CAPACITY/REFILL_PER_S", help="ARM write (cancel) token bucket.")
@click.option("--arm-page-size", type=click.IntRange(1), default=options_mod.DEFAULT_ARM_PAGE_SIZE,
              show_default=True, help="Jobs per page of an ARM job list (then nextLink).")
@click.option("--invoke-201", is_flag=True,
              help="Answer a successful batch invoke 201 Created instead of 200.")
@click.option("--invoke-denied-rate", type=_PROB, default=0.0,
              help="Fraction of batch invokes refused 403 with a plain-text body "
                   "('Token denied by policy.').")
def emulator_command(**kwargs: object) -> None:
    """Serve the Azure ML BES protocol and RRS, and Azure ML batch endpoints (a managed-identity
    token endpoint, the scoring plane and the ARM plane), on HOST:PORT for development, demos,
    tests and benchmarks. Jobs really run: inputs are read and outputs written through the
    storage references in each request (Azurite or any account). docs/emulator.md lists the
    URLs and knobs.

    Prints `emulator listening on http://HOST:PORT` once it accepts connections.
    Introspection: GET /_emulator/stats, GET /_emulator/jobs/{id},
    GET /_emulator/batch/jobs/{name}, POST /_emulator/config.
    """
    values = dict(kwargs)
    # Repeatable options arrive as tuples; an empty one means "the default".
    for key in ("be_deployments",):
        if not values[key]:
            values.pop(key)
    if values.pop("be_no_default_deployment"):
        values["be_default_deployment"] = None
    elif values["be_default_deployment"] is None:
        # The first deployment named, as a one-deployment endpoint routes everything to it.
        named = kwargs["be_deployments"]
        first = str(named[0]).partition("=")[0].strip() if isinstance(named, tuple) and named \
            else options_mod.DEFAULT_DEPLOYMENT
        values["be_default_deployment"] = first
    try:
        opts = options_mod.build(values)
    except options_mod.OptionError as exc:
        raise click.UsageError(str(exc)) from None
    logs.configure()
    logs.register_secrets([k for k in (opts.secret(name) for name in options_mod.SECRET_KNOBS)
                           if k])
    asyncio.run(_serve(opts))


async def _serve(opts: options_mod.EmulatorOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server.running(opts) as base_url:
        sys.stdout.write(f"emulator listening on {base_url}\n")
        sys.stdout.flush()
        await stop.wait()
