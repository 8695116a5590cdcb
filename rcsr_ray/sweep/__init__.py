"""Ray Tune sweeps over config keys (`rcsr-ray sweep`) and their reports (`rcsr-ray report`).

`spec` and `report` do not import Ray; `runner` does (Tune)."""
