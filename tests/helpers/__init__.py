"""What the tests share that is not a test: a Hub-compatible server, the generation-path checks, the
export checks run in a fresh process, sparse synthetic data for the SAE and its data-parallel
worker."""
