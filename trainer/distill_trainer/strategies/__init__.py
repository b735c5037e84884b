"""How a model runs on a worker: one module per strategy family."""
