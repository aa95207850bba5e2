"""What operators use: reports and ``verify``, retention, dead-letter admin, metrics, health."""
