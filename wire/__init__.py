"""The wire contract that producers and workers share, and nothing else: the job and result
models (``contract``), the stored-result and answer-cache codecs (``outcome``, ``cache``), the
dead-letter record (``deadletters``), the error tree (``errors``), settings (``settings``), Redis
key and queue names (``constants``) and model references (``modelref``). It imports neither
side."""
