"""End-to-end comparison suite (`python -m fusedops.perf`): models, measurement and report."""
