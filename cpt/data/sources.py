"""Config of data sources (training corpora) and held-out evaluation sets: defined in the config layer
(cpt/config/data.py, which imports no other cpt module), re-exported here for cpt.data's callers."""

from cpt.config import HeldoutConfig, SourceConfig

__all__ = ["HeldoutConfig", "SourceConfig"]
