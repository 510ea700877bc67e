"""Layer 6, judging a Posterior: metrics, recalibration and plots."""
