"""`bes-orchestrator emulator`: serve the BES emulator until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys

import click

from orchestrator import logs
from orchestrator.emulator import models, server
from orchestrator.emulator import options as options_mod


def _range(name: str) -> click.types.FuncParamType[str, tuple[float, float]]:
    def convert(value: str) -> tuple[float, float]:
        try:
            return options_mod.parse_range(value, name=name)
        except options_mod.OptionError as exc:
            raise click.BadParameter(str(exc)) from None

    return click.types.FuncParamType(convert)


def _rate(name: str) -> click.types.FuncParamType[str, options_mod.RateLimit]:
    def convert(value: str) -> options_mod.RateLimit:
        try:
            return options_mod.parse_rate(value, name=name)
        except options_mod.OptionError as exc:
            raise click.BadParameter(str(exc)) from None

    return click.types.FuncParamType(convert)


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
@click.option("--rate-limit", type=_rate("rate-limit"), default=None, metavar="N/Ss",
              help="Gateway rate limit, e.g. 100/1s: calls over it get 429 + Retry-After.")
@click.option("--quota", type=_rate("quota"), default=None, metavar="N/Ss",
              help="Gateway call quota, e.g. 10000/3600s: calls over it get 403 + Retry-After.")
@click.option("--queue-delay-s", type=_range("queue-delay-s"), default="0",
              metavar="MIN[,MAX]", help="Seconds a started job stays NotStarted.")
@click.option("--run-time-s", type=_range("run-time-s"), default="0", metavar="MIN[,MAX]",
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
@click.option("--slow-response-s", type=_range("slow-response-s"), default="0",
              metavar="MIN[,MAX]", help="Delay before each answer.")
@click.option("--int-status", is_flag=True, help="Send StatusCode as an integer 0..4.")
@click.option("--sas-lifetime-s", type=click.FloatRange(min=1), default=86400.0,
              show_default=True, help="Lifetime of the read SAS tokens in Results.")
def emulator_command(**kwargs: object) -> None:
    """Serve the Azure ML BES protocol (SPEC §2) and RRS on HOST:PORT for development, demos,
    tests and benchmarks. Jobs really run: inputs are read and outputs written through the
    storage references in each request (Azurite or any account).

    Prints `emulator listening on http://HOST:PORT` once it accepts connections.
    Introspection: GET /_emulator/stats, GET /_emulator/jobs/{id}, POST /_emulator/config.
    """
    try:
        opts = _options(kwargs)
    except options_mod.OptionError as exc:
        raise click.BadParameter(str(exc)) from None
    logs.configure()
    logs.register_secrets([k for k in (opts.api_key, opts.apim_key) if k])
    asyncio.run(_serve(opts))


def _options(kw: dict[str, object]) -> options_mod.EmulatorOptions:
    gp = kw["global_parameters"]
    return options_mod.EmulatorOptions(
        host=str(kw["host"]), port=int(kw["port"]),  # type: ignore[call-overload]
        seed=kw["seed"],  # type: ignore[arg-type]
        default_model=str(kw["default_model"]),
        services=options_mod.parse_services(list(kw["services"])),  # type: ignore[call-overload]
        inputs=options_mod.parse_names(str(kw["inputs"]), name="inputs"),
        outputs=options_mod.parse_names(str(kw["outputs"]), name="outputs"),
        global_parameters=None if gp is None else options_mod.parse_names(
            str(gp), name="global-parameters"),
        api_key=kw["api_key"],  # type: ignore[arg-type]
        apim_key=kw["apim_key"],  # type: ignore[arg-type]
        rate_limit=kw["rate_limit"],  # type: ignore[arg-type]
        quota=kw["quota"],  # type: ignore[arg-type]
        queue_delay_s=kw["queue_delay_s"],  # type: ignore[arg-type]
        run_time_s=kw["run_time_s"],  # type: ignore[arg-type]
        failure_rate=float(kw["failure_rate"]),  # type: ignore[arg-type]
        failure_details=str(kw["failure_details"]),
        max_running=int(kw["max_running"]),  # type: ignore[call-overload]
        error_503_rate=float(kw["error_503_rate"]),  # type: ignore[arg-type]
        retry_after_s=int(kw["retry_after_s"]),  # type: ignore[call-overload]
        drop_rate=float(kw["drop_rate"]),  # type: ignore[arg-type]
        slow_response_s=kw["slow_response_s"],  # type: ignore[arg-type]
        int_status=bool(kw["int_status"]),
        sas_lifetime_s=float(kw["sas_lifetime_s"]),  # type: ignore[arg-type]
    )


async def _serve(opts: options_mod.EmulatorOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server.running(opts) as base_url:
        sys.stdout.write(f"emulator listening on {base_url}\n")
        sys.stdout.flush()
        await stop.wait()
