"""Reports: one frozen dataclass per command (`types`), serialised by writers that never recompute
anything (`json`), and read back (`reader`)."""
