"""Multi-rank pieces: process groups, collectives, the sharding planner, loading."""
