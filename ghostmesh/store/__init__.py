"""Persistent storage of ghostmesh: the ``Store`` interface (``base``) and its SQLite backend (``sqlite``)."""
