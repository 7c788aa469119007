"""Structural pruning engine: channel groups, gates, slimming, FLOPs model, targeting, structure records."""
