"""friendrec: the small package that every component shares (config, feature contract, graph data,
Feast access, CLI). Component code lives in the top-level ``feature_repo``, ``training``,
``streaming`` and ``serving`` packages."""

__version__ = "0.1.0"
