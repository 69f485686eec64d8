"""The otel-subflow stack without Docker: collector, Jaeger and Prometheus as local processes.

Runs the binaries that :mod:`otel_subflow.stack.build` builds (cached outside
any checkout, keyed by version) with the configs bundled in this package
(``otel_subflow/stack/collector/``, the ``collector/`` of a checkout), on
loopback only, each pointed at the others through the same environment
variables that docker-compose.yml sets.

Example::

    from otel_subflow.stack import LocalStack, StackPorts

    with LocalStack(ports=StackPorts.free()) as stack:
        print(stack.urls["jaeger"])
        # export OTLP to stack.otlp_grpc_endpoint ...

From a shell: ``otel-subflow stack`` (or ``python -m otel_subflow.stack``,
``make stack``) builds or finds the binaries, starts everything, prints the
URLs and stops on Ctrl-C; ``--check`` brings it up, checks it and stops it.

The parts: ``_build`` (the Go builds and their cache; ``build`` is its command),
``_binaries`` (finding them), ``_configs`` (the bundled configs), ``_local``
(the processes), ``_check`` (the non-interactive check), ``_main`` (the command
line). The stack needs only the standard library; ``_build`` needs nothing of
otel_subflow either, so a checkout runs it as a script before any venv exists.
"""

from otel_subflow.stack._binaries import Binaries, build_binaries, find_binaries
from otel_subflow.stack._build import JAEGER_MODULE_VERSION, JAEGER_VERSION, OTELCOL_VERSION, cache_dir
from otel_subflow.stack._check import CheckResult, check_stack
from otel_subflow.stack._common import StackError, StackPorts
from otel_subflow.stack._configs import collector_config_dir, render_prometheus_config
from otel_subflow.stack._local import LocalStack
from otel_subflow.stack._main import main, parse_args

__all__ = [
    "JAEGER_MODULE_VERSION",
    "JAEGER_VERSION",
    "OTELCOL_VERSION",
    "Binaries",
    "CheckResult",
    "LocalStack",
    "StackError",
    "StackPorts",
    "build_binaries",
    "cache_dir",
    "check_stack",
    "collector_config_dir",
    "find_binaries",
    "main",
    "parse_args",
    "render_prometheus_config",
]
