"""Persistent storage of ghostmesh: the ``Store`` interface (``base``), the statements its SQL backends share
(``sql``), and the backends: SQLite (``sqlite``, the default) and PostgreSQL (``postgres``)."""
