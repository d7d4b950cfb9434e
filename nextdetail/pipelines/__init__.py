"""Reserved: arrives with its issue (see README, Roadmap)."""
