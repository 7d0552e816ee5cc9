"""Model versions over time: promotion behind gates, the canary, changes to a running app's split."""
