"""``python -m otel_subflow.cli``: the same as the ``otel-subflow`` console script."""

from otel_subflow.cli import main

if __name__ == "__main__":
    main()
