"""The reproducible experiments: each module here registers its own with
`dynasparse.experiments.registry.register` when imported (`registry.available()` imports them
all). Add an experiment by adding a module."""
