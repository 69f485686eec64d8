"""Instrumentors for the workflow engines Python teams run; each imports its engine only when used."""
