"""Keyspace watching: expired, evicted and deleted state keys become journal tombstones.

- ``watcher``: :class:`KeyspaceWatcher`, one subscription to a master's key events;
- ``events``: the events it needs, the ``notify-keyspace-events`` flags, which keys are states;
- ``status``: what a watcher is doing (status, counters, the ``subflow.watcher.up`` gauge);
- ``lease``: one watcher per master elected among the application's processes, and its heartbeat.
"""
