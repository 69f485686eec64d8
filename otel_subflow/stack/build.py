"""``python -m otel_subflow.stack.build [all|collector|jaeger] [--print-paths]``.

Builds (or finds in the cache) the collector and Jaeger binaries of the local
stack: see :mod:`otel_subflow.stack._build`, which does the work. The package
does not import this module, so ``-m`` runs it exactly once.
"""

import sys

from otel_subflow.stack._build import main

if __name__ == "__main__":
    sys.exit(main())
