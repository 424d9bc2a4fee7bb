"""sibylq's benchmarks against bare baselines: ``python -m benchmarks`` (see ``__main__``)."""
