"""The zero-config local runtime: a private ``redis-server`` and worker processes, started as
child processes when no ``SIBYLQ_BROKER_URL`` is set (``cluster``). It imports only the wire
contract: workers run as ``python -m workers`` subprocesses."""
