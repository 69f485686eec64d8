"""``python -m otel_subflow.stack``: see :func:`otel_subflow.stack.main`."""

import sys

from otel_subflow.stack._main import main

sys.exit(main())
