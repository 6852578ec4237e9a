"""Evaluation: judges, win rates, benchmarks and their leaderboard metrics."""
