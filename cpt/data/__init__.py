"""The data path: prepare -> token shards -> packed streams -> the replay mixer."""
