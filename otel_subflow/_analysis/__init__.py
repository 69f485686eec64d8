"""Why a state is missing: the analysis of a miss and its verdict.

- ``interface``: what the analysis reads of a call (the typed seam with the decorators);
- ``steps``: what the analysis asks the servers and concludes (I/O-free, as a generator);
- ``miss``: the sync and async drivers that run the steps, within a timeout and a breaker;
- ``probe``: the reader-side commands and the evidence they give;
- ``verdict``: the rules that decide the cause from the evidence (pure functions);
- ``report``: the verdict recorded as span event, log record, metric and journal record;
- ``limits``: the rate limit and the circuit breaker that keep the analysis cheap;
- ``remediation``: what to change so it does not happen again, and by how much (pure; ``remedies``: a rule per cause).
"""
