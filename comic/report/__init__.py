"""Reports: figures of a run and of studies / sweeps, paper-style tables, and the statistics over seeds behind them.
Used by every room; depends only on `comic.metrics` (pure functions of numbers, frames and figures)."""
