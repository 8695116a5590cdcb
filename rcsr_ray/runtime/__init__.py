"""Runtime: the round loop, the local and Ray backends, the run folder."""
