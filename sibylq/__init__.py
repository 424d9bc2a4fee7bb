"""Operator tools on top of the producer and the workers: the ``sibylq`` command (``cli``),
fleet status (``status``) and the dead-letter commands."""
