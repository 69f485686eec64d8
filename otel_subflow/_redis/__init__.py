"""The Redis side: where the application's connections go, our own clients, and what servers refuse.

- ``endpoint``: the one parser of a pool's settings, and the builder of our short-timeout clients;
- ``connection``: what is known of a pool's connections (address, client id, server run id);
- ``clients``: the diagnostic targets (the app's server, another db, a URL, a replica's master);
- ``permissions``: commands a server refused us, the ACL that grants them, log lines that cannot flood.
"""
