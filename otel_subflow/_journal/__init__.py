"""The journal: what happened to each run's state, in the Redis server's order.

- ``schema``: key names, operations, record fields and the packed layout (the one home of each);
- ``script``: the write script, its parameters and its reply;
- ``reads``: the reads the analysis and the CLI make;
- ``writer``: the in-process queue and background flusher;
- ``races``: read-before-init races, in process and across processes, and their spans;
- ``location``: where the journal lives, the registry of journals, their metrics.
"""
